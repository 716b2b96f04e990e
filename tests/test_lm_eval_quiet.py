"""lm-eval's own output stays out of realign's (issue 17, item 5): its tqdm progress bars
and the "fatal: not a git repository" line of its ``git describe`` call (stderr of a
subprocess: only ``capfd`` sees it) are silenced while realign runs it, and put back
afterwards."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("lm_eval", reason="needs the eval extra (lm-eval)")

from realign.evaluation import _quiet_lm_eval  # noqa: E402


def test_silencing_helper(tmp_path, monkeypatch, capfd):
    import lm_eval.api.model as api_model
    import lm_eval.evaluator as evaluator
    import tqdm

    monkeypatch.chdir(tmp_path)  # not a git checkout
    capfd.readouterr()
    with _quiet_lm_eval(False):
        for _ in api_model.tqdm(range(50), desc="Tokenizing inputs"):
            pass
        evaluator.get_git_commit_hash()
        with _quiet_lm_eval(False):  # nested (stage 7 inside a pipeline job)
            pass
        assert api_model.tqdm is not tqdm.tqdm  # still silenced after the inner one
    err = capfd.readouterr().err
    assert "Tokenizing inputs" not in err and "it/s" not in err
    assert "fatal" not in err
    # restored: outside realign's use, lm-eval behaves as before
    assert api_model.tqdm is tqdm.tqdm
    assert evaluator.get_git_commit_hash.__module__ == "lm_eval.loggers.utils"
    if shutil.which("git"):
        evaluator.get_git_commit_hash()
        assert "not a git repository" in capfd.readouterr().err


@pytest.mark.integration
def test_evaluate_model_prints_nothing(tiny_model_path, tmp_path, monkeypatch, capfd, one_thread):
    from realign.evaluation import evaluate_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    res = evaluate_model(model, tok, ["realign_knowledge", "realign_arith"], limit=3, batch_size=4)
    out, err = capfd.readouterr()
    assert set(res.suites) == {"realign_knowledge", "realign_arith"}
    assert "fatal: not a git repository" not in err
    assert "it/s" not in err and "%|" not in err, err
    assert out == ""
