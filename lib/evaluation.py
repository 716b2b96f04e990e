"""Capability benchmarks through lm-evaluation-harness, in-process, with per-item results.

:func:`evaluate_model` wraps an already loaded ``transformers`` model in lm-eval's
``HFLM`` and runs :func:`lm_eval.simple_evaluate` on

* the offline suites shipped in ``realign/suites/`` (lm-eval task YAMLs + JSONL data,
  no hub access; :func:`list_suites`), and
* any lm-eval task or group name the user gives (e.g. ``arc_easy``). Those load their
  data from the Hugging Face hub, so offline they fail with :class:`EvaluationError`.

Per suite it returns the primary metric, its score (mean over items), the item count
and the per-item scores in lm-eval's document order, each with a stable item id (the
``id`` field of the document when it has one, else the document index). The per-item
scores feed :func:`realign.metrics.capability_retention`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from .errors import InputError, MissingDependencyError, RealignError

if TYPE_CHECKING:  # pragma: no cover
    from .metrics import RetentionResult

SUITES_DIR = Path(__file__).resolve().parent / "suites"


class EvaluationError(RealignError):
    """A benchmark could not run (e.g. an lm-eval hub task while offline)."""


class SuiteInfo(BaseModel):
    """A shipped offline suite."""

    name: str
    description: str
    metric: str = Field(description="primary lm-eval metric key, 'metric,filter'")
    chance: float = Field(description="score of a uniform random guesser (multiple choice) "
                                      "or ~0 for open generation checked exactly")
    chat_template: bool = Field(description="run through the tokenizer's chat template "
                                            "by default (when the tokenizer has one)")
    data_file: str
    n_items: int = 0


_SUITES: dict[str, SuiteInfo] = {
    s.name: s for s in [
        SuiteInfo(name="realign_knowledge",
                  description="general-knowledge multiple choice (4 options: capitals, "
                              "chemical symbols, opposites, everyday facts), log-likelihood",
                  metric="acc,none", chance=0.25, chat_template=False,
                  data_file="knowledge.jsonl"),
        SuiteInfo(name="realign_arith",
                  description="short integer arithmetic (+, -, ×), greedy one-line answer, "
                              "exact match of its last integer",
                  metric="exact_match,last_integer", chance=0.0, chat_template=True,
                  data_file="arith.jsonl"),
        SuiteInfo(name="realign_format",
                  description="format instructions checked by code (all caps, lowercase, one "
                              "word, JSON key, first word, yes/no, number only, 3 lines)",
                  metric="follows,none", chance=0.0, chat_template=True,
                  data_file="format.jsonl"),
    ]
}

#: The suites stage 1 and stage 7 run when the config names none.
DEFAULT_SUITES: tuple[str, ...] = tuple(_SUITES)


class ItemScore(BaseModel):
    """One item of a suite: its id, its score under the suite's primary metric and, for
    generation tasks, the model's raw response."""

    id: str
    score: float
    response: str | None = None


class SuiteResult(BaseModel):
    """The result of one lm-eval task (a shipped suite or a user-named task)."""

    suite: str
    metric: str = Field(description="lm-eval metric key 'metric,filter'")
    score: float | None = Field(description="mean of the per-item scores")
    n: int
    items: list[ItemScore] = Field(description="per-item scores in document order")
    shipped: bool
    chance: float | None = None
    apply_chat_template: bool
    detail: str = ""

    def scores(self) -> list[float]:
        return [i.score for i in self.items]

    def by_id(self) -> dict[str, float]:
        return {i.id: i.score for i in self.items}


class BenchmarkResults(BaseModel):
    """Results of :func:`evaluate_model`: one :class:`SuiteResult` per lm-eval leaf task."""

    suites: dict[str, SuiteResult]
    limit: int | None = None
    batch_size: int = Field(description="lm-eval batch size (0 when automatic)")
    device: str
    seconds: float
    lm_eval_version: str

    def scores(self) -> dict[str, float | None]:
        return {k: v.score for k, v in self.suites.items()}


