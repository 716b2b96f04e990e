"""On-policy pair generation (issue 15, part 2): the sampler, the scoring, the pairing
rules and the drops; on the tiny model, generation end to end."""

from __future__ import annotations

import json
import math
import random

import pytest
from realign.errors import InputError
from realign.generation import (
    PromptRow,
    chat_template_mismatch,
    make_pairs,
    pick_pair,
    read_prompt_rows,
    reference_of,
    split_prompts,
)

# ---------------------------------------------------------------- pairing rules


def test_max_min_picks_first_best_and_first_worst():
    assert pick_pair([0.5, 1.0, 0.0, 1.0, 0.0]) == (1, 2)
    assert pick_pair([1.0, 1.0, 1.0]) is None  # no difference
    assert pick_pair([0.3]) is None


def test_max_random_picks_a_lower_scored_rejected_seeded():
    scores = [0.0, 1.0, 0.5, 0.2, 1.0]
    got = {pick_pair(scores, "max_random", random.Random(s))[1] for s in range(40)}
    assert got == {0, 2, 3}  # every lower-scored response, never a best one
    a = [pick_pair(scores, "max_random", random.Random(7)) for _ in range(3)]
    b = [pick_pair(scores, "max_random", random.Random(7)) for _ in range(3)]
    assert a == b


def test_unknown_rule_refused():
    with pytest.raises(ValueError, match="max_min"):
        pick_pair([0, 1], "best_of_n")


def _rows(n, answer="4"):
    return [PromptRow(prompt=f"q{i}", truth={"answer": answer}, line=i + 1) for i in range(n)]


def test_make_pairs_drops_prompts_without_a_real_difference():
    rows = _rows(5)
    responses = [["a", "b"], ["x", "y"], ["same", "same "], ["p", "q"], ["m", "n"]]
    scores = [[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [None, None], [0.55, 0.5]]
    pairs, recs = make_pairs(rows, responses, scores, scorer="verifier", min_gap=0.1)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a", "b")]
    assert pairs[0]["score_chosen"] == 1.0 and pairs[0]["score_rejected"] == 0.0
    assert pairs[0]["reference"] == "4"
    assert [r["dropped"] for r in recs] == [None, "no difference", "identical responses",
                                           "not verifiable", "gap below min_score_gap"]
    assert recs[0]["chosen"] == 0 and recs[0]["rejected"] == 1


def test_reward_model_scores_become_bradley_terry_probabilities():
    rows = _rows(2)
    pairs, recs = make_pairs(rows, [["a", "b", "c"], ["d", "e"]], [[2.0, -1.0, 0.5], [0.1, 0.0]],
                             scorer="reward_model", min_gap=0.1)
    # prompt 0: r 2.0 vs -1.0 -> sigma(3) and sigma(-3); prompt 1: tanh(0.05) < 0.1 -> dropped
    assert len(pairs) == 1
    assert pairs[0]["score_chosen"] == pytest.approx(1 / (1 + math.exp(-3)))
    assert pairs[0]["score_chosen"] - pairs[0]["score_rejected"] == pytest.approx(math.tanh(1.5))
    assert recs[1]["dropped"] == "gap below min_score_gap"


def test_chat_template_mismatch_is_named():
    class T:
        def __init__(self, t):
            self.chat_template = t

    assert chat_template_mismatch(T("a"), T("a")) is None
    assert "differs" in chat_template_mismatch(T("a"), T("b"))
    assert "no chat template" in chat_template_mismatch(T(None), T("b"))


def test_read_prompt_rows_names_the_bad_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "What is 2+2?", "answer": 4, "extra": 1}) + "\n"
                 + json.dumps({"question": "no prompt"}) + "\n")
    with pytest.raises(InputError) as e:
        read_prompt_rows(f)
    assert e.value.line == 2 and e.value.field == "prompt"
    f.write_text(json.dumps({"prompt": "What is 2+2?", "answer": [4, "four"]}) + "\n")
    (row,) = read_prompt_rows(f)
    assert row.truth == {"answer": [4, "four"]} and row.reference == "4"
    assert reference_of({"tests": "assert f()"}) is None


