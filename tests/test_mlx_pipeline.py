"""Stages 1, 3 and 5 on the MLX backend from the run config (``backend: mlx``, issue 16
item 3) on the tiny random model: the same pipeline, gates and verdict fields as TRL,
the backend recorded in every verdict; the saved model loads in both backends; the MLX
checkpoint completion marker. Skipped where mlx / mlx-lm are missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from realign.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def _config(tmp: Path, model: Path, backend: str = "mlx", **dpo) -> RunConfig:
    data = tmp / "pairs.jsonl"
    lines = (ROOT / "examples" / "pairs.jsonl").read_text().splitlines()[:300]
    data.write_text("\n".join(lines) + "\n")
    return RunConfig(
        model=str(model), data=str(data), output_dir=str(tmp / "runs"), score_scale="1-10",
        backend=backend, device="cpu",
        stages=["sft_baseline", "preference_data", "reference_init", "dpo"],
        thresholds={"min_pairs": 100, "baseline_perplexity": 1e9},
        sft={"eval_responses": 8},
        dpo={"max_steps": 6, "batch_size": 2, "learning_rate": 1e-3, "max_length": 48,
             "save_every": 2, **dpo},
        kl_monitor={"every": 2, "probe_size": 4, "batch_size": 4, "gate_prompts": 4,
                    "gate_pairs": 8, "gate_max_new_tokens": 8},
    )


def test_auto_resolves_to_trl_on_linux(tmp_path):
    import sys

    from realign.backends import resolve_backend_name
    from realign.stages.context import RunContext
    from realign.gates import Thresholds

    cfg = RunConfig(data="x.jsonl")
    assert cfg.backend == "auto"
    if sys.platform != "darwin":
        assert resolve_backend_name(cfg.backend) == "trl"
        ctx = RunContext(config=cfg, run_dir=tmp_path, thresholds=Thresholds())
        assert ctx.backend_name == "trl"
    assert resolve_backend_name("mlx") == "mlx" and resolve_backend_name("trl") == "trl"


def test_preflight_names_backend_when_mlx_missing(tmp_path, monkeypatch):
    import realign.backends as backends
    from realign.errors import InputError
    from realign.pipeline import preflight

    data = tmp_path / "pairs.jsonl"
    data.write_text((ROOT / "examples" / "pairs.jsonl").read_text().splitlines()[0] + "\n")
    cfg = RunConfig(data=str(data), backend="mlx", output_dir=str(tmp_path / "runs"),
                    stages=["reference_init"])
    monkeypatch.setattr(backends, "mlx_installed", lambda: False)
    with pytest.raises(InputError) as e:
        preflight(cfg)
    assert e.value.field == "backend"
    assert "pip install -e '.[mlx]'" in str(e.value)
    # trl needs no mlx; a stage that never runs on the backend needs none either
    preflight(cfg.model_copy(update={"backend": "trl"}))
    preflight(cfg.model_copy(update={"stages": ["preference_data"]}))


@pytest.fixture(scope="module")
def mlx_run(tmp_path_factory, tiny_model_path):
    """Stages 1, 2, 3 and 5 with backend: mlx on the tiny model (one run, shared)."""
    pytest.importorskip("mlx.core", reason="backend mlx needs mlx (pip install -e '.[mlx]')")
    pytest.importorskip("mlx_lm", reason="backend mlx needs mlx-lm (pip install -e '.[mlx]')")
    from realign.pipeline import create_run, preflight, run_stages

    tmp = tmp_path_factory.mktemp("mlx-pipe")
    cfg = _config(tmp, tiny_model_path)
    preflight(cfg)
    run_dir = create_run(cfg)
    status = run_stages(run_dir, stages=["sft_baseline", "preference_data", "reference_init", "dpo"])
    return run_dir, status


def _verdict(run_dir: Path, stage: str) -> dict:
    from realign.rundir import RunDir

    v = RunDir(run_dir).read_verdict(stage)
    assert v is not None, stage
    return v.model_dump(mode="json")


def test_mlx_stages_pass_through_the_pipeline(mlx_run):
    run_dir, status = mlx_run
    assert status.state in ("passed", "incomplete"), status
    for stage in ("sft_baseline", "reference_init", "dpo"):
        b = _verdict(run_dir, stage)["findings"]["backend"]
        assert b["name"] == "mlx", (stage, b)
        assert b["versions"]["mlx"] and b["versions"]["mlx-lm"]
    # stage 2 runs on PyTorch whatever the config says
    assert _verdict(run_dir, "preference_data")["findings"]["backend"]["name"] == "trl"
    s3 = _verdict(run_dir, "reference_init")
    g = {x["name"]: x for x in s3["gates"]}["initial_kl"]
    assert g["status"] == "pass" and g["value"] is not None and abs(g["value"]) < 1e-6
    s1 = _verdict(run_dir, "sft_baseline")
    ppl = {x["name"]: x for x in s1["gates"]}["baseline_perplexity"]["value"]
    assert ppl is not None and 1.0 < ppl < 1e6


def test_mlx_stage5_gates_measured_and_model_saved(mlx_run):
    run_dir, _ = mlx_run
    v = _verdict(run_dir, "dpo")
    gates = {x["name"]: x for x in v["gates"]}
    kl = gates["kl_divergence"]
    assert kl["status"] != "unmeasured" and kl["value"] is not None and kl["value"] >= 0
    assert gates["reward_margin"]["value"] is not None
    f = v["findings"]
    assert f["global_step"] == 6
    assert [c["step"] for c in f["checks"]] == [0, 2, 4, 6]
    assert f["checks"][0]["kl"] < 1e-6  # step 0 is the reference
    assert f["checks"][-1]["kl"] > 0  # lr 1e-3 moves the policy
    assert f["selected_step"] in (0, 2, 4, 6)
    assert f["ref_logp_cache"]["method"] == "mlx"
    # the checkpoints carry the completion marker and the monitor state
    from realign.rundir import RunDir

    ckpts = sorted((RunDir(run_dir).stage_dir("dpo") / "checkpoints").glob("checkpoint-*"))
    assert ckpts and all((c / "realign_complete.json").is_file() for c in ckpts)
    assert all((c / "realign_monitor.json").is_file() for c in ckpts)


def test_mlx_saved_model_loads_in_both_backends(mlx_run):
    from realign.backends.mlx import MLXBackend
    from realign.backends.trl import TRLBackend

    run_dir, _ = mlx_run
    v = _verdict(run_dir, "dpo")
    saved = Path(v["artifacts"]["model"])
    s3 = _verdict(run_dir, "reference_init")["artifacts"]
    probe = [json.loads(x) for x in Path(s3["kl_probe"]).read_text().splitlines()]
    prompts, chosen = [r["prompt"] for r in probe], [r["chosen"] for r in probe]
    a = MLXBackend().load(saved, device="cpu")
    b = TRLBackend().load(saved, device="cpu")
    la = MLXBackend().completion_logprobs(a, prompts, chosen, max_length=48).sums
    lb = TRLBackend().completion_logprobs(b, prompts, chosen, max_length=48).sums
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-3 * max(1.0, max(abs(x) for x in lb))
    # the trained model differs from the reference: the saved weights are the policy's
    ref = MLXBackend().load(s3["reference_model"], device="cpu")
    lr = MLXBackend().completion_logprobs(ref, prompts, chosen, max_length=48).sums
    sel = v["findings"]["selected_step"]
    if sel != 0:
        assert max(abs(x - y) for x, y in zip(la, lr)) > 1e-4
    # an MLX checkpoint (full fine-tuning) is a model folder too: stage 7's rollback
    # re-evaluates complete stage-5 checkpoints with PyTorch
    from realign.backends.trl_train import complete_checkpoints
    from realign.rundir import RunDir

    ck = complete_checkpoints(RunDir(run_dir).stage_dir("dpo") / "checkpoints")[-1]
    c = TRLBackend().completion_logprobs(TRLBackend().load(ck, device="cpu"), prompts, chosen,
                                         max_length=48).sums
    assert all(abs(x) > 0 for x in c) and len(c) == len(prompts)
    m = MLXBackend().completion_logprobs(MLXBackend().load(ck, device="cpu"), prompts, chosen,
                                         max_length=48).sums
    assert max(abs(x - y) for x, y in zip(c, m)) < 1e-3 * max(1.0, max(abs(x) for x in m))
    if ck.name == f"checkpoint-{sel}":  # the selected step is the saved model
        assert max(abs(x - y) for x, y in zip(c, lb)) < 1e-4 * max(1.0, max(abs(x) for x in lb))


def test_mlx_checkpoint_without_marker_is_not_resumed(tiny_model_path, tmp_path):
    """A save cut short (the marker, written last, missing) is never resumed from: the
    newest complete checkpoint is, and resume removes the incomplete one."""
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from realign.backends.base import DPOSettings
    from realign.backends.mlx import MLXBackend, make_policy
    from realign.backends.mlx_dpo import MLXDPOTrainer, StepAction, latest_checkpoint
    from realign.backends.trl_train import CHECKPOINT_COMPLETE

    ref = MLXBackend().load(tiny_model_path, device="cpu")
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "chosen": [{"role": "assistant", "content": f"It is {2 * i}."}],
             "rejected": [{"role": "assistant", "content": f"Maybe {3 * i}."}]} for i in range(6)]
    s = DPOSettings(beta=0.1, learning_rate=1e-3, per_device_batch_size=2, max_steps=4, max_length=48)
    out = tmp_path / "ckpt"
    order: list[str] = []
    tr = MLXDPOTrainer(make_policy(ref), ref, rows, s, output_dir=out, save_every=1, save_total_limit=5,
                       use_cache=False, callback=lambda step, m: StepAction(stop=True) if step == 3 else None,
                       on_save=lambda folder, step: order.append(
                           f"hook:{step}:{(folder / CHECKPOINT_COMPLETE).exists()}"))
    tr.train()
    # the hook (the KL monitor's state) runs before the marker exists
    assert order == ["hook:1:False", "hook:2:False", "hook:3:False"]
    assert all((out / f"checkpoint-{k}" / CHECKPOINT_COMPLETE).is_file() for k in (1, 2, 3))
    assert latest_checkpoint(out).name == "checkpoint-3"
    (out / "checkpoint-3" / CHECKPOINT_COMPLETE).unlink()  # killed before the marker
    assert latest_checkpoint(out).name == "checkpoint-2"
    assert (out / "checkpoint-3").is_dir()
    assert latest_checkpoint(out, remove_incomplete=True).name == "checkpoint-2"
    assert not (out / "checkpoint-3").exists()
    resumed = MLXDPOTrainer(make_policy(ref), ref, rows, s, output_dir=out, save_every=100,
                            use_cache=False)
    res = resumed.train(resume_from=latest_checkpoint(out))
    assert [r["step"] for r in res.log_history] == [1, 2, 3, 4]  # steps 3-4 trained again
    assert res.global_step == 4


def test_mlx_round_resumes_from_complete_checkpoint_only(mlx_run, tmp_path):
    """Stage 5 on MLX rerun in a copy of the run: with the newest checkpoint's marker
    removed it resumes from the one before (and says so), continuing the monitor's history."""
    import shutil

    from realign.pipeline import run_stages
    from realign.rundir import RunDir

    run_dir, _ = mlx_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    out = RunDir(copy).stage_dir("dpo")
    (out / "verdict.json").unlink()
    (out / "checkpoints" / "checkpoint-6" / "realign_complete.json").unlink()
    status = run_stages(copy, stages=["dpo"])
    assert status.state in ("passed", "incomplete"), status
    v = _verdict(copy, "dpo")
    assert v["findings"]["resumed_from_step"] == 4
    assert any("removed incomplete checkpoint(s) checkpoint-6" in w and "resumed from checkpoint-4" in w
               for w in v["warnings"])
    assert [c["step"] for c in v["findings"]["checks"]] == [0, 2, 4, 6]
    assert v["findings"]["global_step"] == 6


