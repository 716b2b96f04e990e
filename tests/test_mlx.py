"""The MLX backend (realign.backends.mlx, mlx_dpo) on a tiny random Llama: parity with the
TRL backend and with TRL's own DPO loss code on identical weights and inputs, training,
KL, generation, saving, checkpoints, the CLI's ``--backend mlx``.

mlx runs on this Linux machine's CPU (``pip install 'realign[mlx]'`` installs ``mlx[cpu]``);
without mlx / mlx-lm every test here is skipped with the reason.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx.core", reason="the MLX backend needs mlx (pip install 'realign[mlx]')")
pytest.importorskip("mlx_lm", reason="the MLX backend needs mlx-lm (pip install 'realign[mlx]')")

import mlx.core as mx  # noqa: E402
from realign.backends import default_backend_name, get_backend  # noqa: E402
from realign.backends.base import Backend, DPOSettings  # noqa: E402
from realign.backends.mlx import (  # noqa: E402
    MLXBackend,
    MLXModelHandle,
    kl_on_probe,
    lora_parameters,
    make_policy,
    reference_distributions,
)
from realign.backends.mlx_dpo import (  # noqa: E402
    MLXDPOTrainer,
    StepAction,
    dpo_loss,
    latest_checkpoint,
)
from realign.errors import InputError, MissingDependencyError  # noqa: E402

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "examples" / "pairs.jsonl"
TOL = 1e-4  # fp32 parity with TRL (issue 16)

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves falling in a quiet forest at dusk.",
    "2+2?",
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a color."}],
    "Explain DPO in one sentence.",
]
COMPLETIONS = [
    "Paris.",
    "Red leaves drift and fall / the forest holds its breath now / dusk settles softly.",
    "4",
    [{"role": "assistant", "content": "Blue."}],
    "It fits a policy to preference pairs with a classification loss against a frozen reference.",
]


def _rows(n: int = 8, long_prompts: bool = False) -> list[dict]:
    """TRL conversational preference rows; with ``long_prompts`` some prompts fill a
    short max_length (TRL drops those) and some sequences are truncated."""
    out = []
    for i in range(n):
        extra = " Please explain your reasoning step by step." * (2 * i if long_prompts else 0)
        out.append({"prompt": [{"role": "user", "content": f"Question {i}: what is {i} + {i}?{extra}"}],
                    "chosen": [{"role": "assistant", "content": f"It is {2 * i}."}],
                    "rejected": [{"role": "assistant", "content":
                                  f"I am not sure, maybe {3 * i} or something else. " * (1 + i % 3)}]})
    return out


@pytest.fixture(scope="module")
def backend() -> MLXBackend:
    return MLXBackend()


@pytest.fixture(scope="module")
def tiny_ref_path(tmp_path_factory) -> Path:
    """A second tiny model (seed 1): a reference whose log-probs differ from the policy's."""
    pytest.importorskip("torch", reason="the tiny model is built with torch/transformers")
    from realign.testing import tiny_model

    return tiny_model(tmp_path_factory.mktemp("tiny-ref"), seed=1)


@pytest.fixture(scope="module")
def handle(backend, tiny_model_path) -> MLXModelHandle:
    return backend.load(tiny_model_path, device="cpu")


def _settings(**kw) -> DPOSettings:
    base = dict(beta=0.1, learning_rate=1e-3, per_device_batch_size=4, max_steps=4, max_length=96, seed=0)
    base.update(kw)
    return DPOSettings(**base)


# ---------------------------------------------------------------- backend selection


def test_get_backend_mlx_and_default_name():
    be = get_backend("mlx")
    assert isinstance(be, MLXBackend) and isinstance(be, Backend) and be.name == "mlx"
    on_apple = sys.platform == "darwin" and __import__("platform").machine() == "arm64"
    assert default_backend_name() == ("mlx" if on_apple else "trl")
    assert type(get_backend("auto")).__name__ == ("MLXBackend" if on_apple else "TRLBackend")


