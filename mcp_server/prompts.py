"""The prompt that walks an agent through the pipeline for a model and a dataset."""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer
from realign.gates import PRESETS

try:
    from realign.config import STAGES
except ImportError:  # a library without the pipeline
    STAGES = {}


def register(mcp: MCPServer, tool_names: set[str]) -> None:
    @mcp.prompt(title="Realign a model with DPO, gate by gate")
    def dpo_pipeline(model: str, dataset: str, eval_sets: str = "",
                     preset: str = "standard") -> str:
        """Walk through the realign DPO workflow for MODEL on DATASET (preference pairs).

        eval_sets: comma-separated evaluation files to decontaminate against.
        preset: relaxed, standard or strict.
        """
        evals = [e.strip() for e in eval_sets.split(",") if e.strip()]
        if preset not in PRESETS:
            preset = "standard"
        ev = f", eval_sets={evals!r}" if evals else ""
        stages = ", ".join(f"{n} ({k})" for n, k in STAGES.items()) or "see workflow.md"
        steps = [
            f"You are realigning the model `{model}` with DPO on the preference data "
            f"`{dataset}`, using the realign MCP tools. Every stage ends with a quality gate; "
            "report the numbers the tools return, never estimates.",
            "1. Read the skill first: resources/read skill://realign-dpo-workflow/SKILL.md "
            "(then workflow.md and the stage docs it links, only as needed).",
            f"2. Call get_thresholds(preset='{preset}') and keep the gate table in mind.",
            f"3. Call validate_preference_data(path='{dataset}'{ev}, preset='{preset}'). "
            "If a gate fails, read findings (duplicates, identical, empty, contaminated, "
            "malformed line numbers) and fix the data, e.g. clean_preference_data(path, "
            "output) writes the usable pairs; never lower a threshold to pass.",
        ]
        if evals:
            steps.append(f"4. Call check_decontamination(path='{dataset}', eval_sets={evals!r}) "
                         "and list which pairs contain which evaluation items.")
        else:
            steps.append("4. Without evaluation sets the decontamination gate is unmeasured: "
                         "ask the user which benchmarks the model will be evaluated on.")
        over = f", overrides=['eval_sets=[{','.join(evals)}]']" if evals else ""
        steps += [
            f"5. Call create_run_config(output='run.yaml', model='{model}', "
            f"data='{dataset}', preset='{preset}'{over}): it writes a commented run config "
            "with this machine's DPO batch size (read its notes) and returns the "
            "start_pipeline call that runs it.",
            f"6. Call start_pipeline(config_path='run.yaml'). Stages, in order: {stages}. "
            "It returns a run id at once.",
            "7. Poll run_status(run=<id>) every minute or so; report the current stage and "
            "progress. Each finished stage's verdict is also the resource "
            "realign://runs/<id>/stages/<k>-<name>/verdict.json.",
            "8. On state 'failed', show the failing gate (value, op, threshold, detail) and "
            "its remedy (the next step, with values), explain it using the stage doc, and "
            "apply the remedy: a config change is a new config (create_run_config with "
            "overrides) or start_pipeline(config_path, overrides=[...]); on 'error', show the message "
            "(it names the file, field or stage to fix) and fix that first; on 'interrupted' "
            "or 'cancelled', call resume_run(run=<id>). On 'passed', summarise every gate. "
            "To stop a running job (a wrong config, a change of plan), call "
            "cancel_run(run=<id>): the run keeps its finished stages and checkpoints.",
        ]
        extra = {
            "calibrate_hardware": f"Before training, calibrate_hardware(model='{model}') measures "
                                  "the DPO batch-size curve on this machine (use its recommended "
                                  "batch size and gradient accumulation in the config).",
            "calculate_ifd_score": f"calculate_ifd_score(path='{dataset}') shows which pairs' "
                                   "answers do not follow from their prompt (IFD > 1).",
            "score_preference_gap": "Without explicit scores the preference_gap gate is "
                                    "unmeasured until stage 4; score_preference_gap(path, "
                                    "reward_model) measures it with a trained reward model.",
            "compute_kl": "During DPO, compute_kl measures KL(policy || reference) on a probe set.",
            "evaluate_benchmarks": "evaluate_benchmarks(model=...) scores any model on the "
                                   "offline suites (list_suites); stage 7 compares them before "
                                   "and after DPO.",
            "rollback": "If stage 7 (evaluation) rejects the model, call rollback(run=<id>) to "
                        "restore the best earlier model that passes every gate.",
            "generate_report": "At the end, generate_report(run=<id>) writes report.html and "
                               "report.md; give the user the path.",
        }
        steps += [text for name, text in extra.items() if name in tool_names]
        return "\n".join(steps)