def test_mlx_iterative_round(tiny_model_path, tmp_path):
    """Stage 6 with backend: mlx: its DPO round trains on MLX (the verdict says so), the
    saved iteration model loads in PyTorch, where it is measured."""
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from realign.pipeline import create_run, run_stages

    check = [{"id": "length_constraints:number_words", "kwargs": {"num_words": 9, "relation": "at least"}}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"prompt": f"Write a few words about object number {i}.",
                    "instructions": check, "answer": f"Object {i}."}) + "\n" for i in range(40)))
    cfg = RunConfig(
        model=str(tiny_model_path), prompts=str(prompts), output_dir=str(tmp_path / "runs"),
        run_id="it", backend="mlx", device="cpu",
        stages=["sft_baseline", "preference_data", "reference_init", "dpo", "iterative"],
        thresholds={"min_pairs": 2, "baseline_perplexity": 1e9, "kl_divergence": 100,
                    "win_rate": -1, "length_ratio": 0, "distinct_ratio": 0, "prompt_echo": 1,
                    "reward_margin": -1e9, "length_bias": 1},
        heldout={"fraction": 0.25, "min_pairs": 4},
        generation={"samples": 4, "max_new_tokens": 12, "batch_size": 32},
        dpo={"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "max_length": 48, "save_every": 2},
        kl_monitor={"every": 2, "probe_size": 2, "batch_size": 4, "gate_prompts": 4,
                    "gate_max_new_tokens": 8},
        evaluation={"max_new_tokens": 12, "n_boot": 200},
        iterative={"max_iterations": 1, "patience": 5, "max_steps": 2, "eval_prompts": 8,
                   "prompts_per_iteration": 16},
    )
    run = create_run(cfg)
    st = run_stages(run)
    v = next(s.verdict for s in st.stages if s.name == "iterative")
    assert v is not None, st
    assert v.findings["backend"]["name"] == "mlx"
    assert v.findings["measurement_backend"]["name"] == "trl"
    its = v.findings["iterations"]
    assert [r["iteration"] for r in its] == [0, 1]
    assert its[1]["dpo"]["steps"] == 2 and Path(its[1]["model"]).is_dir()
    assert its[1]["kl"]["sampled"]["kl"] >= 0  # measured on PyTorch from the MLX-saved folder
    # the round's checkpoints are MLX's (optimizer.safetensors) with the completion marker
    ck = Path(its[1]["model"]).parent / "checkpoints"
    assert all((c / "optimizer.safetensors").is_file() and (c / "realign_complete.json").is_file()
               for c in ck.glob("checkpoint-*")) and any(ck.glob("checkpoint-*"))


@pytest.mark.parametrize("policy", ["rollback", "halve_lr", "stop"])
def test_mlx_breach_policy_acts(mlx_run, tmp_path, policy):
    """A learning rate of 0.5 breaches the KL gate on MLX; the monitor acts by
    kl_monitor.on_breach through the trainer's step callback: rollback and halve_lr halve
    the learning rate from the next step on, stop ends training; the selected check passed."""
    import shutil

    from realign.pipeline import run_stages
    from realign.rundir import RunDir

    run_dir, _ = mlx_run
    copy = tmp_path / policy
    shutil.copytree(run_dir, copy)
    run = json.loads((copy / "run.json").read_text())
    run["config"]["dpo"].update({"learning_rate": 0.5, "max_steps": 8})
    run["config"]["kl_monitor"].update({"every": 2, "on_breach": policy, "max_breaches": 2})
    (copy / "run.json").write_text(json.dumps(run))
    status = run_stages(copy, stages=["dpo"], force=True)
    v = next(s.verdict for s in status.stages if s.name == "dpo")
    assert v.findings["backend"]["name"] == "mlx"
    actions = v.findings["breach_actions"]
    assert actions, "a learning rate of 0.5 must breach the KL gate"
    assert actions[0]["action"] == policy
    assert any("KL breach" in w for w in v.warnings)
    selected = next(c for c in v.findings["checks"] if c["step"] == v.findings["selected_step"])
    assert selected["passed"] and v.gate("kl_divergence").status == "pass"
    logs = {r["step"]: r for r in map(json.loads, RunDir(copy).metrics_path("dpo").read_text().splitlines())
            if r.get("event") == "train_log"}
    b = actions[0]["step"]
    if policy == "stop":
        assert v.findings["global_step"] == b < 8
    else:
        assert len(actions) <= 2
        # linear schedule: lr of optimizer step s (0-based) = 0.5 (1 - s/8); halved after b
        assert logs[b]["learning_rate"] == pytest.approx(0.5 * (1 - (b - 1) / 8))
        assert logs[b + 1]["learning_rate"] == pytest.approx(0.25 * (1 - b / 8))


def test_mlx_lora_stages_3_and_5(mlx_run, tmp_path):
    """dpo.lora (PEFT keys) on MLX: stage 3 builds the LoRA policy (it starts at the
    reference: KL 0, only the adapters train), stage 5 trains it and saves the merged
    model, a full safetensors folder transformers loads."""
    import shutil

    from realign.backends.trl import TRLBackend
    from realign.pipeline import run_stages

    run_dir, _ = mlx_run
    copy = tmp_path / "lora"
    shutil.copytree(run_dir, copy)
    run = json.loads((copy / "run.json").read_text())
    run["config"]["dpo"].update({"lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                                 "learning_rate": 1e-2})
    (copy / "run.json").write_text(json.dumps(run))
    status = run_stages(copy, stages=["reference_init", "dpo"], force=True)
    by = {s.name: s.verdict for s in status.stages}
    s3, s5 = by["reference_init"], by["dpo"]
    assert s3.artifacts["policy"] == "lora" and s3.gate("initial_kl").value < 1e-6
    full = _verdict(run_dir, "reference_init")["artifacts"]["trainable_parameters"]
    assert 0 < s3.artifacts["trainable_parameters"] < full / 10  # adapters only
    assert s5.findings["backend"]["name"] == "mlx"
    assert s5.findings["checks"][-1]["kl"] > 0  # the adapters moved the policy
    saved = Path(s5.artifacts["model"])
    assert (saved / "config.json").is_file() and not (saved / "adapter_config.json").exists()
    h = TRLBackend().load(saved, device="cpu")
    assert h.model.config.vocab_size > 0


def test_preflight_refuses_what_mlx_cannot_train(tmp_path):
    """backend: mlx with a TRL-only loss, dpo.extra key or the SFT fine-tune is refused
    before the run directory exists, naming the field."""
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from realign.errors import InputError
    from realign.pipeline import preflight

    data = tmp_path / "pairs.jsonl"
    data.write_text((ROOT / "examples" / "pairs.jsonl").read_text().splitlines()[0] + "\n")
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "Hi", "completion": "Hello."}) + "\n")
    base = dict(data=str(data), backend="mlx", output_dir=str(tmp_path / "runs"))
    preflight(RunConfig(**base, stages=["dpo"], dpo={"loss_type": ["sigmoid", "sft"],
                                                     "extra": {"disable_dropout": True}}))
    for kw, field in ((dict(stages=["dpo"], dpo={"loss_type": "robust"}), "dpo.loss_type"),
                      (dict(stages=["iterative"], dpo={"extra": {"label_smoothing": 0.1}}), "dpo.extra"),
                      (dict(stages=["sft_baseline"], sft={"dataset": str(sft)}), "sft.dataset")):
        with pytest.raises(InputError) as e:
            preflight(RunConfig(**base, **kw))
        assert e.value.field == field, (kw, e.value)
        # the same config runs on TRL
        preflight(RunConfig(**{**base, "backend": "trl"}, **kw))