def test_get_backend_mlx_without_mlx_names_the_install(monkeypatch):
    monkeypatch.delitem(sys.modules, "realign.backends.mlx", raising=False)
    for m in ("mlx", "mlx.core", "mlx.nn", "mlx_lm"):
        monkeypatch.setitem(sys.modules, m, None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError) as exc:
        get_backend("mlx")
    assert "pip install" in str(exc.value) and "mlx" in str(exc.value)


# ---------------------------------------------------------------- loading, scoring (parity with TRL)


def test_load_is_float32_with_chat_template(handle):
    assert handle.dtype == "float32" and handle.device == "cpu"
    assert handle.has_chat_template and handle.tokenizer.pad_token_id is not None
    assert all(v.dtype == mx.float32 for _, v in __import__("mlx.utils").utils.tree_flatten(
        handle.model.parameters()))


def test_load_missing_path_is_input_error(backend, tmp_path):
    with pytest.raises(InputError):
        backend.load(tmp_path / "nothing-here", device="cpu")


@pytest.mark.needs("torch", "transformers")
def test_logprobs_match_trl_per_token_and_per_sequence(backend, handle, tiny_model_path):
    from realign.backends.trl import TRLBackend

    trl = TRLBackend()
    th = trl.load(tiny_model_path, device="cpu")
    want = trl.completion_logprobs(th, PROMPTS, COMPLETIONS, batch_size=2)
    for bs in (1, 2, 8):
        got = backend.completion_logprobs(handle, PROMPTS, COMPLETIONS, batch_size=bs)
        assert got.counts == want.counts
        for g, w in zip(got.token_logps, want.token_logps):
            assert np.max(np.abs(np.array(g) - np.array(w))) < TOL
        assert np.max(np.abs(np.array(got.sums) - np.array(want.sums))) < TOL


@pytest.mark.needs("torch", "transformers")
def test_kl_matches_trl_and_reference_cache(backend, handle, tiny_model_path, tiny_ref_path):
    from realign.backends.trl import TRLBackend
    from realign.backends.trl import kl_on_probe as trl_kl

    trl = TRLBackend()
    want = trl_kl(trl.load(tiny_model_path, device="cpu"), trl.load(tiny_ref_path, device="cpu"),
                  PROMPTS, COMPLETIONS, batch_size=2)
    ref = backend.load(tiny_ref_path, device="cpu")
    got = kl_on_probe(handle, ref, PROMPTS, COMPLETIONS, batch_size=2)
    assert want.mean > 1e-3  # two different models
    assert abs(got.mean - want.mean) < TOL and got.counts == want.counts
    assert np.max(np.abs(np.array(got.per_sequence) - np.array(want.per_sequence))) < TOL
    direct = backend.completion_logprobs(handle, PROMPTS, COMPLETIONS)
    for a, b in zip(got.policy_token_logps, direct.token_logps):
        assert np.max(np.abs(np.array(a) - np.array(b))) < 1e-5
    enc = backend.encode(handle, PROMPTS, COMPLETIONS)
    cached = kl_on_probe(handle, reference_distributions(ref, enc, batch_size=3), encoded=enc,
                         tokenizer=handle.tokenizer, batch_size=2)
    assert abs(cached.mean - got.mean) < 1e-6


def test_kl_is_zero_at_init_full_and_lora(backend, handle):
    full = make_policy(handle)
    kl = backend.kl(full, handle, PROMPTS, COMPLETIONS)
    assert kl.mean == 0.0 and all(s == 0.0 for s in kl.per_sequence) and kl.tokens > 0
    lora = make_policy(handle, {"r": 4, "lora_alpha": 8})
    kl = backend.kl(lora, None, PROMPTS, COMPLETIONS)  # reference = adapters disabled
    assert abs(kl.mean) < 1e-7
    with pytest.raises(ValueError):
        backend.kl(full, None, PROMPTS, COMPLETIONS)  # no adapters to disable


