"""KL(π_θ ‖ π_ref) from logits: hand-computed values, masking, batching, and via the backend."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from realign.training_metrics import per_sequence_kl, per_token_kl  # noqa: E402


def _kl2(p: float, q: float) -> float:
    """KL between Bernoulli(p) and Bernoulli(q), written out by hand."""
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_hand_computed_two_token_vocab():
    # position 0: policy logits (0, 0) → p = (1/2, 1/2); reference logits (0, ln 3) → q = (1/4, 3/4)
    #   KL = 1/2 ln(2) + 1/2 ln(2/3) = 0.5 ln(4/3) = 0.143841...
    # position 1: policy logits (ln 9, 0) → p = (0.9, 0.1); reference (0, 0) → q = (0.5, 0.5)
    #   KL = 0.9 ln 1.8 + 0.1 ln 0.2 = 0.368064...
    pol = torch.tensor([[[0.0, 0.0], [math.log(9.0), 0.0]]])
    ref = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1]])
    k0 = 0.5 * math.log(4 / 3)
    k1 = 0.9 * math.log(1.8) + 0.1 * math.log(0.2)
    assert k0 == pytest.approx(_kl2(0.5, 0.25)) and k1 == pytest.approx(_kl2(0.9, 0.5))
    assert k0 == pytest.approx(0.1438410362) and k1 == pytest.approx(0.3680642071)
    assert per_token_kl(pol, ref, mask) == pytest.approx((k0 + k1) / 2, rel=1e-6)
    assert per_sequence_kl(pol, ref, mask) == pytest.approx([k0 + k1], rel=1e-6)
    # KL is not symmetric: the reversed direction gives a different number
    assert per_token_kl(ref, pol, mask) != pytest.approx((k0 + k1) / 2, rel=1e-3)


def test_mean_is_token_weighted_and_padding_ignored():
    pol = torch.tensor([[[0.0, 0.0], [math.log(9.0), 0.0], [5.0, -5.0]],
                        [[0.0, 0.0], [7.0, 7.0], [-3.0, 3.0]]])
    ref = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [0.0, 0.0]],
                        [[0.0, math.log(3.0)], [1.0, 2.0], [3.0, -3.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)  # padding carries garbage logits
    k0 = 0.5 * math.log(4 / 3)
    k1 = 0.9 * math.log(1.8) + 0.1 * math.log(0.2)
    assert per_sequence_kl(pol, ref, mask) == pytest.approx([k0 + k1, k0], rel=1e-6)
    assert per_token_kl(pol, ref, mask) == pytest.approx((2 * k0 + k1) / 3, rel=1e-6)


def test_batched_equals_unbatched_and_properties():
    g = torch.Generator().manual_seed(0)
    B, T, V = 4, 7, 50
    pol = torch.randn(B, T, V, generator=g) * 2
    ref = torch.randn(B, T, V, generator=g) * 2
    lengths = [7, 3, 5, 1]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    seq = per_sequence_kl(pol, ref, mask)
    for i, n in enumerate(lengths):
        alone = per_sequence_kl(pol[i:i + 1, :n], ref[i:i + 1, :n], torch.ones(1, n))
        assert seq[i] == pytest.approx(alone[0], rel=1e-6)
        # reference implementation with torch's kl_div, position by position
        lp = torch.log_softmax(pol[i, :n].double(), -1)
        lr = torch.log_softmax(ref[i, :n].double(), -1)
        direct = torch.nn.functional.kl_div(lr, lp, log_target=True, reduction="sum")
        assert seq[i] == pytest.approx(float(direct), rel=1e-5)
    assert per_token_kl(pol, ref, mask) == pytest.approx(sum(seq) / sum(lengths), rel=1e-6)
    assert all(s > 0 for s in seq)
    assert per_token_kl(pol, pol.clone(), mask) == 0.0
    # shifting logits by a constant does not change the distribution
    assert per_token_kl(pol, pol + 3.0, mask) == pytest.approx(0.0, abs=1e-6)


def test_bad_inputs():
    x = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError):
        per_token_kl(x, torch.zeros(1, 2, 4), torch.ones(1, 2))
    with pytest.raises(ValueError):
        per_token_kl(x, x, torch.ones(1, 3))
    with pytest.raises(ValueError):
        per_token_kl(x, x, torch.zeros(1, 2))


def test_training_metrics_imports_without_torch_use():
    """Data validation imports training_metrics; the KL functions must not import torch at module level."""
    import ast
    import inspect

    import realign.training_metrics as tm

    tree = ast.parse(inspect.getsource(tm))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names] + [getattr(n, "module", "") or "" for n in top]
    assert not any(n.split(".")[0] == "torch" for n in names)


# ---------------------------------------------------------------- through the backend

PROBE_P = ["What is the capital of France?", "Name three primes.", "Say hi.", "Why is the sky blue?"]
PROBE_C = ["Paris.", "2, 3 and 5.", "Hi!", "Rayleigh scattering favours short wavelengths."]


@pytest.mark.integration
def test_kl_through_backend(tiny_model_path):
    from realign.backends.trl import TRLBackend, kl_on_probe

    be = TRLBackend()
    pol = be.load(tiny_model_path, device="cpu")
    ref = be.load(tiny_model_path, device="cpu")
    same = be.kl(pol, ref, PROBE_P, PROBE_C, batch_size=3)
    assert same.mean < 1e-6 and same.tokens == sum(same.counts) > 0
    assert len(same.per_sequence) == 4
    # the backend's completion-token counts are those of the log-prob function
    assert same.counts == be.completion_logprobs(pol, PROBE_P, PROBE_C).counts

    torch.manual_seed(0)
    with torch.no_grad():
        for p in pol.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    small = kl_on_probe(pol, ref, PROBE_P, PROBE_C, batch_size=2)
    with torch.no_grad():
        for p in pol.model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    big = kl_on_probe(pol, ref, PROBE_P, PROBE_C, batch_size=4)
    assert 1e-6 < small.mean < big.mean
    assert small.mean == pytest.approx(sum(small.per_sequence) / small.tokens)

    # batch composition does not change the numbers
    b1 = kl_on_probe(pol, ref, PROBE_P, PROBE_C, batch_size=1)
    assert b1.per_sequence == pytest.approx(big.per_sequence, rel=1e-4, abs=1e-7)

    # equals the pure function on unpadded single-example logits
    from realign.backends.trl import encode_pair
    from realign.training_metrics import per_token_kl as ptk

    enc = encode_pair(pol.tokenizer, PROBE_P[0], PROBE_C[0])
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        lp = pol.model(input_ids=ids).logits[:, enc.start - 1:-1]
        lr = ref.model(input_ids=ids).logits[:, enc.start - 1:-1]
    direct = ptk(lp, lr, torch.ones(lp.shape[:2]))
    assert big.per_sequence[0] / big.counts[0] == pytest.approx(direct, rel=1e-4)


@pytest.mark.integration
def test_kl_accepts_raw_models_and_restores_train_mode(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from realign.backends.trl import kl_on_probe

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    pol = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    pol.train()
    ref.eval()
    res = kl_on_probe(pol, ref, PROBE_P, PROBE_C, tokenizer=tok, batch_size=4)
    assert res.mean < 1e-6
    assert pol.training and not ref.training
    assert all(p.grad is None for p in pol.parameters())


@pytest.mark.integration
def test_kl_with_peft_adapters_disabled_as_reference(tiny_model_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from realign.backends.trl import kl_on_probe

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # LoRA B starts at zero: policy == base
    assert kl_on_probe(model, None, PROBE_P, PROBE_C, tokenizer=tok).mean < 1e-6
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.5)
    assert kl_on_probe(model, None, PROBE_P, PROBE_C, tokenizer=tok).mean > 1e-6


@pytest.mark.integration
def test_kl_with_precomputed_reference_distributions(tiny_model_path):
    from realign.backends.trl import TRLBackend, kl_on_probe, reference_distributions

    be = TRLBackend()
    pol = be.load(tiny_model_path, device="cpu")
    ref = be.load(tiny_model_path, device="cpu")
    enc = be.encode(pol, PROBE_P, PROBE_C)
    cache = reference_distributions(ref, enc, batch_size=3)
    assert [t.shape[0] for t in cache.logps] == [e.n_completion for e in enc]
    assert cache.nbytes == sum(e.n_completion for e in enc) * 49152 * 4
    assert kl_on_probe(pol, cache, encoded=enc).mean < 1e-6
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pol.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    live = kl_on_probe(pol, ref, encoded=enc, batch_size=2)
    fast = kl_on_probe(pol, cache, encoded=enc, batch_size=4)
    assert live.mean > 1e-4
    assert fast.per_sequence == pytest.approx(live.per_sequence, rel=1e-4)
    assert fast.mean == pytest.approx(live.mean, rel=1e-4)
    # the policy's token log-probs come from the same forward and equal completion_logprobs
    lp = be.completion_logprobs(pol, PROBE_P, PROBE_C)
    for a, b in zip(fast.policy_token_logps, lp.token_logps):
        assert a == pytest.approx(b, abs=1e-5)
    with pytest.raises(ValueError):
        kl_on_probe(pol, cache, encoded=enc[:2])