def list_suites() -> list[SuiteInfo]:
    """The shipped offline suites, with their item counts."""
    out = []
    for s in _SUITES.values():
        path = SUITES_DIR / "data" / s.data_file
        n = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        out.append(s.model_copy(update={"n_items": n}))
    return out


def _require_lm_eval() -> Any:
    try:
        import lm_eval
    except ModuleNotFoundError as e:  # pragma: no cover - depends on the install
        raise MissingDependencyError(
            "benchmarks need lm-evaluation-harness: pip install 'realign[eval]'") from e
    return lm_eval


def _quiet_git_commit_hash() -> str | None:
    """lm-eval's ``get_git_commit_hash`` without its stray output: it runs ``git describe``
    with stderr inherited, which prints "fatal: not a git repository" into realign's
    output wherever the working directory is not a git checkout."""
    import os
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True,  # noqa: S607
                             text=True, timeout=10, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from lm_eval.loggers.utils import get_commit_from_path

        return get_commit_from_path(os.getcwd())
    except Exception:  # noqa: BLE001 - provenance only
        return None


def _silent_tqdm(real: Any) -> Any:
    """``real`` (tqdm or trange) with its bar disabled, whatever the caller asks."""
    def make(*args: Any, **kwargs: Any) -> Any:
        kwargs["disable"] = True
        return real(*args, **kwargs)

    make.__wrapped__ = real  # type: ignore[attr-defined]
    return make


_QUIET_LOCK = threading.Lock()
_QUIET_DEPTH = [0]
_QUIET_SAVED: list[tuple[Any, str, Any]] = []


def _silence_lm_eval_modules() -> list[tuple[Any, str, Any]]:
    """Replace, in every loaded ``lm_eval`` module, the tqdm progress bars and the git
    call that writes to stderr; return what to put back."""
    import sys

    try:
        import tqdm as _tqdm
        bars = {_tqdm.tqdm, _tqdm.trange}
        try:
            import tqdm.auto as _auto
            bars |= {_auto.tqdm, _auto.trange}
        except ImportError:  # pragma: no cover
            pass
    except ImportError:  # pragma: no cover - lm-eval depends on tqdm
        bars = set()
    import importlib

    for module in ("lm_eval.evaluator", "lm_eval.api.task", "lm_eval.api.model",
                   "lm_eval.api.metrics", "lm_eval.models.huggingface"):
        try:  # loaded now, so that they are patched before simple_evaluate runs them
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - a module this lm-eval version lacks
            continue
    saved: list[tuple[Any, str, Any]] = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "lm_eval" or name.startswith("lm_eval.")):
            continue
        for attr in ("tqdm", "trange"):
            real = getattr(mod, attr, None)
            if real is not None and real in bars:
                saved.append((mod, attr, real))
                setattr(mod, attr, _silent_tqdm(real))
        if getattr(mod, "get_git_commit_hash", None) is not None and name != "lm_eval.loggers.utils":
            saved.append((mod, "get_git_commit_hash", mod.get_git_commit_hash))
            mod.get_git_commit_hash = _quiet_git_commit_hash
    return saved


@contextlib.contextmanager
def _quiet_lm_eval(verbose: bool) -> Iterator[None]:
    """lm-eval's own output stays out of realign's: its INFO/WARNING logs (every task
    config), its tqdm progress bars (realign shows one progress display per stage) and
    the "fatal: not a git repository" line of its ``git describe`` call, plus the
    ``datasets`` progress bars of the suites it loads. ``verbose`` leaves everything on.
    Nested and concurrent uses are counted: the last one out restores."""
    if verbose:
        yield
        return
    logger = logging.getLogger("lm_eval")
    old = logger.level
    logger.setLevel(logging.ERROR)
    bars_were_on = None
    try:
        from datasets.utils import logging as ds_logging

        bars_were_on = ds_logging.is_progress_bar_enabled()
        ds_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - lm-eval depends on datasets
        ds_logging = None
    with _QUIET_LOCK:
        if _QUIET_DEPTH[0] == 0:
            _QUIET_SAVED[:] = _silence_lm_eval_modules()
        _QUIET_DEPTH[0] += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET_DEPTH[0] -= 1
            if _QUIET_DEPTH[0] == 0:
                for mod, attr, real in reversed(_QUIET_SAVED):
                    setattr(mod, attr, real)
                _QUIET_SAVED.clear()
        if ds_logging is not None and bars_were_on:
            ds_logging.enable_progress_bar()
        logger.setLevel(old)