def test_mlx_measurements_match_trl_on_the_same_models(mlx_run, tmp_path):
    """The numbers the MLX stages gate on equal the TRL path's on the same weights: stage
    1's perplexity (a TRL run of stage 1 on the same config) and stage 5's held-out margin
    and teacher-forced KL (measure_heldout with each backend on the saved MLX model
    against the reference). The sampled KL uses each framework's random draws: both are
    finite, non-negative and of the same order."""
    from realign.backends.mlx import MLXBackend
    from realign.backends.trl import TRLBackend
    from realign.fileio import read_jsonl
    from realign.kl_monitor import measure_heldout
    from realign.kl_probe import distinct_prompts, gate_rows
    from realign.pipeline import create_run, run_stages
    from realign.rundir import load_run_config

    run_dir, _ = mlx_run
    cfg = load_run_config(run_dir).model_copy(update={"backend": "trl", "run_id": "trl-s1",
                                                       "output_dir": str(tmp_path / "runs")})
    trl_run = create_run(cfg)
    run_stages(trl_run, stages=["sft_baseline"])
    p_mlx = _verdict(run_dir, "sft_baseline")["gates"][0]["value"]
    p_trl = _verdict(trl_run, "sft_baseline")["gates"][0]["value"]
    assert _verdict(trl_run, "sft_baseline")["findings"]["backend"]["name"] == "trl"
    assert p_mlx == pytest.approx(p_trl, rel=1e-3)

    s2, s3 = _verdict(run_dir, "preference_data")["artifacts"], _verdict(run_dir, "reference_init")["artifacts"]
    saved = _verdict(run_dir, "dpo")["artifacts"]["model"]
    probe = read_jsonl(Path(s3["kl_probe"]))
    rest = gate_rows(read_jsonl(Path(s2["heldout"])), probe)
    pairs, prompts = rest[:8], distinct_prompts(rest, 2)
    got = {}
    for b in (MLXBackend(), TRLBackend()):
        got[b.name] = measure_heldout(b, b.load(saved, device="cpu"), b.load(s3["reference_model"], device="cpu"),
                                      prompts=prompts, pairs=pairs, beta=0.1, max_new_tokens=8, seed=0,
                                      batch_size=4, max_length=48)
    m, t = got["mlx"], got["trl"]
    assert m["margin"]["mean"] == pytest.approx(t["margin"]["mean"], abs=1e-4)
    assert m["margin"]["accuracy"] == t["margin"]["accuracy"]
    assert m["teacher_forced"]["kl"] == pytest.approx(t["teacher_forced"]["kl"], rel=1e-3, abs=1e-6)
    assert m["teacher_forced"]["tokens"] == t["teacher_forced"]["tokens"]
    for x in (m, t):
        assert 0 <= x["sampled"]["kl"] < 10 and x["sampled"]["prompts"] == 2
    # the sampled KL is the same function of the samples on both backends
    from realign.backends import mlx as bm
    from realign.backends import trl as bt

    pol, ref = MLXBackend().load(saved, device="cpu"), MLXBackend().load(s3["reference_model"], device="cpu")
    samples = bm.sample_responses(pol, prompts, max_new_tokens=8, seed=3, max_length=48)
    again = bm.sample_responses(pol, prompts, max_new_tokens=8, seed=3, max_length=48)
    assert [s.input_ids for s in samples] == [s.input_ids for s in again]  # seeded
    eos = pol.tokenizer.eos_token_id
    for s in samples:
        new = s.input_ids[s.start:]
        assert 1 <= len(new) <= 8 and (eos not in new or new.index(eos) == len(new) - 1)
    k_m = bm.kl_on_probe(pol, ref, encoded=samples, batch_size=4)
    tp, tr = TRLBackend().load(saved, device="cpu"), TRLBackend().load(s3["reference_model"], device="cpu")
    k_t = bt.kl_on_probe(tp, tr, encoded=samples, batch_size=4)
    assert k_m.mean == pytest.approx(k_t.mean, rel=1e-3, abs=1e-6) and k_m.counts == k_t.counts
