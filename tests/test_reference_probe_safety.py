"""Stage 3's reference probe is stored as JSON + safetensors and read only from inside the
run directory (issue 14, item 3): a planted pickle or a path leading out is refused, and
nothing is unpickled."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from realign.errors import InputError
from realign.kl_probe import inside_run_dir, load_reference_probe

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
PROBE = [{"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Rome."},
         {"prompt": "Name three primes.", "chosen": "2, 3 and 5.", "rejected": "4, 6, 8."}]


class _Planted:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def saved(tiny_model_path, tmp_path_factory):
    """A run directory whose stage-3 folder holds a reference probe of the tiny model."""
    pytest.importorskip("torch")
    from realign.backends.trl import TRLBackend
    from realign.kl_probe import save_reference_probe

    run = tmp_path_factory.mktemp("run")
    folder = run / "stages" / "3-reference_init"
    folder.mkdir(parents=True)
    be = TRLBackend()
    ref = be.load(tiny_model_path, device="cpu")
    path = save_reference_probe(be, ref, PROBE, folder / "reference_probe.json", max_length=32,
                                batch_size=2)
    return run, path, be, ref


def test_round_trip_is_json_and_safetensors(saved):
    import torch

    from realign.kl_probe import reference_probe_stats

    run, path, be, ref = saved
    assert json.loads(path.read_text())["format"] == "realign-reference-probe/1"
    assert path.with_suffix(".safetensors").is_file()
    got = load_reference_probe(path, run)
    want = reference_probe_stats(be, ref, PROBE, max_length=32, batch_size=2)
    assert got["ref_chosen"] == pytest.approx(want["ref_chosen"])
    assert got["ref_rejected"] == pytest.approx(want["ref_rejected"])
    assert got["answers"] == want["answers"] and got["max_length"] == 32
    assert len(got["distributions"]) == 2
    for a, b in zip(got["distributions"], want["distributions"]):
        assert torch.equal(a, b)
    # the relative form the stage-3 verdict records resolves against the run directory
    rel = path.relative_to(run)
    assert load_reference_probe(rel, run)["ref_chosen"] == got["ref_chosen"]


def test_planted_pickle_is_refused_and_never_run(saved, tmp_path):
    run, path, _be, _ref = saved
    marker = tmp_path / "executed"
    planted = path.parent / "reference_probe.pt"
    planted.write_bytes(pickle.dumps({"ref_chosen": _Planted(marker)}))
    with pytest.raises(InputError, match="pickles are never loaded"):
        load_reference_probe(planted, run)
    # a pickle under the expected name is not JSON: refused too
    disguised = path.parent / "disguised.json"
    disguised.write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(InputError, match="refused"):
        load_reference_probe(disguised, run)
    assert not marker.exists()


def test_paths_leading_out_of_the_run_dir_are_refused(saved, tmp_path):
    run, path, _be, _ref = saved
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    copy = outside / "reference_probe.json"
    copy.write_text(path.read_text())
    (outside / "reference_probe.safetensors").write_bytes(path.with_suffix(".safetensors").read_bytes())
    for p in (copy, Path(os.path.relpath(copy, run)), run / "stages" / ".." / ".." / copy.name):
        with pytest.raises(InputError, match="outside the run directory"):
            load_reference_probe(p, run)
    link = path.parent / "link.json"
    link.symlink_to(copy)  # inside by name, outside once resolved
    with pytest.raises(InputError, match="outside the run directory"):
        load_reference_probe(link, run)
    with pytest.raises(InputError, match="outside"):
        inside_run_dir("../x", run, what="thing")


def test_tampered_tensor_file_is_refused(saved, tmp_path):
    import shutil

    run, path, _be, _ref = saved
    folder = path.parent / "tampered"
    folder.mkdir()
    shutil.copy(path, folder / path.name)
    t = folder / "reference_probe.safetensors"
    t.write_bytes(path.with_suffix(".safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(InputError, match="sha256"):
        load_reference_probe(folder / path.name, run)
    rec = json.loads(path.read_text())
    rec["distributions"]["file"] = "../../x.safetensors"
    (folder / "bad.json").write_text(json.dumps(rec))
    with pytest.raises(InputError, match="beside it"):
        load_reference_probe(folder / "bad.json", run)
    rec = json.loads(path.read_text())
    rec["ref_chosen"] = ["not a number"]
    (folder / "bad2.json").write_text(json.dumps(rec))
    with pytest.raises(InputError, match="finite numbers"):
        load_reference_probe(folder / "bad2.json", run)


def test_stage5_refuses_a_planted_reference_probe(tiny_model_path, tmp_path):
    """A run directory whose stage-3 verdict points at a pickle (inside the run) or at a
    file outside it: stage 5 stops with an error naming it, and nothing is unpickled."""
    from realign.config import RunConfig
    from realign.fileio import write_json_atomic, write_jsonl_atomic
    from realign.gates import Thresholds, make_verdict
    from realign.pipeline import create_run, run_stages

    rows = [json.loads(x) for x in (ROOT / "examples" / "pairs.jsonl").read_text().splitlines()[:12]]
    from realign.rows import to_trl_row

    rows = [to_trl_row(r) for r in rows]
    marker = tmp_path / "executed"
    run = create_run(RunConfig(model=str(tiny_model_path), data=str(tmp_path / "x.jsonl"),
                               output_dir=str(tmp_path / "runs"), run_id="planted",
                               stages=["preference_data", "reference_init", "dpo"],
                               dpo={"max_steps": 1, "batch_size": 2, "max_length": 32}))
    t = Thresholds()
    d2, d3 = run / "stages" / "2-preference_data", run / "stages" / "3-reference_init"
    d2.mkdir(parents=True, exist_ok=True)
    d3.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(d2 / "train.jsonl", rows[:8])
    write_jsonl_atomic(d2 / "heldout.jsonl", rows[8:])
    write_jsonl_atomic(d3 / "kl_probe.jsonl", rows[8:10])
    write_json_atomic(d2 / "verdict.json", make_verdict("preference_data", [], t, artifacts={
        "train": str(d2 / "train.jsonl"), "heldout": str(d2 / "heldout.jsonl")}))
    (d3 / "reference_probe.pt").write_bytes(pickle.dumps({"x": _Planted(marker)}))
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    for planted, needle in ((str(d3 / "reference_probe.pt"), "pickles are never loaded"),
                            (str(outside), "outside the run directory"),
                            ("stages/3-reference_init/../../../outside.json", "outside the run directory")):
        write_json_atomic(d3 / "verdict.json", make_verdict("reference_init", [], t, artifacts={
            "reference_model": str(tiny_model_path), "kl_probe": str(d3 / "kl_probe.jsonl"),
            "reference_probe": planted, "initial_kl": 0.0}))
        with pytest.raises(InputError, match=needle):
            run_stages(run, stages=["dpo"])
    assert not marker.exists()
    assert not (run / "stages" / "5-dpo" / "verdict.json").exists()