def make_lm(model: Any, tokenizer: Any, *, batch_size: int = 16, device: str | None = None,
            max_length: int | None = None) -> Any:
    """Wrap a loaded causal LM (``transformers.PreTrainedModel``) in lm-eval's ``HFLM``.

    ``device`` moves the model there first (``model.to(device)``); HFLM then runs on the
    model's device. The model is put in eval mode.
    """
    _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if device is not None:
        model.to(device)
    model.eval()
    with _quiet_lm_eval(False):
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                    max_length=max_length)


_FULL_TM: dict[tuple[str, ...], Any] = {}  # lm-eval's full task index, built once per process


def _task_manager(names: Sequence[str], include_path: Sequence[str | Path] = (), *,
                  search_lm_eval: bool = True) -> Any:
    """A TaskManager that knows the shipped suites, ``include_path`` folders of task YAMLs,
    and (only when a name is found in neither) lm-eval's own tasks.

    Indexing lm-eval's ~200 built-in task folders takes seconds (tens of seconds on a
    loaded CPU), so it happens only when needed, once per process. Unknown names raise
    :class:`InputError`.
    """
    from lm_eval.tasks import TaskManager

    paths = [str(SUITES_DIR)]
    for p in include_path:
        if not Path(p).is_dir():
            raise InputError("task folder does not exist", file=p, field="include_path")
        paths.append(str(Path(p).resolve()))
    tm = TaskManager(include_path=paths, include_defaults=False)
    if search_lm_eval and any(n not in tm.all_tasks for n in names):
        key = tuple(paths)
        if key not in _FULL_TM:
            _FULL_TM[key] = TaskManager(include_path=paths, include_defaults=True)
        tm = _FULL_TM[key]
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        raise InputError(
            f"unknown suite or lm-eval task {', '.join(repr(u) for u in unknown)}; shipped "
            f"suites: {', '.join(_SUITES)}; lm-eval tasks: `lm_eval ls tasks`", field="suite")
    return tm


def _primary_metric(task_results: dict[str, Any], config: dict[str, Any] | None) -> str | None:
    """First metric of the task's metric_list (first filter), else the first result key."""
    keys = [k for k, v in task_results.items()
            if "," in k and "_stderr" not in k.split(",")[0] and isinstance(v, (int, float))]
    if config:
        for m in config.get("metric_list") or []:
            for k in keys:
                if k.split(",")[0] == m.get("metric"):
                    return k
    return keys[0] if keys else None


def _response(sample: dict[str, Any]) -> str | None:
    """The raw generated text of a generate_until item (None for log-likelihood items)."""
    try:
        first = sample["resps"][0][0]
    except (KeyError, IndexError, TypeError):
        return None
    return first if isinstance(first, str) else None


