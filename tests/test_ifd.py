"""IFD (Li et al. 2023): the formula against log-probs computed directly with
transformers on the tiny model, the data readers, selection and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from realign.errors import InputError
from realign.ifd import (
    example_from_row,
    ifd_from_logprobs,
    ifd_report,
    read_examples,
    select_by_ifd,
)

EXAMPLES = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Add 2 and 3.", "5"),
    ("Write a short line about the sea.", "The sea rolls grey and wide under a low sky, "
                                          "and gulls ride the wind over the harbour."),
    ("Name a colour.", "Blue."),
    ("Translate 'cat' to French.", "Chat."),
]


# ------------------------------------------------------------------------- pure


def test_ifd_from_logprobs_is_ratio_of_perplexities():
    cond, unc = [-1.0, -2.0, -0.5], [-3.0, -2.5, -1.0]
    ppl_c = math.exp(-sum(cond) / 3)
    ppl_u = math.exp(-sum(unc) / 3)
    assert ifd_from_logprobs(cond, unc) == pytest.approx(ppl_c / ppl_u)
    assert ifd_from_logprobs([], []) is None
    with pytest.raises(ValueError):
        ifd_from_logprobs([-1.0], [-1.0, -2.0])


def test_report_and_selection():
    scores = [0.5, 1.2, None, 0.9, 0.7, 1.0]
    r = ifd_report(scores)
    assert r.n == 6 and r.measured == 5
    assert r.mean == pytest.approx((0.5 + 1.2 + 0.9 + 0.7 + 1.0) / 5)
    assert r.share_above_1 == pytest.approx(1 / 5)  # 1.0 is not above 1
    assert r.quantiles["p50"] == pytest.approx(0.9)
    assert select_by_ifd(scores, max_ifd=0.8) == [0, 4]
    # top-k: the k highest IFD ≤ 1 (Li et al.), returned in input order
    assert select_by_ifd(scores, top_k=2) == [3, 5]
    assert select_by_ifd(scores, top_k=2, max_ifd=2.0) == [1, 5]
    assert select_by_ifd(scores) == [0, 1, 3, 4, 5]  # unmeasured never kept


def test_row_shapes():
    e = example_from_row({"instruction": "Sum", "input": "2 3", "output": "5"}, "f", 1)
    assert e.prompt[0]["content"] == "Sum\n\n2 3" and e.answer[0]["content"] == "5"
    e = example_from_row({"instruction": "Q", "response": "A"}, "f", 1)
    assert (e.prompt[0]["content"], e.answer[0]["content"]) == ("Q", "A")
    e = example_from_row({"prompt": "Q", "completion": "A"}, "f", 1)
    assert e.answer == [{"role": "assistant", "content": "A"}]
    e = example_from_row({"prompt": "Q", "chosen": "A", "rejected": "B"}, "f", 1)
    assert e.answer[0]["content"] == "A"
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"}]
    e = example_from_row({"messages": msgs}, "f", 1)
    assert e.prompt == msgs[:2] and e.answer == msgs[2:]
    e = example_from_row({"chosen": msgs, "rejected": msgs[:2] + [{"role": "assistant",
                                                                   "content": "B"}]}, "f", 1)
    assert e.answer[0]["content"] == "A"
    with pytest.raises(InputError) as ei:
        example_from_row({"instruction": "Q"}, "f.jsonl", 4)
    assert ei.value.line == 4 and ei.value.field == "response"
    with pytest.raises(InputError):
        example_from_row({"messages": "not a list"}, "f", 1)


def test_read_examples_line_numbers(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d"}\n')
    ex, fmt, raw = read_examples(p)
    assert fmt == "jsonl" and [e.line for e in ex] == [1, 3] and len(raw) == 2
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"\n')
    with pytest.raises(InputError) as ei:
        read_examples(p)
    assert ei.value.line == 2


# ------------------------------------------------------------------------- the formula


def _direct_ifd(model, tok, q: str, a: str) -> float:
    """IFD computed by hand: one unpadded forward per sequence, log_softmax in float32."""
    import torch

    def nll(context_text: str, full_ids: list[int], n_ans: int) -> float:
        ctx_ids = tok(context_text, add_special_tokens=False)["input_ids"]
        ids = ctx_ids + full_ids[-n_ans:]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        start = len(ctx_ids)
        tok_lp = [lp[t - 1, ids[t]].item() for t in range(start, len(ids))]
        return -sum(tok_lp) / len(tok_lp)

    user = [{"role": "user", "content": q}]
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": a}], tokenize=False)
    prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full_ids = tok(full, add_special_tokens=False)["input_ids"]
    n_ans = len(full_ids) - len(tok(prompt, add_special_tokens=False)["input_ids"])
    empty = tok.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                    add_generation_prompt=True)
    return math.exp(nll(prompt, full_ids, n_ans) - nll(empty, full_ids, n_ans))


def test_ifd_matches_direct_transformers_computation(tiny_model_path, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from realign.backends.trl import TRLBackend
    from realign.training_metrics import calculate_ifd_score

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_path)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model_path))
    want = [_direct_ifd(model, tok, q, a) for q, a in EXAMPLES]
    handle = TRLBackend().load(tiny_model_path, device="cpu")
    qs, as_ = [q for q, _ in EXAMPLES], [a for _, a in EXAMPLES]
    got = calculate_ifd_score(handle, qs, as_, batch_size=3)  # padded, mixed-length batches
    assert got == pytest.approx(want, rel=1e-4)
    assert calculate_ifd_score(handle, qs, as_, batch_size=1) == pytest.approx(got, rel=1e-5)
    one = calculate_ifd_score(handle, qs[2], as_[2])
    assert isinstance(one, float) and one == pytest.approx(want[2], rel=1e-4)
    # the IFD is not trivially 1: the instruction changes the answer's log-probs
    assert any(abs(x - 1) > 1e-3 for x in got)


# ------------------------------------------------------------------------- the CLI


def test_ifd_cli(tiny_model_path, tmp_path, one_thread):
    from typer.testing import CliRunner

    from realign.backends.trl import TRLBackend
    from realign.cli import app
    from realign.ifd import ifd_scores

    rows = [{"instruction": q, "response": a} for q, a in EXAMPLES]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = CliRunner()
    r = runner.invoke(app, ["ifd", str(data), "--model", str(tiny_model_path), "--json",
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    handle = TRLBackend().load(tiny_model_path, device="cpu")
    want = ifd_scores(handle, [q for q, _ in EXAMPLES], [a for _, a in EXAMPLES]).ifd
    assert res["scores"] == pytest.approx(want, rel=1e-5)  # one per example, input order
    assert res["report"]["n"] == len(EXAMPLES)
    assert res["report"]["share_above_1"] == pytest.approx(sum(x > 1 for x in want) / len(want))

    out = tmp_path / "top.jsonl"
    r = runner.invoke(app, ["ifd", str(data), "--model", str(tiny_model_path), "--top-k", "2",
                            "--max-ifd", "100", "--write", str(out), "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    best = sorted(sorted(range(len(want)), key=lambda i: -want[i])[:2])
    assert [json.loads(x) for x in out.read_text().splitlines()] == [rows[i] for i in best]

    # preference data (prompt + chosen) in a JSON array
    pref = tmp_path / "pref.json"
    pref.write_text(json.dumps([{"prompt": q, "chosen": a, "rejected": "no"} for q, a in EXAMPLES]))
    r = runner.invoke(app, ["ifd", str(pref), "--model", str(tiny_model_path), "--json",
                            "--device", "cpu"])
    assert r.exit_code == 0 and json.loads(r.stdout)["scores"] == pytest.approx(want, rel=1e-5)

    # bad input: exit 2 with file:line, no traceback
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "response": "y"}\n{"foo": 1}\n')
    r = runner.invoke(app, ["ifd", str(bad), "--model", str(tiny_model_path)])
    assert r.exit_code == 2 and "bad.jsonl:2" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["ifd", str(data), "--top-k", "2"])
    assert r.exit_code == 2 and "--write" in r.output


def test_write_subset_keeps_format_and_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from realign.ifd import write_subset

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    ex, fmt, raw = read_examples(tmp_path / "d.parquet")
    assert fmt == "parquet" and [e.line for e in ex] == [1, 2, 3, 4, 5]
    write_subset(tmp_path / "k.parquet", fmt, raw, [1, 3])
    assert pq.read_table(tmp_path / "k.parquet").to_pylist() == [rows[1], rows[3]]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ex, fmt, raw = read_examples(tmp_path / "d.json")
    write_subset(tmp_path / "k.json", fmt, raw, [0, 4])
    assert fmt == "json" and json.loads((tmp_path / "k.json").read_text()) == [rows[0], rows[4]]
