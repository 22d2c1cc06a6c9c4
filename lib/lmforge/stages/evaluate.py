"""Evaluate stage: the same held-out measures for every trained stage's model, and the report.

The stages are ``eval.stages`` that have a ``model_<stage>`` input. Every model
answers the same held-out prompts (the first ``eval.n_prompts`` of the built-in
``rl_val`` split that fit every model's context); the reward model scores the
answers. Win rate and KL are taken against the SFT model, so they need it in
``eval.stages``; without it they are None (a note in the report says so).

Outputs: metrics.csv, summary.json, and beside them samples.jsonl and
plots/<stage>.png; report.md is written last and marks completion.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from lmforge.data.builtin import make_task_data
from lmforge.data.prompts import fitting_prompts
from lmforge.errors import LmforgeError
from lmforge.evaluate import evaluate_model
from lmforge.files import atomic_write_json, atomic_write_text
from lmforge.loader import load_model, read_checkpoint
from lmforge.report import metrics_table, read_history, render_report, write_metrics_csv, write_plots
from lmforge.rewards import RewardFunction, RewardSpec
from lmforge.stages.common import setup
from lmforge.tasks import is_correct
from lmforge.train.lm import TokenWindows

REFERENCE = "sft"


def stage_list(params: dict, inputs: dict) -> list[str]:
    """eval.stages that have a model input, in config order."""
    stages = [s for s in params["eval"]["stages"] if f"model_{s}" in inputs]
    if not stages:
        raise LmforgeError(f"eval.stages: none of {params['eval']['stages']} has a model to evaluate")
    for s in stages:
        if not Path(inputs[f"model_{s}"]).exists():
            raise LmforgeError(f"eval.stages lists '{s}' but {inputs[f'model_{s}']} does not exist; "
                               f"build that stage first or remove '{s}' from eval.stages")
    return stages


def check_tokenizers(model_shas: dict[str, str], rm: dict, rm_path: str, meta_path: str) -> None:
    """Every model ({path: tokenizer sha256}), the reward model (its checkpoint) and the val tokens
    must share one tokenizer."""
    for path, sha in model_shas.items():
        if sha != rm["tokenizer_sha256"]:
            raise LmforgeError(f"{path} and the reward model {rm_path} use different tokenizers (sha256 "
                               f"{sha[:12]} vs {rm['tokenizer_sha256'][:12]}); the reward model can only score "
                               f"answers in its own tokens: evaluate models of one pipeline")
    meta_sha = json.loads(Path(meta_path).read_text())["tokenizer_sha256"]
    if meta_sha != rm["tokenizer_sha256"]:
        raise LmforgeError(f"{meta_path}: the val tokens were made with another tokenizer than the reward model "
                           f"{rm_path} (sha256 {meta_sha[:12]} vs {rm['tokenizer_sha256'][:12]}); "
                           f"rerun the tokenize rule")


def sample_rows(stage: str, records: list[dict], answers) -> list[dict]:
    """samples.jsonl rows: a stage's greedy answers to the first records, with their verdict and reward."""
    return [{"stage": stage, "prompt": r["prompt"], "answer": r["answer"], "task": r["task"],
             "response": answers.responses[i], "rm_score": answers.scores[i],
             "correct": is_correct(answers.responses[i], r["answer"], r["task"])} for i, r in enumerate(records)]


def write_outputs(run, env, params: dict, outputs: dict, summary: dict, samples: dict[str, list[dict]],
                  histories: dict[str, list[dict]]):
    """metrics.csv, summary.json, samples.jsonl, plots/, then report.md; mirrored to MLflow. Returns the table."""
    out_dir = Path(outputs["report"]).parent
    table = metrics_table(summary["stages"])
    plots = write_plots(histories, out_dir / "plots")
    write_metrics_csv(table, outputs["metrics"])
    atomic_write_json(outputs["summary"], summary)
    atomic_write_text(out_dir / "samples.jsonl", "".join(json.dumps(x) + "\n" for rows in samples.values()
                                                          for x in rows))
    report = render_report(summary, table, samples, plots, out_dir)
    atomic_write_text(outputs["report"], report)  # last: its presence means the evaluation is complete

    for stage, metrics in summary["stages"].items():
        run.log_metrics({f"{stage}/{k}": v for k, v in metrics.items()}, step=0)
    run.log_dict(params, "config.json")
    for path in (outputs["metrics"], outputs["summary"], outputs["report"], out_dir / "samples.jsonl"):
        run.log_artifact(path)
    for path in plots.values():
        run.log_artifact(path, "plots")
    if env.log_path:
        run.log_artifact(env.log_path)
    return table