def _suite_result(name: str, samples: list[dict[str, Any]], task_results: dict[str, Any],
                  config: dict[str, Any] | None, chat: bool) -> SuiteResult:
    info = _SUITES.get(name)
    metric = info.metric if info else _primary_metric(task_results, config)
    detail = ""
    items: list[ItemScore] = []
    if metric is None:
        detail = "no numeric metric in lm-eval's results"
    else:
        mname, filt = metric.split(",", 1)
        rows = sorted((s for s in samples if s.get("filter") == filt), key=lambda s: s["doc_id"])
        for s in rows:
            value = s.get(mname)
            try:
                score = float(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                detail = (f"metric {mname} is not a per-item number (corpus-level metric); "
                          "no per-item scores")
                items = []
                break
            doc = s.get("doc") or {}
            item_id = str(doc["id"]) if isinstance(doc, dict) and "id" in doc else str(s["doc_id"])
            items.append(ItemScore(id=item_id, score=score, response=_response(s)))
    score = (sum(i.score for i in items) / len(items)) if items else None
    if score is None and metric is not None and isinstance(task_results.get(metric), (int, float)):
        score = float(task_results[metric])
    if score is not None and math.isnan(score):
        score = None
    return SuiteResult(suite=name, metric=metric or "", score=score, n=len(items), items=items,
                       shipped=info is not None, chance=info.chance if info else None,
                       apply_chat_template=chat, detail=detail)


def _chat_for(name: str, requested: bool | None, has_template: bool) -> bool:
    if requested is not None:
        return requested
    info = _SUITES.get(name)
    return bool(info and info.chat_template and has_template)


def evaluate_lm(lm: Any, suites: Sequence[str], *, limit: int | None = None,
                apply_chat_template: bool | None = None, include_path: Sequence[str | Path] = (),
                verbose: bool = False, seed: int = 0) -> BenchmarkResults:
    """Run lm-eval on an ``lm_eval.api.model.LM`` (see :func:`make_lm`) and collect per-item scores.

    ``apply_chat_template``: None → each shipped suite's default (``SuiteInfo.chat_template``,
    used only when the tokenizer has a chat template), user-named tasks without it.
    ``limit``: the first N documents of each task (lm-eval's ``limit``).
    ``include_path``: extra folders of lm-eval task YAMLs (your own offline tasks).
    Score of a suite = mean of its per-item scores under the primary metric.
    """
    lm_eval = _require_lm_eval()
    names = list(dict.fromkeys(suites))
    if not names:
        raise InputError("no suite given", field="suite")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}", field="limit")
    start = time.perf_counter()
    tm = _task_manager(names, include_path)
    tok = getattr(lm, "tokenizer", None)
    has_template = getattr(tok, "chat_template", None) is not None
    groups: dict[bool, list[str]] = {}
    for n in names:
        groups.setdefault(_chat_for(n, apply_chat_template, has_template), []).append(n)

    results: dict[str, SuiteResult] = {}
    for chat, group in groups.items():
        with _quiet_lm_eval(verbose):
            try:
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=group, task_manager=tm, limit=limit, log_samples=True,
                    apply_chat_template=chat, bootstrap_iters=0, random_seed=seed,
                    numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
            except (ConnectionError, OSError) as e:
                raise EvaluationError(
                    f"lm-eval task(s) {', '.join(group)} could not load their data; tasks other "
                    f"than the shipped suites ({', '.join(_SUITES)}) download from the Hugging "
                    f"Face hub, which is offline or unreachable here: {type(e).__name__}: {e}"
                ) from e
        if out is None:  # pragma: no cover - non-zero rank
            continue
        configs = out.get("configs", {})
        for task, samples in out["samples"].items():
            results[task] = _suite_result(task, samples, out["results"].get(task, {}),
                                          configs.get(task), chat)
    device = str(getattr(lm, "device", "cpu"))
    bs = getattr(lm, "batch_size", 0)
    return BenchmarkResults(suites=results, limit=limit, batch_size=bs if isinstance(bs, int) else 0,
                            device=device, seconds=time.perf_counter() - start,
                            lm_eval_version=getattr(lm_eval, "__version__", "unknown"))


def evaluate_model(model: Any, tokenizer: Any, suites: Sequence[str] = DEFAULT_SUITES, *,
                   limit: int | None = None, batch_size: int = 16, device: str | None = None,
                   apply_chat_template: bool | None = None,
                   include_path: Sequence[str | Path] = (), verbose: bool = False,
                   seed: int = 0) -> BenchmarkResults:
    """Evaluate a loaded causal LM on shipped suites and/or lm-eval tasks, in-process.

    Wraps ``model`` in lm-eval's ``HFLM`` (:func:`make_lm`) and calls
    :func:`evaluate_lm`. The model's train/eval mode is restored afterwards.
    """
    was_training = bool(getattr(model, "training", False))
    try:
        lm = make_lm(model, tokenizer, batch_size=batch_size, device=device)
        return evaluate_lm(lm, suites, limit=limit, apply_chat_template=apply_chat_template,
                           include_path=include_path, verbose=verbose, seed=seed)
    finally:
        if was_training:
            model.train()


