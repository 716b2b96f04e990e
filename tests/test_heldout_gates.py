"""Stage 5's gates read the selected model on held-out data the selection never saw
(issue 13, item 8): KL along responses sampled from the policy, margins on other pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from realign.gates import Thresholds
from realign.kl_probe import distinct_prompts, gate_rows, prompt_key

ROOT = Path(__file__).resolve().parents[1]


def _row(p, c="yes", r="no"):
    return {"prompt": p, "chosen": c, "rejected": r}


def test_gate_rows_are_disjoint_from_the_probe_by_row_and_by_prompt():
    probe = [_row("a"), _row([{"role": "user", "content": "b"}]), _row("c")]
    heldout = probe + [_row("d"), _row("a", "other"), _row([{"role": "user", "content": "b"}]),
                       _row("e"), _row("d", "again")]
    rows = gate_rows(heldout, probe)
    assert [r["prompt"] for r in rows] == ["d", "e", "d"]
    probe_prompts = {prompt_key(r["prompt"]) for r in probe}
    assert not probe_prompts & {prompt_key(r["prompt"]) for r in rows}
    assert not any(r is p for r in rows for p in probe)
    assert distinct_prompts(rows, 5) == ["d", "e"] and distinct_prompts(rows, 1) == ["d"]
    assert gate_rows(probe, probe) == []  # a held-out split that is all probe: nothing to gate on


# ---------------------------------------------------------------- the measurement


@pytest.fixture(scope="module")
def models(tiny_model_path):
    pytest.importorskip("torch")
    from realign.backends.trl import TRLBackend

    be = TRLBackend()
    return be, be.load(tiny_model_path, device="cpu"), be.load(tiny_model_path, device="cpu")


def _pairs(n: int) -> list[dict]:
    lines = (ROOT / "examples" / "pairs.jsonl").read_text().splitlines()[:n]
    from realign.rows import to_trl_row

    return [to_trl_row(json.loads(x)) for x in lines]


@pytest.mark.integration
def test_sampled_kl_is_zero_when_policy_is_reference(models):
    from realign.kl_monitor import measure_heldout

    be, pol, ref = models
    pairs = _pairs(6)
    held = measure_heldout(be, pol, ref, prompts=[r["prompt"] for r in pairs[:4]], pairs=pairs,
                           beta=0.1, max_new_tokens=8, seed=0, batch_size=4, max_length=64)
    assert held["sampled"]["kl"] == 0.0 and held["sampled"]["kl_sequence_mean"] == 0.0
    assert held["sampled"]["tokens"] > 0 and held["sampled"]["prompts"] == 4
    assert held["teacher_forced"]["kl"] == 0.0
    assert held["margin"]["mean"] == 0.0 and held["margin"]["pairs"] == 6
    assert held["seconds"]["total"] > 0
    gate = Thresholds().evaluate("kl_divergence", held["sampled"]["kl"])
    assert gate.status == "pass"
    assert Thresholds().evaluate("reward_margin", held["margin"]["mean"]).status == "fail"


@pytest.mark.integration
def test_drifted_policy_fails_the_sampled_kl_gate(models, tiny_model_path):
    import torch

    from realign.backends.trl import TRLBackend
    from realign.kl_monitor import measure_heldout

    be, _pol, ref = models
    drifted = TRLBackend().load(tiny_model_path, device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in drifted.model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    pairs = _pairs(4)
    held = measure_heldout(be, drifted, ref, prompts=[r["prompt"] for r in pairs], pairs=pairs,
                           beta=0.1, max_new_tokens=8, seed=0, batch_size=4, max_length=64)
    s = held["sampled"]
    assert s["kl"] > 0.1  # far above the standard threshold
    assert Thresholds().evaluate("kl_divergence", s["kl"]).status == "fail"
    # the per-token mean is the token-weighted mean of the sequence sums
    assert s["kl"] == pytest.approx(s["kl_sequence_mean"] * s["prompts"] / s["tokens"])
    # a threshold override above it passes the same number: the gate compares, it is not fixed
    assert Thresholds(overrides={"kl_divergence": s["kl"] * 2}).evaluate(
        "kl_divergence", s["kl"]).status == "pass"


@pytest.mark.integration
def test_sampler_draws_from_the_model_itself(models):
    """The KV-cached, batched sampler gives the tokens a plain loop gives: a full forward
    per token, softmax at temperature 1, the same generator draws (batch of 1)."""
    import torch

    from realign.backends.trl import _draw, encode_prompt, sample_responses

    _be, pol, _ref = models
    prompts = ["Say hi.", "What is the capital of France?"]
    got = sample_responses(pol, prompts, max_new_tokens=6, seed=7, batch_size=1)
    gen = torch.Generator().manual_seed(7)
    order = sorted(range(2), key=lambda i: -len(encode_prompt(pol.tokenizer, prompts[i])))
    for i in order:
        ids = encode_prompt(pol.tokenizer, prompts[i])
        x = list(ids)
        with torch.no_grad():
            for _ in range(6):
                logits = pol.model(input_ids=torch.tensor([x])).logits[:, -1]
                t = int(_draw(logits, gen)[0])
                x.append(t)
                if t == pol.tokenizer.eos_token_id:
                    break
        assert got[i].input_ids == x and got[i].start == len(ids)
    # seeded, and the global RNG is left alone
    state = torch.random.get_rng_state()
    again = sample_responses(pol, prompts, max_new_tokens=6, seed=7, batch_size=1)
    assert [e.input_ids for e in again] == [e.input_ids for e in got]
    assert torch.equal(state, torch.random.get_rng_state())
    other = sample_responses(pol, prompts, max_new_tokens=6, seed=8, batch_size=1)
    assert [e.input_ids for e in other] != [e.input_ids for e in got]


def test_inverse_cdf_draw_follows_the_distribution():
    torch = pytest.importorskip("torch")
    from realign.backends.trl import _draw

    logits = torch.log(torch.tensor([[0.1, 0.0001, 0.6, 0.2999]])).repeat(4000, 1)
    counts = torch.bincount(_draw(logits, torch.Generator().manual_seed(0)), minlength=4).double() / 4000
    assert counts.tolist() == pytest.approx([0.1, 0.0, 0.6, 0.3], abs=0.03)
    assert (_draw(torch.tensor([[0.0, float("-inf"), 0.0]]).repeat(500, 1),
                  torch.Generator().manual_seed(1)) != 1).all()  # zero probability: never drawn


def test_no_heldout_rows_outside_the_probe_is_unmeasured_not_a_pass():
    from types import SimpleNamespace

    from realign.stages.dpo import _kl_gate, _margin_gate

    ctx = SimpleNamespace(thresholds=Thresholds())
    held = {"sampled": None, "teacher_forced": None, "margin": None}
    final = {"step": 4, "kl": 0.0, "heldout_margin": 1.0}
    for gate in (_kl_gate(ctx, held, final, 0, 16), _margin_gate(ctx, held, final, 0.1, 0, 16)):
        assert gate.status == "unmeasured" and gate.value is None
        assert "probe_size" in gate.detail and "16 pairs" in gate.detail


# ---------------------------------------------------------------- in the stage


@pytest.mark.integration
def test_stage5_gate_fails_when_the_selected_model_drifted_off_the_probe(tiny_model_path, tmp_path,
                                                                        monkeypatch):
    """A probe that misses the drift (its KL reads 0: the checks pass, a drifted checkpoint
    is selected) cannot pass the gate: the gate samples the selected model on other
    held-out prompts. With a threshold override below the drift, kl_divergence fails."""
    import realign.backends.trl_train as tt
    from realign.config import RunConfig
    from realign.kl_monitor import KLMonitor
    from realign.pipeline import create_run, run_stages

    monkeypatch.setattr(tt, "ref_cache_dir", lambda: tmp_path)
    measure = KLMonitor.measure

    def blind(self, model, step):
        return {**measure(self, model, step), "kl": 0.0, "passed": True}

    monkeypatch.setattr(KLMonitor, "measure", blind)
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join((ROOT / "examples" / "pairs.jsonl").read_text().splitlines()[:300]) + "\n")
    run = create_run(RunConfig(
        model=str(tiny_model_path), data=str(data), output_dir=str(tmp_path / "runs"), run_id="drift",
        eval_sets=[str(ROOT / "examples" / "eval.jsonl")],
        stages=["preference_data", "reference_init", "dpo"],
        thresholds={"min_pairs": 100, "kl_divergence": 1e-3},
        dpo={"max_steps": 4, "batch_size": 2, "learning_rate": 1e-2, "max_length": 48, "save_every": 100},
        kl_monitor={"every": 2, "probe_size": 4, "batch_size": 4, "gate_prompts": 6,
                    "gate_max_new_tokens": 12, "gate_pairs": 12}))
    status = run_stages(run)
    v = next(s.verdict for s in status.stages if s.name == "dpo")
    assert v is not None and v.findings["selected_step"] > 0  # the blind probe let it through
    g = v.gate("kl_divergence")
    held = v.findings["heldout_gates"]
    assert g.status == "fail" and g.value == held["sampled"]["kl"] > 1e-3
    assert g.overridden and status.state == "failed"
    assert "sampled from the policy" in g.detail and "teacher-forced" in g.detail
    # the teacher-forced figure and the sequence-level sum sit beside it
    assert held["teacher_forced"]["kl"] > 0 and held["sampled"]["kl_sequence_mean"] > 0
    assert held["sampled"]["prompts"] == 6 and held["margin"]["pairs"] == 12
    assert held["sampled"]["temperature"] == 1.0 and held["seconds"]["total"] > 0
    assert v.findings["timings"]["heldout_gates"] >= held["seconds"]["total"] * 0.99
    m = v.gate("reward_margin")
    assert m.value == held["margin"]["mean"] and m.ci95 is not None
    # the gate rows are disjoint from the probe (by prompt) and come after it in the split
    d2, d3 = run / "stages" / "2-preference_data", run / "stages" / "3-reference_init"
    probe = [json.loads(x) for x in (d3 / "kl_probe.jsonl").read_text().splitlines()]
    heldout = [json.loads(x) for x in (d2 / "heldout.jsonl").read_text().splitlines()]
    rows = gate_rows(heldout, probe)
    assert held["heldout_outside_probe"] == len(rows) >= 12 and held["probe_pairs"] == len(probe)
    assert not {prompt_key(r["prompt"]) for r in probe} & {prompt_key(r["prompt"]) for r in rows}


def test_gate_prompts_add_heldout_prompts_that_gave_no_pair_never_probe_ones():
    """Generation mode: the KL gate samples from held-out prompts too (a prompt whose
    samples all scored the same gave no pair but still measures the drift)."""
    from realign.kl_probe import gate_prompts

    probe = [{"prompt": "p0"}, {"prompt": "p1"}]
    rest = [{"prompt": "p2"}, {"prompt": "p2"}, {"prompt": "p3"}]
    assert gate_prompts(rest, ["p1", "p4", "p3", "p5"], probe, 10) == ["p2", "p3", "p4", "p5"]
    assert gate_prompts(rest, ["p4"], probe, 2) == ["p2", "p3"]
    assert gate_prompts([], [], probe, 5) == []


def test_detector_warnings_fire_on_their_signals_and_only_then():
    """The stage-5 detectors (shared by the TRL and MLX rounds): displacement, saturation,
    length exploitation, each breach, then the monitor's own warnings."""
    from types import SimpleNamespace

    from realign.dpo_round import detector_warnings
    from realign.kl_monitor import LENGTH_GROWTH, SATURATION_LOSS

    def check(step, logp, margin, acc):
        return {"step": step, "heldout_chosen_logp": logp, "heldout_margin": margin,
                "heldout_accuracy": acc}

    calm = SimpleNamespace(checks=[check(0, -10, 0, 0.5), check(5, -10.1, 0.1, 0.75)],
                           trl_logs=[{"loss": 0.6}, {"loss": 0.5}], actions=[], warnings=[])
    assert detector_warnings(calm, 0.1, 10.0, 10.0) == []
    bad = SimpleNamespace(
        checks=[check(0, -10, 0, 0.5), check(5, -20, 1.0, 0.9), check(10, -30, 2.0, 1.0)],
        trl_logs=[{"loss": 0.3}, {"loss": SATURATION_LOSS / 2}],
        actions=[{"step": 5, "kl": 0.25, "action": "rollback"}], warnings=["from the monitor"])
    w = detector_warnings(bad, 0.1, 10.0, 10.0 * LENGTH_GROWTH + 1)
    assert [x.split(":")[0] for x in w[:3]] == ["likelihood displacement", "saturation",
                                                 "length exploitation"]
    assert w[3] == "KL breach at step 5 (KL 0.2500 > 0.1): rollback"
    assert w[4] == "from the monitor" and len(w) == 5
    # at exactly LENGTH_GROWTH x the reference, no length warning
    assert not any(x.startswith("length") for x in detector_warnings(bad, 0.1, 10.0, 10.0 * LENGTH_GROWTH))
