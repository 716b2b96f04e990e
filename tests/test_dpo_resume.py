"""Crash safety of stage 5 (issue 14, items 7 and 9): a checkpoint cut short is never
resumed from, and a resumed run keeps the KL-check history and the best passing check
found before the kill."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- which checkpoint resumes


def _ckpt(root: Path, step: int, *, marker: bool = False, state: str | None = None,
          weights: bool = True) -> Path:
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    if weights:
        (d / "model.safetensors").write_bytes(b"w")
    if state is not None:
        (d / "trainer_state.json").write_text(state)
    if marker:
        from realign.backends.trl_train import CHECKPOINT_COMPLETE

        (d / CHECKPOINT_COMPLETE).write_text(json.dumps({"step": step}))
    return d


def test_resume_takes_the_newest_complete_checkpoint_and_removes_partial_ones(tmp_path):
    pytest.importorskip("transformers")
    from realign.backends.trl_train import complete_checkpoints, resume_checkpoint

    root = tmp_path / "checkpoints"
    ok = _ckpt(root, 3, marker=True, state='{"global_step": 3}')
    _ckpt(root, 6)  # killed while writing: weights, nothing else
    _ckpt(root, 9, state='{"global_step": 9}')  # trainer state written, marker not
    (root / "checkpoint-x").mkdir()  # not a checkpoint name: left alone
    assert complete_checkpoints(root) == [ok]
    got, removed = resume_checkpoint(root)
    assert got == ok and removed == ["checkpoint-6", "checkpoint-9"]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-3", "checkpoint-x"]
    # nothing complete at all: start over
    empty = tmp_path / "empty"
    _ckpt(empty, 2)
    assert resume_checkpoint(empty) == (None, ["checkpoint-2"])
    assert resume_checkpoint(tmp_path / "missing") == (None, [])


def test_checkpoints_written_before_the_marker_need_a_whole_trainer_state(tmp_path):
    pytest.importorskip("transformers")
    from realign.backends.trl_train import resume_checkpoint

    root = tmp_path / "checkpoints"
    _ckpt(root, 4, state='{"global_step": 4}')
    _ckpt(root, 8, state='{"global_st')  # cut short while written
    _ckpt(root, 12, state='{"global_step": 12}', weights=False)
    got, removed = resume_checkpoint(root, remove_incomplete=False)
    assert got == root / "checkpoint-4" and removed == ["checkpoint-12", "checkpoint-8"]
    assert (root / "checkpoint-8").exists()  # remove_incomplete=False keeps them


# ---------------------------------------------------------------- the monitor's state


@pytest.fixture(scope="module")
def monitor_parts(tiny_model_path):
    pytest.importorskip("torch")
    from realign.backends.trl import TRLBackend, make_policy
    from realign.rows import to_trl_row

    be = TRLBackend()
    ref = be.load(tiny_model_path, device="cpu")
    for p in ref.model.parameters():
        p.requires_grad_(False)
    probe = [to_trl_row(json.loads(x)) for x in
             (ROOT / "examples" / "pairs.jsonl").read_text().splitlines()[:3]]
    return be, ref, probe, make_policy


def _monitor(be, ref, probe, state_dir, lora=False):
    from realign.kl_monitor import KLMonitor

    return KLMonitor(backend=be, ref=ref, probe=probe, beta=0.1, threshold=0.05, every=2,
                     on_breach="rollback", max_breaches=5, batch_size=4, max_length=48,
                     log=lambda r: None, progress=lambda *a: None, initial_kl=0.0,
                     initial_threshold=1e-4,
                     reference_weights=None if lora else dict(ref.model.named_parameters()),
                     state_dir=state_dir)


@pytest.mark.integration
@pytest.mark.parametrize("lora", [False, True])
def test_monitor_state_round_trips_through_a_checkpoint(monitor_parts, tmp_path, lora):
    """Checks, breaches, the best and the last passing check (their weights from the
    reference, from the checkpoint itself, or from the saved file) survive a restart."""
    import torch

    be, ref, probe, make_policy = monitor_parts
    policy = make_policy(ref.model, {"r": 4, "target_modules": ["q_proj", "v_proj"]} if lora else None)
    run = tmp_path
    m = _monitor(be, ref, probe, run, lora)
    m.start(policy)
    trainable = [p for p in policy.parameters() if p.requires_grad]

    def nudge(scale):
        with torch.no_grad():
            for p in trainable:
                p.add_(torch.randn_like(p) * scale)

    torch.manual_seed(0)
    nudge(1e-3)
    m.check(policy, 2)
    nudge(1e-3)
    m.check(policy, 4)
    nudge(1e-3)
    m.threshold = -1.0  # any KL breaches: rolled back to step 4
    m.check(policy, 6)
    m.threshold = 0.05
    assert [c["passed"] for c in m.checks] == [True, True, True, False] and m.breaches == 1
    assert m.last_good_step == 4
    best_step = m.best[1]
    # the persisted files follow every check
    assert [c["step"] for c in json.loads((run / "checks.json").read_text())] == [0, 2, 4, 6]
    assert json.loads((run / "monitor_state.json").read_text())["best"]["step"] == best_step
    want_best = {n: t.clone() for n, t in m.best[2].items()}
    want_good = {n: t.clone() for n, t in m.last_good.items()}

    folder = run / "checkpoints" / "checkpoint-7"
    folder.mkdir(parents=True)
    m.save_checkpoint_state(folder, 7)
    # a new process: a fresh monitor, the policy as the checkpoint left it (rolled back to 4)
    m2 = _monitor(be, ref, probe, run / "again", lora)
    assert m2.load_checkpoint_state(folder, run) and m2.resumed_from == 7
    m2._resolve_pending(policy)
    assert [c["step"] for c in m2.checks] == [0, 2, 4, 6] and m2.breaches == 1
    assert m2.actions == m.actions and m2.best[1] == best_step and m2.last_good_step == 4
    for want, got in ((want_best, m2.best[2]), (want_good, m2.last_good)):
        assert want.keys() == got.keys()
        for n in want:
            assert torch.equal(want[n].cpu(), got[n].cpu()), n
    # the state names where each set of weights lives
    st = json.loads((folder / "realign_monitor.json").read_text())
    assert st["last_good"]["weights"] == "step4" and st["step"] == 7
    if best_step == 0:
        assert st["best"]["weights"] == ("step0" if lora else "reference")


@pytest.mark.integration
def test_checkpoint_at_a_passing_check_holds_its_own_weights(monitor_parts, tmp_path):
    import torch

    be, ref, probe, make_policy = monitor_parts
    policy = make_policy(ref.model, None)
    m = _monitor(be, ref, probe, tmp_path)
    m.start(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    m.check(policy, 2)
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    m.save_checkpoint_state(folder, 2)
    st = json.loads((folder / "realign_monitor.json").read_text())
    assert st["last_good"]["weights"] == "checkpoint"
    assert not (folder / "realign_monitor.safetensors").exists() or st["best"]["weights"] != "checkpoint"


# ---------------------------------------------------------------- kill during a save


def _config(tmp: Path, model: Path):
    from realign.config import RunConfig

    data = tmp / "pairs.jsonl"
    data.write_text("\n".join((ROOT / "examples" / "pairs.jsonl").read_text().splitlines()[:300]) + "\n")
    return RunConfig(
        model=str(model), data=str(data), output_dir=str(tmp / "runs"), run_id="kill",
        eval_sets=[str(ROOT / "examples" / "eval.jsonl")],
        stages=["preference_data", "reference_init", "dpo"],
        thresholds={"min_pairs": 100},
        dpo={"max_steps": 8, "batch_size": 2, "learning_rate": 1e-3, "max_length": 48, "save_every": 3},
        kl_monitor={"every": 2, "probe_size": 4, "batch_size": 4, "gate_prompts": 4,
                    "gate_max_new_tokens": 8, "gate_pairs": 8},
    )


CHILD = """
import os, signal, sys
from pathlib import Path
import transformers
import realign.backends.trl_train as tt
tt.ref_cache_dir = lambda: Path(sys.argv[2])
original = transformers.Trainer._save_optimizer_and_scheduler
def killed_mid_save(self, output_dir):
    if self.state.global_step >= int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # the weights are written, nothing after them
    return original(self, output_dir)
