"""Stage 2 in generation mode (config ``prompts``) on the tiny model: the prompts are split
as stage 1 splits them, every prompt is sampled, scored and paired, and the pairs pass the
stage-2 validation; the config refuses what cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from realign.config import RunConfig, load_config
from realign.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
CHECK = [{"id": "length_constraints:number_words", "kwargs": {"num_words": 9, "relation": "at least"}}]


def prompt_file(tmp: Path, n: int = 40, truth: bool = True) -> Path:
    f = tmp / "prompts.jsonl"
    rows = []
    for i in range(n):
        r = {"prompt": f"Write a short note about item number {i}."}
        if truth:
            r.update(instructions=CHECK, answer=f"Item {i} is here.")
        rows.append(r)
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def gen_config(tmp: Path, model: Path, prompts: Path, **extra) -> RunConfig:
    base = {
        "model": str(model), "prompts": str(prompts), "output_dir": str(tmp / "runs"),
        "eval_sets": [str(ROOT / "examples" / "eval.jsonl")],
        "stages": ["sft_baseline", "preference_data"],
        "thresholds": {"min_pairs": 2, "baseline_perplexity": 1e9},
        "heldout": {"fraction": 0.25, "min_pairs": 4},
        "generation": {"samples": 4, "max_new_tokens": 12, "batch_size": 16},
        "dpo": {"max_length": 64},
    }
    base.update(extra)
    return RunConfig(**base)


def test_exactly_one_of_data_and_prompts(tmp_path):
    with pytest.raises(ValueError, match="exactly one of data"):
        RunConfig()
    with pytest.raises(ValueError, match="not both"):
        RunConfig(data="x.jsonl", prompts="p.jsonl")
    assert RunConfig(prompts="p.jsonl").generation.samples == 4
    f = tmp_path / "run.yaml"
    (tmp_path / "p.jsonl").write_text("{}\n")
    f.write_text("prompts: p.jsonl\ngeneration:\n  pairing: max_random\n")
    cfg = load_config(f)
    assert cfg.prompts == str(tmp_path / "p.jsonl") and cfg.data is None
    f.write_text("prompts: p.jsonl\ngeneration:\n  pairing: best_of\n")
    with pytest.raises(InputError) as e:
        load_config(f)
    assert e.value.field == "generation.pairing" and e.value.line == 3


def test_preflight_refuses_prompts_without_a_scorer(tmp_path):
    from realign.pipeline import preflight

    p = prompt_file(tmp_path, 5, truth=False)
    cfg = RunConfig(prompts=str(p), output_dir=str(tmp_path / "runs"))
    with pytest.raises(InputError) as e:
        preflight(cfg)
    assert e.value.field == "generation.reward_model"
    cfg = RunConfig(prompts=str(p), generation={"scorer": "verifier"})
    with pytest.raises(InputError) as e:
        preflight(cfg)
    assert e.value.field == "generation.scorer"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "answer": 1}\n{"answer": 2}\n')
    with pytest.raises(InputError) as e:
        preflight(RunConfig(prompts=str(bad)))
    assert e.value.line == 2 and e.value.field == "prompt"


@pytest.mark.integration
def test_stage2_generates_validates_and_splits(tmp_path, tiny_model_path, one_thread):
    from realign.fileio import read_jsonl
    from realign.generation import read_prompt_rows, split_prompts
    from realign.kl_probe import prompt_key
    from realign.pipeline import create_run, run_stages

    prompts = prompt_file(tmp_path)
    cfg = gen_config(tmp_path, tiny_model_path, prompts)
    run = create_run(cfg)
    status = run_stages(run)
    by = {s.name: s.verdict for s in status.stages}
    v1, v2 = by["sft_baseline"], by["preference_data"]
    assert v1.gate("baseline_perplexity").status == "pass"
    assert "reference answers of held-out prompts" in v1.gate("baseline_perplexity").detail
    g = v2.findings["generation"]
    assert g["prompts"] == 40 and g["responses"] == 160 and g["scorer"] == "verifier"
    assert g["by_split"]["train"]["prompts"] == 30 and g["by_split"]["heldout"]["prompts"] == 10
    assert v2.gate("min_pairs").value == g["pairs"] > 0
    assert v2.gate("preference_gap").status == "pass"  # verifier scores: 1 vs < 1
    assert v2.gate("decontamination").status != "unmeasured"
    a = v2.artifacts
    train, held = read_jsonl(Path(a["train"])), read_jsonl(Path(a["heldout"]))
    assert len(train) + len(held) == g["pairs"] and held  # 10 held-out prompts, some pairs
    _, held_p = split_prompts(read_prompt_rows(prompts), fraction=0.25, min_pairs=4,
                              max_pairs=256, seed=0)
    held_keys = {prompt_key(r.prompt) for r in held_p}
    assert all(prompt_key(r["prompt"][0]["content"]) in held_keys for r in held)
    assert not any(prompt_key(r["prompt"][0]["content"]) in held_keys for r in train)
    assert len(read_jsonl(Path(a["heldout_prompts"]))) == 10
    assert read_jsonl(Path(a["train_prompts"]))[0]["instructions"] == CHECK
    cands = read_jsonl(Path(a["generated"]).parent / "candidates.jsonl")
    assert len(cands) == 40 and all(len(c["responses"]) == 4 for c in cands)
    # a pair's chosen scored higher than its rejected
    assert all(r["score_chosen"] > r["score_rejected"] for r in train + held)


@pytest.mark.integration
def test_no_pair_is_a_failed_min_pairs_not_a_crash(tmp_path, tiny_model_path, one_thread):
    from realign.pipeline import create_run, run_stages

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}.", "answer": "impossible-token"})
                               + "\n" for i in range(12)))
    cfg = gen_config(tmp_path, tiny_model_path, prompts, stages=["preference_data"])
    status = run_stages(create_run(cfg))
    v = status.stages[0].verdict
    assert v.gate("min_pairs").value == 0 and v.gate("min_pairs").status == "fail"
    assert any("no prompt gave a pair" in w for w in v.warnings)
    assert v.findings["generation"]["dropped"] == {"no difference": 12}
