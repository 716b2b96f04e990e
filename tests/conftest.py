import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import importlib.util  # noqa: E402

import pytest  # noqa: E402

E2E_SKIP_REASON = "end-to-end on the real default model: pass --e2e"


def missing(*modules: str) -> list[str]:
    """The optional packages among ``modules`` that are not installed (nothing is imported)."""
    out = []
    for m in modules:
        try:
            found = importlib.util.find_spec(m) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(m)
    return out


def pytest_addoption(parser):
    parser.addoption("--e2e", action="store_true", default=False,
                     help="also run the end-to-end tests on the real default model "
                          "(marked e2e; minutes). Without it they are skipped.")


def pytest_collection_modifyitems(config, items):
    """Skip e2e-marked tests without --e2e, and tests marked ``needs("torch", ...)`` whose
    packages are not installed (the core package has none of torch, transformers, trl,
    mcp, lm-eval, datasets; see pyproject's extras)."""
    e2e = config.getoption("--e2e")
    for item in items:
        if not e2e and "e2e" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=E2E_SKIP_REASON))
        for mark in item.iter_markers("needs"):
            gone = missing(*mark.args)
            if gone:
                item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(gone)} (not installed)"))


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A tiny random Llama with the SmolLM2 tokenizer (see realign.testing.tiny_model).
    Skips the test when torch or transformers is not installed."""
    for m in ("torch", "transformers"):
        pytest.importorskip(m, reason=f"the tiny model needs {m} (not installed)")
    from realign.testing import tiny_model

    return tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for the module (reproducible timings and batch independence)."""
    torch = pytest.importorskip("torch", reason="needs torch (not installed)")

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def rejected_run(tmp_path):
    """Build a hand-written run directory whose stage 7 rejected the stage-5 policy:
    ``rejected_run(checks, checkpoint_steps, stages=None)`` writes stage 1 (the baseline
    model ``tmp_path/base``), stage 5 (its KL ``checks``, selected step 20, an on-disk
    checkpoint per step) and stage 7 (decision reject), and returns the run directory."""
    from realign.backends.trl_train import CHECKPOINT_COMPLETE
    from realign.config import RunConfig
    from realign.fileio import write_json_atomic
    from realign.gates import Thresholds, make_verdict
    from realign.pipeline import create_run

    def build(checks, checkpoint_steps, stages=None):
        t = Thresholds()
        (tmp_path / "base").mkdir()
        extra = {"stages": stages} if stages else {}
        run = create_run(RunConfig(data=str(tmp_path / "x.jsonl"), model=str(tmp_path / "base"),
                                   output_dir=str(tmp_path / "runs"), run_id="rb", **extra))
        write_json_atomic(run / "stages" / "1-sft_baseline" / "verdict.json", make_verdict(
            "sft_baseline", [], t, artifacts={"model": str(tmp_path / "base")}))
        d5 = run / "stages" / "5-dpo"
        for step in checkpoint_steps:
            ck = d5 / "checkpoints" / f"checkpoint-{step}"
            ck.mkdir(parents=True)
            (ck / "model.safetensors").write_bytes(b"x")
            (ck / CHECKPOINT_COMPLETE).write_text("{}")  # a complete save (stage 5 marks them)
        write_json_atomic(d5 / "verdict.json", make_verdict("dpo", [], t, findings={
            "checks": checks, "selected_step": 20}, artifacts={"model": str(d5 / "model")}))
        gates = [t.evaluate("capability_retention", 0.5),
                 t.evaluate("worst_benchmark_retention", 0.4), t.evaluate("win_rate", 0.6)]
        write_json_atomic(run / "stages" / "7-evaluation" / "verdict.json", make_verdict(
            "evaluation", gates, t, findings={"decision": "reject", "reasons": ["retention"],
                                              "evaluated_model": str(d5 / "model")}))
        return run

    return build


@pytest.fixture()
def ref_cache(tmp_path, monkeypatch):
    """Stage 5's reference log-prob cache in the test's own folder (not REALIGN_HOME)."""
    import realign.backends.trl_train as tt

    d = tmp_path / "refcache"
    d.mkdir()
    monkeypatch.setattr(tt, "ref_cache_dir", lambda: d)
    return d
