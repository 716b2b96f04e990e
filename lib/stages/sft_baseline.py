"""Stage 1, SFT baseline: the starting model and its measured baseline.

* Optional SFT through TRL's ``SFTTrainer`` when ``sft.dataset`` is set (rows with
  ``prompt``/``completion``, ``messages``, or ``text``); the trained model is saved in
  the stage folder and becomes the base of the later stages.
* Gate ``baseline_perplexity``: PPL = exp(−Σ log p(token) / Σ tokens) of the model on
  held-out responses given their prompts (chat template applied): the chosen responses
  of the preference data's held-out split (:func:`realign.rows.split_heldout`,
  the same split stage 2 uses), or the held-out 10% of the SFT set when one is given.
* Baseline capability scores: when ``sft.benchmarks`` lists suites, they are evaluated
  through :mod:`realign.evaluation` and saved as ``baseline_benchmarks.json``; stage 7
  compares against them.

Backend (``backend``): the perplexity runs on the run's backend (TRL or MLX, the same
tokenization and log-prob definition); the SFT fine-tune is TRL-only (``backend: mlx``
with ``sft.dataset`` is refused) and the benchmarks run on PyTorch (lm-eval) either way.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import InputError
from ..fileio import file_digest, write_json_atomic
from ..gates import StageVerdict, make_verdict
from ..messages import prompt_completion
from ..metrics import perplexity
from ..models import resolve_model
from ..rows import read_rows, split_heldout, to_trl_row
from .context import RunContext

NAME = "sft_baseline"


def heldout_rows(ctx: RunContext) -> list[dict[str, Any]]:
    """The held-out rows whose ``chosen`` responses stage 1 scores: the preference data's
    held-out split, or in generation mode the held-out prompts (the split stage 2 makes)
    with their reference ``answer`` as the response (rows without one are left out)."""
    cfg = ctx.config
    if cfg.prompts is not None:
        from ..generation import read_prompt_rows, split_prompts
        from ..messages import as_messages

        _, held_p = split_prompts(read_prompt_rows(cfg.prompts), fraction=cfg.heldout.fraction,
                                  min_pairs=cfg.heldout.min_pairs,
                                  max_pairs=cfg.heldout.max_pairs, seed=cfg.seed)
        return [{"prompt": as_messages(r.prompt, "user"),
                 "chosen": as_messages(r.reference, "assistant")}
                for r in held_p if r.reference is not None]
    assert cfg.data is not None
    rows = [to_trl_row(r) for r in read_rows(cfg.data, cfg.data_split)]
    _, held = split_heldout(rows, fraction=cfg.heldout.fraction, min_pairs=cfg.heldout.min_pairs,
                            max_pairs=cfg.heldout.max_pairs, seed=cfg.seed)
    return held


def _sft_rows(path: str) -> list[dict[str, Any]]:
    """SFT data as prompt/completion message lists (prompt may be empty for plain text)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            r = json.loads(line)
            if "messages" in r:
                msgs = r["messages"]
                out.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
            elif "prompt" in r and "completion" in r:
                out.append(prompt_completion(r["prompt"], r["completion"]))
            elif "instruction" in r and ("response" in r or "output" in r):
                out.append(prompt_completion(r["instruction"], r.get("response", r.get("output"))))
            else:
                raise InputError("expected messages, prompt/completion or instruction/response",
                                 file=path, line=i)
    return out


def run(ctx: RunContext) -> StageVerdict:
    from ..backends.trl_train import quiet_hf

    quiet_hf()
    cfg = ctx.config
    out = ctx.stage_dir(NAME)
    mlx = ctx.backend_name == "mlx"
    if mlx and cfg.sft.dataset:
        raise InputError("stage 1's SFT fine-tune (sft.dataset) runs on TRL only: set backend: trl "
                         "for this run, or run stage 1 with backend: trl and the later stages "
                         "with backend: mlx (the saved model loads in both)", field="sft.dataset")
    backend = ctx.backend()
    model_path = resolve_model(cfg.model)
    artifacts: dict[str, Any] = {"base_model": str(model_path), "model": str(model_path)}
    warnings: list[str] = []
    findings: dict[str, Any] = {"backend": ctx.backend_findings()}

    if cfg.sft.dataset:
        sft = _sft_rows(cfg.sft.dataset)
        fake = [{"prompt": r["prompt"], "chosen": r["completion"]} for r in sft]
        train, held = split_heldout(fake, fraction=0.1, min_pairs=2, max_pairs=cfg.sft.eval_responses,
                                    seed=cfg.seed)
        prompts, completions = [r["prompt"] for r in held], [r["chosen"] for r in held]
        handle = backend.load(model_path, device=cfg.device)
        before = backend.completion_logprobs(handle, prompts, completions,
                                             max_length=cfg.sft.max_length)
        findings["perplexity_before_sft"] = perplexity(before.token_logps)
        ctx.progress(0, cfg.sft.max_steps, "SFT training")
        from ..backends.trl_train import train_sft

        trained = train_sft(
            handle, [{"prompt": r["prompt"], "completion": r["chosen"]} for r in train],
            output_dir=out / "checkpoints", learning_rate=cfg.sft.learning_rate,
            max_steps=cfg.sft.max_steps, batch_size=cfg.sft.batch_size,
            max_length=cfg.sft.max_length, seed=cfg.seed, progress=ctx.progress)
        saved = backend.save(trained, out / "model")
        artifacts.update(model=str(saved), model_digest=file_digest(saved))
        handle = trained
    else:
        held = heldout_rows(ctx)[: cfg.sft.eval_responses]
        prompts, completions = [r["prompt"] for r in held], [r["chosen"] for r in held]
        handle = backend.load(model_path, device=cfg.device)

    ctx.progress(0, None, "measuring baseline perplexity")
    if completions:
        lp = backend.completion_logprobs(handle, prompts, completions,
                                         max_length=cfg.sft.max_length)
        ppl = perplexity(lp.token_logps)
        tokens = sum(lp.counts)
        what = ("reference answers of held-out prompts" if cfg.prompts is not None and
                not cfg.sft.dataset else "held-out responses")
        gates = [ctx.thresholds.evaluate(
            "baseline_perplexity", ppl,
            detail=f"exp(mean NLL) over {tokens} tokens of {len(completions)} {what}")]
    else:
        gates = [ctx.thresholds.evaluate(
            "baseline_perplexity", None,
            detail="unmeasured: no held-out response to score (the held-out prompts carry no "
                   "reference answer; give sft.dataset to measure on SFT data)")]

    if cfg.sft.benchmarks:
        try:
            from ..evaluation import evaluate_model
        except ImportError:
            warnings.append("benchmarks configured but realign.evaluation is not available; "
                            "baseline capability scores were not recorded")
        else:
            ctx.progress(0, None, "baseline benchmarks")
            if mlx:  # lm-eval runs on PyTorch: the same model, loaded by transformers
                from ..backends.trl import TRLBackend

                handle = TRLBackend().load(model_path, device=None)
                findings["benchmarks_backend"] = ctx.backend_findings("trl")
            results = evaluate_model(handle.model, handle.tokenizer, cfg.sft.benchmarks,
                                     limit=cfg.sft.benchmark_limit)
            path = out / "baseline_benchmarks.json"
            write_json_atomic(path, results)
            artifacts["baseline_benchmarks"] = str(path)
    return make_verdict(NAME, gates, ctx.thresholds, findings, artifacts, warnings)