transformers.Trainer._save_optimizer_and_scheduler = killed_mid_save
from realign.pipeline import run_stages
run_stages(Path(sys.argv[1]))
"""


@pytest.mark.integration
def test_kill_during_checkpoint_save_then_resume(tiny_model_path, tmp_path, monkeypatch):
    import realign.backends.trl_train as tt
    from realign.pipeline import create_run, run_stages, run_status

    cache = tmp_path / "refcache"
    cache.mkdir()
    monkeypatch.setattr(tt, "ref_cache_dir", lambda: cache)
    run_dir = create_run(_config(tmp_path, tiny_model_path))
    assert run_stages(run_dir, stages=["preference_data", "reference_init"]).state == "passed"
    d5 = run_dir / "stages" / "5-dpo"

    proc = subprocess.run([sys.executable, "-c", CHILD, str(run_dir), str(cache), "6"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    ck = d5 / "checkpoints"
    assert (ck / "checkpoint-6" / "model.safetensors").exists()  # cut short mid-save
    assert not (ck / "checkpoint-6" / "trainer_state.json").exists()
    assert (ck / "checkpoint-3" / tt.CHECKPOINT_COMPLETE).exists()
    before = json.loads((d5 / "checks.json").read_text())  # persisted as they happened
    assert [c["step"] for c in before] == [0, 2, 4, 6]
    assert run_status(run_dir).state == "interrupted"

    status = run_stages(run_dir)  # resume
    v = next(s.verdict for s in status.stages if s.name == "dpo")
    assert v is not None and v.findings["global_step"] == 8
    assert v.findings["resumed_from_step"] == 3
    assert any("removed incomplete checkpoint(s) checkpoint-6" in w and "resumed from checkpoint-3" in w
               for w in v.warnings)
    checks = v.findings["checks"]
    assert [c["step"] for c in checks] == [0, 2, 4, 6, 8]
    assert checks[:2] == before[:2]  # the history before the checkpoint is kept, not re-measured
    # the resumed trajectory is the killed one: same data order, same weights at step 4
    assert checks[2]["kl"] == pytest.approx(before[2]["kl"], rel=1e-3)
    events = [json.loads(x) for x in (d5 / "metrics.jsonl").read_text().splitlines()]
    kl_steps = [e["step"] for e in events if e["event"] == "kl_check"]
    assert kl_steps.count(0) == 1 and kl_steps.count(2) == 1  # measured once, before the kill
    assert kl_steps.count(4) == 2  # measured before the kill and again after the resume
    train_steps = [e["step"] for e in events if e["event"] == "train_log" and "loss" in e]
    assert train_steps.count(1) == 1 and train_steps.count(3) == 1 and train_steps.count(4) == 2
    # checkpoints are complete again, and only complete ones were kept by the rotation
    kept = sorted(p.name for p in ck.glob("checkpoint-*"))
    assert kept == ["checkpoint-6", "checkpoint-8"]
    assert all((ck / k / tt.CHECKPOINT_COMPLETE).exists() for k in kept)
    best = max((c for c in checks if c["passed"]), key=lambda c: c["heldout_margin"])
    assert v.findings["selected_step"] == best["step"]