def test_split_prompts_is_the_pair_split():
    """Stage 1 and stage 2 hold out the same prompts: the split is rows.split_heldout's."""
    from realign.rows import split_heldout

    rows = [PromptRow(prompt=f"prompt number {i}", truth={}, line=i + 1) for i in range(50)]
    train, held = split_prompts(rows, fraction=0.2, min_pairs=4, max_pairs=100, seed=3)
    assert len(held) == 10 and len(train) == 40
    pairs = [{"prompt": [{"role": "user", "content": r.prompt}], "chosen": "c"} for r in rows]
    _, held2 = split_heldout(pairs, fraction=0.2, min_pairs=4, max_pairs=100, seed=3)
    assert [r.prompt for r in held] == [p["prompt"][0]["content"] for p in held2]


# ---------------------------------------------------------------- the nucleus sampler


def test_nucleus_draw_keeps_exactly_the_top_p_mass():
    torch = pytest.importorskip("torch")
    from realign.backends.trl import _nucleus_draw, _row_generators

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = torch.log(probs).repeat(4000, 1)
    gens = _row_generators(0, range(4000))
    toks = _nucleus_draw(logits, gens, 1.0, 0.8)
    counts = torch.bincount(toks, minlength=4).double() / 4000
    # nucleus 0.8: {0.5, 0.3} (the token that reaches 0.8 is kept), renormalized
    assert counts[2] == 0 and counts[3] == 0
    assert counts[0] == pytest.approx(0.625, abs=0.03)
    toks = _nucleus_draw(logits, _row_generators(1, range(4000)), 1.0, 0.81)
    assert 0 < (toks == 2).double().mean() < 0.25  # 0.81 needs the third token
    assert set(_nucleus_draw(logits[:5], gens[:5], 0.0, 0.9).tolist()) == {0}  # greedy


def test_nucleus_draw_falls_back_to_a_full_sort_exactly(monkeypatch):
    """Rows whose top-k candidates hold less than top_p are sorted in full: the draws equal
    those of a top-k as large as the vocabulary."""
    torch = pytest.importorskip("torch")
    from realign.backends import trl

    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(0)) * 0.1  # flat
    full = trl._nucleus_draw(logits, trl._row_generators(5, range(6)), 1.0, 0.9)
    monkeypatch.setattr(trl, "NUCLEUS_TOPK", 16)
    cut = trl._nucleus_draw(logits, trl._row_generators(5, range(6)), 1.0, 0.9)
    assert torch.equal(full, cut)


def test_temperature_sharpens():
    torch = pytest.importorskip("torch")
    from realign.backends.trl import _nucleus_draw, _row_generators

    logits = torch.log(torch.tensor([[0.6, 0.4]])).repeat(3000, 1)
    hot = (_nucleus_draw(logits, _row_generators(0, range(3000)), 1.0, 1.0) == 0).double().mean()
    cold = (_nucleus_draw(logits, _row_generators(0, range(3000)), 0.25, 1.0) == 0).double().mean()
    assert hot == pytest.approx(0.6, abs=0.04) and cold > 0.8


# ---------------------------------------------------------------- on the tiny model


@pytest.fixture(scope="module")
def policy(tiny_model_path, one_thread):
    from realign.backends.trl import TRLBackend

    return TRLBackend().load(tiny_model_path, device="cpu")


@pytest.mark.integration
def test_sample_many_is_seeded(policy):
    from realign.backends.trl import encode_prompt, sample_many

    prompts = ["Say hi.", "Name a colour.", "Count to three.", "Pick a fruit."]
    a = sample_many(policy, prompts, num_samples=3, max_new_tokens=8, seed=1, temperature=1.0,
                    top_p=0.9, batch_size=12)
    assert [len(x) for x in a] == [3, 3, 3, 3]
    for p, samples in zip(prompts, a):
        ids = encode_prompt(policy.tokenizer, p)
        for e in samples:
            assert e.input_ids[:e.start] == ids and 1 <= e.n_completion <= 8
    b = sample_many(policy, prompts, num_samples=3, max_new_tokens=8, seed=1, temperature=1.0,
                    top_p=0.9, batch_size=12)
    assert [[e.input_ids for e in s] for s in a] == [[e.input_ids for e in s] for s in b]
    c = sample_many(policy, prompts, num_samples=3, max_new_tokens=8, seed=2, temperature=1.0,
                    top_p=0.9, batch_size=12)
    assert [[e.input_ids for e in s] for s in a] != [[e.input_ids for e in s] for s in c]
    # the samples of one prompt differ from each other (they are draws, not copies)
    assert any(len({tuple(e.input_ids) for e in s}) > 1 for s in a)