def test_generate_greedy_batched_equals_one_by_one(backend, handle):
    prompts = PROMPTS[:4]
    batched = backend.generate(handle, prompts, max_new_tokens=6, batch_size=4)
    single = [backend.generate(handle, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single and all(isinstance(t, str) for t in batched)


# ---------------------------------------------------------------- DPO parity with TRL's own loss code


@pytest.mark.needs("torch", "trl", "datasets")
def test_dpo_losses_metrics_and_gradients_match_trl(backend, tiny_model_path, tiny_ref_path, tmp_path):
    """Same weights (policy = tiny seed 0, reference = tiny seed 1), same pairs: TRL's
    DPOTrainer (its tokenization, reference precompute and ``compute_loss``) against
    MLXDPOTrainer for each loss; every logged metric and the loss within 1e-4, and the
    gradient of every parameter."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = _rows(8, long_prompts=True)
    max_length = 80
    tok = AutoTokenizer.from_pretrained(str(tiny_model_path))
    pol = AutoModelForCausalLM.from_pretrained(str(tiny_model_path), dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_ref_path), dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=["sigmoid"], max_length=max_length,
                     per_device_train_batch_size=4, precompute_ref_log_probs=True, use_cpu=True,
                     bf16=False, report_to="none", disable_tqdm=True)
    tr = DPOTrainer(model=pol, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                    processing_class=tok)
    ds = tr.train_dataset
    mt = MLXDPOTrainer(backend.load(tiny_model_path, device="cpu"), backend.load(tiny_ref_path, device="cpu"),
                       rows, _settings(max_length=max_length), use_cache=False)
    # tokenization and TRL's filter of prompts that fill max_length
    assert 0 < len(ds) == len(mt.encoded) < len(rows)
    for e, r in zip(mt.encoded, ds):
        assert (e.prompt_ids, e.chosen_ids, e.rejected_ids) == (r["prompt_ids"], r["chosen_ids"], r["rejected_ids"])
    assert any(len(e.prompt_ids) + len(e.rejected_ids) > max_length for e in mt.encoded)  # truncation exercised
    # the reference precompute
    c, r = mt.precompute_reference()
    assert np.max(np.abs(c - np.array(ds["ref_chosen_logps"]))) < TOL
    assert np.max(np.abs(r - np.array(ds["ref_rejected_logps"]))) < TOL
    mt.ref_chosen = np.array(ds["ref_chosen_logps"], dtype=np.float32)  # identical inputs from here
    mt.ref_rejected = np.array(ds["ref_rejected_logps"], dtype=np.float32)

    idx = list(range(len(ds)))
    batch = tr.data_collator([ds[i] for i in idx])
    tr.model.train()
    names = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected"]
    for loss_type, weights in [(["sigmoid"], None), (["hinge"], None), (["ipo"], None),
                               (["sigmoid", "sft"], [1.0, 0.5])]:
        tr.loss_types, tr.loss_weights = loss_type, weights or [1.0] * len(loss_type)
        tr._metrics["train"].clear()
        tr.model.zero_grad(set_to_none=True)
        loss = tr.compute_loss(tr.model, batch)
        loss.backward()
        want = {k: v[-1] for k, v in tr._metrics["train"].items()}
        mt.loss_types, mt.opts["loss_weights"] = loss_type, weights
        got_loss, got, grads, norm = mt.compute_gradients(idx)
        assert abs(got_loss - loss.item()) < TOL * max(1.0, abs(loss.item())), (loss_type, got_loss, loss.item())
        for k in names:
            assert abs(got[k] - want[k]) < TOL, (loss_type, k, got[k], want[k])
        params = dict(tr.model.named_parameters())
        t_norm = math.sqrt(sum(float((p.grad ** 2).sum()) for p in params.values() if p.grad is not None))
        assert abs(norm - t_norm) < TOL * max(1.0, t_norm), (loss_type, norm, t_norm)
        for name, g in grads.items():
            tg = params[name].grad.numpy()
            assert np.max(np.abs(np.array(g) - tg)) < TOL * max(1.0, float(np.abs(tg).max())), (loss_type, name)


def test_logsumexp_over_a_vocabulary_row_is_float32_accurate():
    """MLX's CPU ``sum`` over a 49152-wide float32 row is sequential and loses ~1e-4
    (relative); the backend's two-level sum (vocab_sum) stays at float32 accuracy."""
    from realign.backends.mlx import log_softmax, logsumexp

    rng = np.random.default_rng(0)
    x = rng.normal(0, 4, size=(4, 49152)).astype(np.float32)
    want = np.log(np.exp(x.astype(np.float64) - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    got = np.array(logsumexp(mx.array(x)))[:, 0]
    assert np.max(np.abs(got - want)) < 1e-5
    odd = x[:, :1000]  # not a multiple of the block: padded with zeros after exp
    want = np.log(np.exp(odd.astype(np.float64)).sum(-1))
    assert np.max(np.abs(np.array(logsumexp(mx.array(odd)))[:, 0] - want)) < 1e-5
    assert np.allclose(np.exp(np.array(log_softmax(mx.array(odd)))).sum(-1), 1.0, atol=1e-5)


def test_dpo_loss_formulas_at_zero_margin():
    z = mx.zeros(3)
    cnt = mx.array([4.0, 4.0, 4.0])
    for lt, want in [("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", (1 / (2 * 0.1)) ** 2)]:
        loss, m = dpo_loss(z, z, z, z, beta=0.1, loss_types=[lt], chosen_counts=cnt, rejected_counts=cnt)
        assert abs(loss.item() - want) < 1e-6
        assert m["rewards/margins"].item() == 0 and m["rewards/accuracies"].item() == 0
    loss, _ = dpo_loss(z, z, z, z, beta=0.1, loss_types=["sft"], chosen_token_logps_sum=mx.array(-6.0),
                       chosen_tokens=3)
    assert abs(loss.item() - 2.0) < 1e-6
    with pytest.raises(InputError):
        dpo_loss(z, z, z, z, beta=0.1, loss_types=["sigmoid", "sft"], loss_weights=[1.0])


@pytest.mark.needs("torch")
@pytest.mark.e2e
def test_ifd_of_the_default_model_matches_trl():
    """IFD of the real default model, MLX vs TRL, within 1e-3 per example."""
    from realign.backends.trl import TRLBackend
    from realign.ifd import ifd_scores
    from realign.rows import read_rows

    rows = read_rows(PAIRS)[:6]
    prompts, answers = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    trl = TRLBackend()
    th = trl.load("default", device="cpu")
    want = ifd_scores(th, prompts, answers, backend=trl)
    mb = MLXBackend()
    mh = mb.load("default", device="cpu")
    got = ifd_scores(mh, prompts, answers, backend=mb)
    assert got.tokens == want.tokens
    for g, w in zip(got.ifd, want.ifd):
        assert g is not None and w is not None and abs(g - w) < 1e-3, (g, w)
    # and the per-sequence log-probs themselves (measured: 3.8e-5)
    a = mb.completion_logprobs(mh, prompts, answers).sums
    b = trl.completion_logprobs(th, prompts, answers).sums
    assert np.max(np.abs(np.array(a) - np.array(b))) < TOL


# ---------------------------------------------------------------- training


def test_a_few_dpo_steps_lower_the_loss_and_raise_the_margin(backend, handle):
    rows = _rows(8)
    pol = make_policy(handle)
    tr = MLXDPOTrainer(pol, handle, rows, _settings(max_steps=6), use_cache=False)
    idx = list(range(8))
    before_loss, before = tr.loss_and_metrics(idx)
    res = tr.train()
    after_loss, after = tr.loss_and_metrics(idx)
    assert res.global_step == 6 and len(res.log_history) == 6 and not res.stopped_early
    assert after_loss < before_loss - 0.05
    assert after["rewards/margins"] > before["rewards/margins"] + 0.1
    assert abs(before["rewards/margins"]) < 1e-6  # the policy starts at the reference
    for key in ("loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected",
                "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert key in res.log_history[-1]
    # the reference is untouched
    assert backend.kl(make_policy(handle), handle, PROMPTS[:2], COMPLETIONS[:2]).mean == 0.0


def test_lora_trains_only_the_adapters(backend, handle):
    from mlx.utils import tree_flatten

    pol = make_policy(handle, {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]})
    before = dict(tree_flatten(pol.model.parameters()))
    tr = MLXDPOTrainer(pol, None, _rows(8), _settings(max_steps=3, lora={"r": 4}), use_cache=False)
    tr.train()
    after = dict(tree_flatten(pol.model.parameters()))
    changed = {k for k in before if not np.array_equal(np.array(before[k]), np.array(after[k]))}
    assert changed and all(k.endswith(("lora_a", "lora_b")) for k in changed)
    assert any(k.endswith("lora_b") for k in changed)
    assert backend.kl(pol, None, PROMPTS[:2], COMPLETIONS[:2]).mean > 0


def test_gradient_accumulation_equals_the_larger_batch(handle):
    from mlx.utils import tree_flatten

    rows = _rows(4)
    runs = []
    for b, g in ((4, 1), (2, 2)):
        pol = make_policy(handle)
        tr = MLXDPOTrainer(pol, handle, rows, _settings(per_device_batch_size=b, gradient_accumulation_steps=g,
                                                        max_steps=1), use_cache=False)
        res = tr.train()
        runs.append((res.log_history[0], dict(tree_flatten(pol.model.parameters()))))
    (l1, w1), (l2, w2) = runs
    for k in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
        assert abs(l1[k] - l2[k]) < 1e-4, k
    assert max(float(np.max(np.abs(np.array(w1[k]) - np.array(w2[k])))) for k in w1) < 1e-5


def test_step_callback_can_restore_halve_lr_and_stop(handle):
    pol = make_policy(handle)
    seen: list[tuple[int, float]] = []
    snaps: dict[int, dict] = {}

    def cb(step, metrics):
        seen.append((step, metrics["learning_rate"]))
        snaps[step] = tr.snapshot()
        if step == 2:  # a KL breach: roll back to step 1, halve the LR
            return StepAction(restore=snaps[1], lr_factor=0.5)
        if step == 3:
            return StepAction(stop=True)
        return None

    tr = MLXDPOTrainer(pol, handle, _rows(8), _settings(max_steps=10, extra={"lr_scheduler_type": "constant"}),
                       callback=cb, use_cache=False)
    res = tr.train()
    assert res.global_step == 3 and res.stopped_early
    assert [s for s, _ in seen] == [1, 2, 3]
    assert seen[2][1] == pytest.approx(seen[1][1] / 2)
    # step 3 started from step 1's weights with fresh optimizer moments: not step 2's weights
    w2, w3 = snaps[2], snaps[3]
    assert any(not np.array_equal(np.array(w2[k]), np.array(w3[k])) for k in w2)


def test_checkpoint_resume_equals_an_uninterrupted_run(handle, tmp_path):
    from mlx.utils import tree_flatten

    rows = _rows(8)
    s = _settings(max_steps=4, per_device_batch_size=2, gradient_accumulation_steps=2)
    full = make_policy(handle)
    res_a = MLXDPOTrainer(full, handle, rows, s, use_cache=False).train()

    out = tmp_path / "ckpt"
    first = make_policy(handle)
    saved: list[tuple[str, int]] = []
    tr = MLXDPOTrainer(first, handle, rows, s, output_dir=out, save_every=1,
                       callback=lambda step, m: StepAction(stop=True) if step == 2 else None, use_cache=False,
                       on_save=lambda folder, step: saved.append((folder.name, step)))
    tr.train()
    assert saved == [("checkpoint-1", 1), ("checkpoint-2", 2)]
    ckpts = sorted(p.name for p in out.iterdir())
    assert ckpts == ["checkpoint-1", "checkpoint-2"]  # save_total_limit 2
    assert latest_checkpoint(out).name == "checkpoint-2"
    resumed = make_policy(handle)
    res_b = MLXDPOTrainer(resumed, handle, rows, s, output_dir=out, save_every=100,
                          use_cache=False).train(resume_from=latest_checkpoint(out))
    assert res_b.global_step == 4 and [r["step"] for r in res_b.log_history] == [1, 2, 3, 4]
    for ra, rb in zip(res_a.log_history, res_b.log_history):
        assert abs(ra["loss"] - rb["loss"]) < 1e-5
    wa, wb = dict(tree_flatten(full.model.parameters())), dict(tree_flatten(resumed.model.parameters()))
    assert max(float(np.max(np.abs(np.array(wa[k]) - np.array(wb[k])))) for k in wa) < 1e-6
    # a checkpoint is a loadable model folder
    assert (out / "checkpoint-4" / "config.json").is_file()


def test_reference_logps_are_cached_by_content(handle, monkeypatch, tmp_path):
    monkeypatch.setenv("REALIGN_HOME", str(tmp_path / "home"))
    rows = _rows(4)
    a = MLXDPOTrainer(make_policy(handle), handle, rows, _settings())
    ca, ra = a.precompute_reference()
    assert a.ref_cache["hit"] is False and Path(a.ref_cache["path"]).is_file()
    b = MLXDPOTrainer(make_policy(handle), handle, rows, _settings())
    cb, rb = b.precompute_reference()
    assert b.ref_cache["hit"] is True and np.array_equal(ca, cb) and np.array_equal(ra, rb)
    c = MLXDPOTrainer(make_policy(handle), handle, rows, _settings(max_length=72))
    c.precompute_reference()
    assert c.ref_cache["hit"] is False  # max_length is part of the key


def test_unsupported_settings_are_refused(handle):
    with pytest.raises(InputError, match="robust"):
        MLXDPOTrainer(make_policy(handle), handle, _rows(2), _settings(loss_type="robust"))
    with pytest.raises(InputError, match="ld_alpha"):
        MLXDPOTrainer(make_policy(handle), handle, _rows(2), _settings(extra={"ld_alpha": 0.5}))
    with pytest.raises(InputError):
        MLXDPOTrainer(make_policy(handle), None, _rows(2), _settings())  # full FT needs a reference


def test_lora_parameters_from_peft_kwargs(handle):
    p = lora_parameters(handle.model, {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05})
    assert p["rank"] == 16 and p["scale"] == 2.0 and p["dropout"] == 0.05
    assert sorted(p["keys"]) == ["self_attn.q_proj", "self_attn.v_proj"]  # PEFT's Llama default
    p = lora_parameters(handle.model, {"target_modules": "all-linear"})
    assert len(p["keys"]) == 7 and p["scale"] == 1.0
    with pytest.raises(InputError):
        lora_parameters(handle.model, {"r": 8, "modules_to_save": ["lm_head"]})
    with pytest.raises(InputError):
        lora_parameters(handle.model, {"target_modules": ["nope_proj"]})


# ---------------------------------------------------------------- saving


@pytest.mark.needs("torch", "transformers")
def test_saved_model_loads_in_both_backends(backend, handle, tiny_model_path, tmp_path):
    from realign.backends.trl import TRLBackend

    pol = make_policy(handle)
    MLXDPOTrainer(pol, handle, _rows(4), _settings(max_steps=2), use_cache=False).train()
    want = backend.completion_logprobs(pol, PROMPTS, COMPLETIONS)
    saved = backend.save(pol, tmp_path / "m")
    again = backend.completion_logprobs(backend.load(saved, device="cpu"), PROMPTS, COMPLETIONS)
    assert np.max(np.abs(np.array(again.sums) - np.array(want.sums))) < 1e-5
    trl = TRLBackend()
    via_torch = trl.completion_logprobs(trl.load(saved, device="cpu"), PROMPTS, COMPLETIONS)
    assert np.max(np.abs(np.array(via_torch.sums) - np.array(want.sums))) < TOL
    assert json.loads((saved / "config.json").read_text())["model_type"] == "llama"


def test_lora_adapters_save_load_and_merge(backend, handle, tmp_path):
    pol = make_policy(handle, {"r": 4, "lora_alpha": 16})
    MLXDPOTrainer(pol, None, _rows(4), _settings(max_steps=2, lora={"r": 4})).train()
    want = backend.completion_logprobs(pol, PROMPTS, COMPLETIONS).sums
    saved = backend.save(pol, tmp_path / "adapter")
    assert (saved / "adapters.safetensors").is_file()
    loaded = backend.load(saved, device="cpu")
    assert loaded.lora is not None
    assert np.max(np.abs(np.array(backend.completion_logprobs(loaded, PROMPTS, COMPLETIONS).sums)
                         - np.array(want))) < 1e-5
    merged = backend.save(loaded, tmp_path / "merged", merge_adapters=True)
    m = backend.load(merged, device="cpu")
    assert m.lora is None
    assert np.max(np.abs(np.array(backend.completion_logprobs(m, PROMPTS, COMPLETIONS).sums)
                         - np.array(want))) < 1e-4


# ---------------------------------------------------------------- the CLI


@pytest.mark.needs("torch")
def test_cli_ifd_and_kl_with_backend_mlx(tiny_model_path, tmp_path):
    from realign.cli import app
    from typer.testing import CliRunner

    runner = CliRunner()
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in
                            [json.loads(x) for x in PAIRS.read_text().splitlines()[:4]]))
    out = {}
    for be in ("trl", "mlx"):
        r = runner.invoke(app, ["ifd", str(data), "--model", str(tiny_model_path), "--backend", be,
                                "--device", "cpu", "--json"])
        assert r.exit_code == 0, r.output
        out[be] = json.loads(r.stdout)
    assert out["mlx"]["backend"] == "mlx"
    assert np.max(np.abs(np.array(out["mlx"]["scores"]) - np.array(out["trl"]["scores"]))) < TOL
    r = runner.invoke(app, ["kl", str(tiny_model_path), "--probe", str(PAIRS), "--reference",
                            str(tiny_model_path), "--max-examples", "3", "--backend", "mlx", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["mean_per_token"] == 0.0 and got["gate"]["status"] == "pass" and got["tokens"] > 0
    r = runner.invoke(app, ["kl", str(tiny_model_path), "--probe", str(PAIRS), "--backend", "nope"])
    assert r.exit_code == 2 and "--backend" in r.output


def test_calibrate_with_backend_mlx(tiny_model_path, monkeypatch, tmp_path):
    from realign import hardware_calibrator as hc

    monkeypatch.setenv("REALIGN_HOME", str(tmp_path / "home"))
    res = hc.calibrate(str(tiny_model_path), seq_len=32, device="cpu", quick=True, max_batch=2,
                       backend="mlx")
    assert res.device == "mlx-cpu" and "MLXDPOTrainer" in res.method
    assert [p.batch_size for p in res.points] == [1, 2] and all(p.status == "ok" for p in res.points)
    assert res.recommended_batch_size in (1, 2) and "mlx" in res.versions


def test_two_processes_under_mlx_launch_equal_one_process_at_twice_the_batch(tiny_model_path, tmp_path):
    """Data parallelism over mx.distributed (what several Macs run): ``mlx.launch -n 2``
    (two local processes, ring backend) with batch 2 each takes the same steps as one
    process with batch 4."""
    import shutil
    import subprocess

    launch = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
    if not Path(launch).exists():
        pytest.skip("mlx.launch is not installed")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(PAIRS.read_text().splitlines(keepends=True)[:8]))
    env = dict(__import__("os").environ, REALIGN_HOME=str(tmp_path / "home"))
    common = ["-m", "realign.backends.mlx_dpo", "--model", str(tiny_model_path), "--data", str(data),
              "--max-steps", "2", "--max-length", "64", "--learning-rate", "1e-3", "--device", "cpu"]

    def records(cmd: list[str]) -> list[dict]:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
        return [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]

    two = records([launch, "-n", "2", "--backend", "ring", "--python", sys.executable, "--", *common,
                   "--batch-size", "2", "--output", str(tmp_path / "two")])
    one = records([sys.executable, *common, "--batch-size", "4", "--output", str(tmp_path / "one")])
    assert two[-1]["processes"] == 2 and one[-1]["processes"] == 1
    steps2, steps1 = [r for r in two if "loss" in r], [r for r in one if "loss" in r]
    assert [r["step"] for r in steps2] == [r["step"] for r in steps1] == [1, 2]
    for a, b in zip(steps2, steps1):
        for k in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert abs(a[k] - b[k]) < 1e-4, (k, a[k], b[k])
    assert (tmp_path / "two" / "model" / "config.json").is_file()