def retention_by_suite(before: BenchmarkResults, after: BenchmarkResults, *, n_boot: int = 2000,
                       seed: int = 0) -> dict[str, "RetentionResult"]:
    """Per suite of either result: :func:`capability_retention` paired by item id.

    Nothing is dropped silently: a suite in one result only, a suite without per-item
    scores on either side, or one whose item ids differ between the two gets an
    unmeasured :class:`realign.metrics.RetentionResult` saying why (so is one whose score
    before is 0). Suites come in the baseline's order, then the after-only ones.
    """
    from .metrics import RetentionResult, capability_retention

    out: dict[str, RetentionResult] = {}
    for name in list(before.suites) + [n for n in after.suites if n not in before.suites]:
        b, a = before.suites.get(name), after.suites.get(name)
        if a is None or b is None:
            why = ("not in the evaluated model's results" if a is None else
                   "not in the baseline's results (the baseline was not evaluated on it)")
            out[name] = RetentionResult.unmeasured(why, n=0, n_boot=n_boot, seed=seed,
                                                   before_mean=b.score if b else None,
                                                   after_mean=a.score if a else None)
            continue
        if not b.items or not a.items:
            side = "before" if not b.items else "after"
            why = b.detail or a.detail or f"no per-item scores {side}"
            out[name] = RetentionResult.unmeasured(why, n=0, n_boot=n_boot, seed=seed,
                                                   before_mean=b.score, after_mean=a.score)
            continue
        bi, ai = b.by_id(), a.by_id()
        if set(bi) != set(ai):
            only_b, only_a = len(set(bi) - set(ai)), len(set(ai) - set(bi))
            out[name] = RetentionResult.unmeasured(
                f"the items differ ({only_b} only before, {only_a} only after): retention "
                "compares the same items", n=0, n_boot=n_boot, seed=seed,
                before_mean=b.score, after_mean=a.score)
            continue
        out[name] = capability_retention(bi, ai, n_boot=n_boot, seed=seed)
    return out


def evaluate_path(model: Any = "default", suites: Sequence[str] = DEFAULT_SUITES, *,
                  limit: int | None = None, batch_size: int = 16, device: str | None = None,
                  apply_chat_template: bool | None = None,
                  include_path: Sequence[str | Path] = (), seed: int = 0,
                  progress: Any = None) -> BenchmarkResults:
    """Load ``model`` (a folder, ``"default"`` or a hub id) and evaluate it suite by suite.

    The same numbers as :func:`evaluate_model` on the loaded model (each suite is its own
    ``simple_evaluate`` call with the same seeds), with ``progress(done, total, message)``
    after the load and after each suite; ``seconds`` is the sum over suites.
    """
    from .backends.trl import TRLBackend

    names = list(dict.fromkeys(suites))
    if not names:
        raise InputError("no suite given", field="suite")
    _task_manager(names, include_path)  # unknown names fail before the model loads
    say = progress or (lambda d, t, m: None)
    total = len(names) + 1
    say(0, total, f"loading {model}")
    handle = TRLBackend().load(model, device=device)
    lm = make_lm(handle.model, handle.tokenizer, batch_size=batch_size)
    merged: BenchmarkResults | None = None
    for k, name in enumerate(names, start=1):
        say(k, total, f"running {name} ({k}/{len(names)})")
        res = evaluate_lm(lm, [name], limit=limit, apply_chat_template=apply_chat_template,
                          include_path=include_path, seed=seed)
        if merged is None:
            merged = res
        else:
            merged.suites.update(res.suites)
            merged.seconds += res.seconds
    say(total, total, "done")
    assert merged is not None
    return merged