def run(params: dict, inputs: dict, outputs: dict, env) -> dict:
    device = setup(env, params["seed"])
    ecfg = params["eval"]
    stages = stage_list(params, inputs)
    paths = {s: inputs[f"model_{s}"] for s in stages}
    # Checkpoints on the CPU; each model visits the device only while it is evaluated.
    models, shas = {}, {}
    for stage, path in paths.items():
        models[stage], tok, ckpt = load_model(path)
        shas[path] = ckpt["tokenizer_sha256"]
    rm_ckpt = read_checkpoint(inputs["reward_model"])
    if rm_ckpt["kind"] != "reward_model":
        raise LmforgeError(f"{inputs['reward_model']}: is a {rm_ckpt['kind']} checkpoint, but a reward model "
                           f"is needed here")
    check_tokenizers(shas, rm_ckpt, inputs["reward_model"], inputs["meta"])  # one tokenizer: tok serves all
    rm_context = rm_ckpt["model_config"]["max_seq_len"]
    del ckpt, rm_ckpt  # the weights are in the models now
    meta = json.loads(Path(inputs["meta"]).read_text())
    contexts = [m.cfg.max_seq_len for m in models.values()] + [rm_context]
    heldout = make_task_data(params["data"]["builtin"], params["seed"])["rl_val"][:ecfg["n_prompts"]]
    # One prompt set for all, so every comparison is prompt by prompt.
    records = fitting_prompts(heldout, tok, min(contexts))
    if not records:
        raise LmforgeError(f"eval: no held-out prompt fits model.max_seq_len ({min(contexts)}); raise it")
    reference = REFERENCE if REFERENCE in stages else None
    notes = [] if reference else [
        "win rate and KL are measured against the SFT model; 'sft' is not in eval.stages, so they are omitted"]
    print(f"evaluate: {', '.join(stages)} on {len(records)} held-out prompts "
          f"({len(heldout) - len(records)} too long), on {device}")

    rewards = RewardFunction(RewardSpec(rm=1.0), policy_tokenizer=tok, reward_model_path=inputs["reward_model"],
                             device=device, batch_size=ecfg["batch_size"])

    def scorer(recs, responses) -> list[float]:
        return rewards(recs, responses).rm.tolist()

    lineage = {f"model_{s}": p for s, p in paths.items()}
    with env.tracker(params, {**lineage, **{k: inputs[k] for k in ("reward_model", "val", "meta")}}) as run:
        run.set_tags({"device": str(device), "stages": ",".join(stages)})
        t0 = time.perf_counter()
        # The reference goes first: every other stage is compared with its answers.
        order = ([reference] if reference else []) + [s for s in stages if s != reference]
        ref_model = models[reference].to(device) if reference else None
        ref_answers = None
        per_stage, answers, timing = {}, {}, {}
        for stage in order:
            t = time.perf_counter()
            model = models[stage].to(device)
            windows = TokenWindows(inputs["val"], meta["dtype"], model.cfg.max_seq_len, ecfg["batch_size"],
                                   params["seed"], device)
            is_ref = stage == reference
            metrics, answers[stage] = evaluate_model(
                model, tok, records, scorer, val_windows=windows, val_batches=ecfg["val_batches"],
                bytes_per_token=meta["val_bytes_per_token"], max_new_tokens=ecfg["max_new_tokens"],
                seed=params["seed"], batch_size=ecfg["batch_size"],
                # The reference against itself: KL 0 and win rate 1/2 by definition, no need to measure.
                reference=None if is_ref else ref_model, reference_answers=ref_answers,
                pass_k=ecfg["samples_per_prompt"])
            if is_ref:
                ref_answers = answers[stage]
                metrics.update({"win_rate": 0.5, "wins": 0, "ties": len(records), "losses": 0, "kl_to_sft": 0.0})
            if not is_ref:
                model.to("cpu")
            per_stage[stage] = metrics
            timing[stage] = time.perf_counter() - t
            print(f"evaluate: {stage} done in {timing[stage]:.1f}s")
        per_stage = {s: per_stage[s] for s in stages}  # back to config order
        wall = time.perf_counter() - t0

        summary = {"stages": per_stage, "reference": reference, "n_prompts": len(records),
                   "tasks": dict(sorted(Counter(r["task"] for r in records).items())),
                   "pass_k": ecfg["samples_per_prompt"],  # the k of the pass@k metric
                   "n_skipped": len(heldout) - len(records), "max_new_tokens": ecfg["max_new_tokens"],
                   "reward_model": str(inputs["reward_model"]), "notes": notes, "timing_s": timing,
                   "wall_s": wall, "device": str(device), "mlflow_run_id": run.run_id}
        samples = {s: sample_rows(s, records[:ecfg["n_samples"]], answers[s]) for s in stages}
        histories = {s: read_history(p) for s, p in {**paths, "reward": inputs["reward_model"]}.items()}
        table = write_outputs(run, env, params, outputs, summary, samples, histories)
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    print(f"evaluate: done in {wall:.1f}s")
    return summary
