"""The reference log-prob precompute of stage 5's trainer (realign.backends.trl_train):
realign's length-sorted, completion-only computation must give TRL's numbers, and the
cache key must change with every setting that changes them."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from realign.backends.trl import TRLBackend  # noqa: E402
from realign.backends import trl_train as tt  # noqa: E402


def _rows(n: int) -> list[dict[str, str]]:
    # Prompts and answers of different lengths, so batches need padding and sorting moves rows.
    rows = []
    for i in range(n):
        rows.append({
            "prompt": "Question " + " ".join(["about the weather"] * (1 + i % 5)) + f" number {i}?",
            "chosen": "Answer " + " ".join(["sunny and warm"] * (1 + (i * 7) % 4)),
            "rejected": "No " + " ".join(["idea"] * (1 + (i * 3) % 6)),
        })
    return rows


@pytest.fixture()
def setup(tiny_model_path, tmp_path, monkeypatch):
    from datasets import Dataset

    monkeypatch.setattr(tt, "ref_cache_dir", lambda: tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    handle = TRLBackend().load(tiny_model_path)
    ref = handle.model
    for p in ref.parameters():
        p.requires_grad_(False)

    def make(*, precompute: bool = True, ref_model=ref, max_length: int = 48, bf16: bool = False,
             **kw):
        args = tt.dpo_config(tmp_path / "out", beta=0.1, loss_type="sigmoid", learning_rate=1e-3,
                             batch_size=4, gradient_accumulation_steps=1, max_steps=1,
                             num_epochs=1, max_length=max_length, seed=0, save_every=10**6,
                             precompute_ref=precompute, use_cpu=True, extra={"bf16": bf16})
        cls = tt.make_dpo_trainer_class()
        return cls(model=copy.deepcopy(ref).requires_grad_(True).train(), ref_model=ref_model, args=args,
                   train_dataset=Dataset.from_list(_rows(11)), processing_class=handle.tokenizer, **kw)

    return make


def test_reference_logps_equals_trls_reference_forward(setup):
    trainer = setup(precompute=False)  # TRL keeps its ref_model for live forwards
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(5)])
    with trainer.accelerator.autocast():  # TRL's reference forward runs under the trainer's autocast
        ours = tt.reference_logps(trainer.ref_model, batch)
    theirs = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape == (5,)
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-4)
    assert (ours[0] < 0).all() and (ours[1] < 0).all()


@pytest.mark.parametrize("bf16", [False, True])
def test_sorted_precompute_matches_trl_precompute_row_by_row(setup, bf16):
    progress: list[tuple[int, int]] = []
    ours = setup(bf16=bf16, ref_progress=lambda i, n: progress.append((i, n)))
    assert ours.ref_precompute_method == "realign" and ours.ref_cache_hit is False
    trainer = setup(bf16=bf16)  # same key: a cache hit, loaded from the file
    assert trainer.ref_cache_hit is True
    # TRL's own precompute of the same rows, through DPOTrainer's method
    from trl import DPOTrainer

    ds = ours.train_dataset.remove_columns(["ref_chosen_logps", "ref_rejected_logps"])
    trl_out = DPOTrainer._precompute_ref_logps(ours, ds, "train", 4)
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        a = torch.tensor(ours.train_dataset[col])
        b = torch.tensor(trl_out[col])
        # fp32: equal up to summation order; bf16 autocast (TRL's default) rounds matmuls
        # differently for other batch shapes (sorting changes the padding), as TRL's own
        # precompute vs live reference forward do
        torch.testing.assert_close(a, b, rtol=1e-4 if bf16 else 1e-6, atol=1e-4)
        torch.testing.assert_close(torch.tensor(trainer.train_dataset[col]), a)
    assert progress == [(4, 11), (8, 11), (11, 11)]  # batches of 4


def test_cache_key_changes_with_truncation_settings(setup):
    a = setup(max_length=64)
    longest_prompt = max(len(p) for p in a.train_dataset["prompt_ids"])
    assert longest_prompt + 16 < 64  # the first run truncates nothing
    # keeps ≥ 2 completion tokens of every row, cuts the longer completions
    b = setup(max_length=longest_prompt + 2)  # no stale hit from the first run
    assert a.ref_cache_hit is False and b.ref_cache_hit is False
    assert a.ref_cache_path != b.ref_cache_path
    assert len(a.train_dataset) == len(b.train_dataset) == 11
    short = torch.tensor(b.train_dataset["ref_chosen_logps"])
    full = torch.tensor(a.train_dataset["ref_chosen_logps"])
    assert (short > full).any()  # fewer completion tokens → a larger (less negative) sum


def test_without_a_reference_model_the_policy_is_the_reference(setup, tmp_path, monkeypatch):
    # No ref_model: the precompute runs the policy (equal to the reference before
    # training); same weights hash and data → the same cache key and the same numbers.
    with_ref = setup()
    monkeypatch.setattr(tt, "ref_cache_dir", lambda: tmp_path / "cache2")
    (tmp_path / "cache2").mkdir()
    without = setup(ref_model=None)
    assert without.ref_cache_hit is False and without.ref_precompute_method == "realign"
    assert without.ref_cache_path.name == with_ref.ref_cache_path.name
    assert without.model.training  # the policy goes back to train mode
    torch.testing.assert_close(torch.tensor(without.train_dataset["ref_chosen_logps"]),
                               torch.tensor(with_ref.train_dataset["ref_chosen_logps"]))


@pytest.fixture()
def head_rows(monkeypatch) -> list[int]:
    """The number of positions (rows of hidden states) TRL's fused LM head projects, one
    entry per call, recorded from the call into its chunked log-prob function."""
    import trl.trainer.utils as tu

    seen: list[int] = []
    apply = tu._ChunkedLogProbFunction.apply
    monkeypatch.setattr(tu._ChunkedLogProbFunction, "apply",
                        lambda h, *a: (seen.append(h.size(0)), apply(h, *a))[1])
    return seen


@pytest.mark.parametrize("precompute", [True, False])
def test_completion_only_head_gives_trls_loss_and_gradients(setup, head_rows, precompute):
    """Stage 5's trainer scores only completion positions on CPU; TRL's default there
    scores every position. Loss, metrics and gradients must be the same, the number of
    positions projected must be the completion tokens, and TRL's switch restored after."""
    import trl.trainer.utils as tu
    from trl import DPOTrainer

    trainer = setup(precompute=precompute)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    n_completion = int(batch["completion_mask"][:, 1:].sum())
    n_positions = batch["input_ids"].size(0) * (batch["input_ids"].size(1) - 1)
    assert n_completion < n_positions  # the batch has prompt and padding positions
    original = tu._use_triton

    def loss_and_grads(fn):
        trainer.model.zero_grad()
        trainer._metrics["train"].clear()
        trainer._total_train_tokens = 0  # a running count, not per batch
        loss = fn(trainer, trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        return loss.detach(), grads, metrics

    ours = loss_and_grads(type(trainer).compute_loss)
    assert tu._use_triton is original and trainer.lm_head_positions == "completion"
    ours_head_rows, head_rows[:] = list(head_rows), []
    theirs = loss_and_grads(DPOTrainer.compute_loss)
    per_forward = 1 if precompute else 2  # the live reference forward is compact too
    assert ours_head_rows == [n_completion] * per_forward
    assert head_rows == [n_positions] * per_forward
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    assert ours[1].keys() == theirs[1].keys() and len(ours[1]) > 0
    for name in ours[1]:
        torch.testing.assert_close(ours[1][name], theirs[1][name], rtol=1e-4, atol=1e-6)
    assert ours[2].keys() == theirs[2].keys() and "entropy" in ours[2]
    for k in ours[2]:
        assert ours[2][k] == pytest.approx(theirs[2][k], rel=1e-4, abs=1e-6), k


def test_trl_precompute_fallback_uses_the_completion_only_head(setup, monkeypatch, head_rows):
    """Where realign's own precompute does not apply (here forced), TRL's precompute runs
    under the completion-only head: the same numbers as TRL's default, fewer positions."""
    from trl import DPOTrainer

    monkeypatch.setattr(tt, "fast_reference_supported", lambda model: False)
    ours = setup()
    assert ours.ref_precompute_method == "trl" and ours.ref_cache_hit is False
    ours_positions, head_rows[:] = sum(head_rows), []
    ds = ours.train_dataset.remove_columns(["ref_chosen_logps", "ref_rejected_logps"])
    trl_out = DPOTrainer._precompute_ref_logps(ours, ds, "train", 4)
    assert 0 < ours_positions < sum(head_rows)
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor(ours.train_dataset[col]),
                                   torch.tensor(trl_out[col]), rtol=1e-6, atol=1e-5)