@pytest.mark.integration
def test_sample_many_matches_a_plain_loop(policy):
    """KV cache shared across the k samples, finished rows leaving the batch: the tokens of
    a plain full-forward loop with the same per-sample generator."""
    import torch
    from realign.backends.trl import (
        _nucleus_draw,
        _row_generators,
        encode_prompt,
        sample_many,
    )

    prompts = ["Say hi.", "What is the capital of France?"]
    got = sample_many(policy, prompts, num_samples=2, max_new_tokens=6, seed=4,
                      temperature=0.8, top_p=0.9, batch_size=4)
    eos = policy.tokenizer.eos_token_id
    for i, p in enumerate(prompts):
        for j in range(2):
            (gen,) = _row_generators(4, [i * 2 + j])
            x = list(encode_prompt(policy.tokenizer, p))
            with torch.no_grad():
                for _ in range(6):
                    logits = policy.model(input_ids=torch.tensor([x])).logits[:, -1]
                    t = int(_nucleus_draw(logits, [gen], 0.8, 0.9)[0])
                    x.append(t)
                    if t == eos:
                        break
            assert got[i][j].input_ids == x


@pytest.mark.integration
def test_generate_pairs_on_the_tiny_model(policy, tmp_path):
    """Sample 4 per prompt, score with a verifier (IFEval word count), pair best vs worst,
    drop prompts where every response scored the same; the pairs validate as stage 2 pairs."""
    from realign.generation import generate_pairs
    from realign.validation import validate_file

    check = [{"id": "length_constraints:number_words",
              "kwargs": {"num_words": 9, "relation": "at least"}}]
    rows = [PromptRow(prompt=f"Write about topic {i}.", truth={"instructions": check}, line=i + 1)
            for i in range(12)]
    seen = []
    res = generate_pairs(policy, rows, samples=4, max_new_tokens=12, temperature=1.0, top_p=0.95,
                         seed=0, batch_size=16, progress=lambda d, t, m: seen.append((d, t, m)))
    st = res.stats
    assert st["responses"] == 48 and st["scored_responses"] == 48
    assert st["pairs"] + sum(st["dropped"].values()) == 12
    assert st["pairs"] >= 1 and st["dropped"].get("no difference", 0) >= 1
    assert st["response_tokens"] > 0 and st["tokens_per_second"] > 0
    assert any(t == 12 for _, t, _m in seen)  # progress counts prompts
    for pair, rec in zip(res.pairs, [r for r in res.records if r["chosen"] is not None]):
        assert pair["score_chosen"] == 1.0 and pair["score_rejected"] < 1.0
        assert rec["scores"][rec["chosen"]] == max(rec["scores"])
        assert rec["scores"][rec["rejected"]] == min(rec["scores"])
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in res.pairs))
    v = validate_file(f, score_scale="0-1")
    assert v.gate("min_pairs").value == len(res.pairs)
    assert v.gate("preference_gap").status != "unmeasured"
    # same seed, same pairs
    again = generate_pairs(policy, rows, samples=4, max_new_tokens=12, temperature=1.0,
                           top_p=0.95, seed=0, batch_size=16)
    assert again.pairs == res.pairs


@pytest.mark.integration
def test_reward_model_scorer_warns_on_another_chat_template(policy):
    import copy

    from realign.generation import generate_pairs

    class RM:  # a stand-in reward: the response's length in tokens
        def __init__(self):
            import torch

            self.config = type("C", (), {"pad_token_id": 0})()
            self.device = torch.device("cpu")

    tok = copy.deepcopy(policy.tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    import realign.generation as g

    def fake_score(model, tokenizer, rows, responses, *, max_length, batch_size=8):
        return [[float(len(t)) for t in resp] for resp in responses]

    orig = g.score_with_reward_model
    g.score_with_reward_model = fake_score
    try:
        res = generate_pairs(policy, [PromptRow(prompt="Say hi.", truth={}, line=1)], samples=3,
                             max_new_tokens=6, scorer="reward_model", reward_model=(RM(), tok))
    finally:
        g.score_with_reward_model = orig
    assert any("chat template" in w for w in res.warnings)
