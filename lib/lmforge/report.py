"""The evaluation report: metrics.csv (one row per stage), loss-curve PNGs, report.md.

Every file is written atomically. Plots are drawn on a bare ``matplotlib.figure.Figure``,
which renders PNG with the Agg canvas and never touches pyplot's global state or a display.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Sequence

import pandas as pd

from lmforge.errors import LmforgeError
from lmforge.files import atomic_write, atomic_write_text

# Table columns, in order, and what each means (the report's legend).
COLUMNS = {
    "val_loss": "next-token loss on the pretraining val text (nats/token)",
    "val_ppl": "its perplexity, exp(val_loss)",
    "val_bpb": "bits per byte of that text",
    "accuracy": "share of greedy answers to held-out verifiable prompts that are correct",
    "accuracy_sampled": "share of temperature-1 samples (eval.samples_per_prompt per prompt) that are correct: pass@1",
    "pass_at_k": "share of prompts with a correct answer among those samples: pass@k, k = eval.samples_per_prompt",
    "rm_score": "mean reward-model score of the greedy answers",
    "rm_score_sampled": "mean reward-model score of one temperature-1 sample per prompt (the expected reward)",
    "win_rate": "reward-model win rate of the greedy answers against the SFT model's, ties counted 1/2",
    "wins": "prompts won against SFT",
    "ties": "prompts tied with SFT (identical answer or score within 1e-6)",
    "losses": "prompts lost against SFT",
    "kl_to_sft": "KL(model || SFT) of whole responses: mean log-ratio on one temperature-1 sample per prompt",
    "dismissive_rate": "share of greedy answers that are dismissive non-answers (or empty)",
    "repetitive_rate": "share of greedy answers that repeat themselves (repeated word trigrams > 20%)",
    "response_tokens": "mean greedy answer length in tokens",
}
COUNTS = ("wins", "ties", "losses")


def metrics_table(per_stage: dict[str, dict]) -> pd.DataFrame:
    """One row per stage (in the given order), one column per metric of ``COLUMNS``; None stays missing."""
    table = pd.DataFrame([{c: m.get(c) for c in COLUMNS} for m in per_stage.values()],
                         index=pd.Index(list(per_stage), name="stage"), columns=list(COLUMNS))
    for c in COUNTS:  # whole numbers that may be missing: nullable integers, so the CSV says 12, not 12.0
        table[c] = table[c].astype("Int64")
    return table


def write_metrics_csv(table: pd.DataFrame, path: str | Path) -> None:
    atomic_write_text(path, table.to_csv())


def task_table(summary: dict) -> pd.DataFrame:
    """One row per stage, one column per task of ``summary["tasks"]``: its greedy accuracy, and
    " / " its pass@k where that was measured (``accuracy/<task>``, ``pass_at_k/<task>`` metrics)."""
    def cell(m: dict, task: str) -> str:
        greedy, passed = m.get(f"accuracy/{task}"), m.get(f"pass_at_k/{task}")
        if greedy is None:
            return "–"
        return f"{greedy:.3f}" + (f" / {passed:.3f}" if passed is not None else "")

    tasks = summary.get("tasks") or {}
    return pd.DataFrame([{f"{t} ({n})": cell(m, t) for t, n in tasks.items()} for m in summary["stages"].values()],
                        index=pd.Index(list(summary["stages"]), name="stage"))


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as text: 4 significant digits, '–' where a metric does not apply."""
    def cell(v) -> str:
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            return "–"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return table.astype(object).map(cell)


# --------------------------------------------------------------------------- loss curves


def read_history(model_path: str | Path) -> list[dict]:
    """The eval history a training stage wrote in ``metrics.json`` beside its ``model.pt`` ([] if none)."""
    path = Path(model_path).with_name("metrics.json")
    if not path.exists():
        return []
    try:
        history = json.loads(path.read_text()).get("history") or []
    except (ValueError, AttributeError):
        return []
    return [h for h in history if isinstance(h, dict) and "step" in h]


def plot_history(stage: str, history: Sequence[dict], path: str | Path) -> bool:
    """One panel per numeric metric of the history against the step (3 per row), val_loss first.

    Returns False, writing nothing, when the history has no numeric metric.
    """
    from matplotlib.figure import Figure

    keys = sorted({k for h in history for k, v in h.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    keys.sort(key=lambda k: k != "val_loss")  # the loss curve first
    if not keys:
        return False
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(3.6 * cols, 2.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes, keys):
        points = [(h["step"], h[key]) for h in history if isinstance(h.get(key), (int, float))]
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(stage)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return True


def write_plots(histories: dict[str, list[dict]], folder: str | Path) -> dict[str, Path]:
    """``<folder>/<stage>.png`` for each stage with a history; returns {stage: path} of those written.

    The folder ends up holding exactly these: a plot left by an earlier run is removed.
    """
    written = {}
    for stage, history in histories.items():
        path = Path(folder) / f"{stage}.png"
        if history and plot_history(stage, history, path):
            written[stage] = path
    for old in Path(folder).glob("*.png") if Path(folder).is_dir() else []:
        if old not in written.values():
            old.unlink()
    return written


# --------------------------------------------------------------------------- report.md


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" for line in (text.splitlines() or [""])) if text.strip() else "> *(empty)*"


def render_report(summary: dict, table: pd.DataFrame, samples: dict[str, list[dict]],
                  plots: dict[str, Path], report_dir: str | Path) -> str:
    """report.md: how the numbers were made, the table, notes, loss curves, sample answers per stage."""
    report_dir = Path(report_dir)
    lines = [
        "# lmforge evaluation",
        "",
        f"{summary['n_prompts']} held-out verifiable prompts (built-in `rl_val` split"
        + (f", {summary['n_skipped']} left out: too long for the context" if summary["n_skipped"] else "")
        + f"), greedy answers of at most {summary['max_new_tokens']} tokens; reward model "
        f"`{summary['reward_model']}`; reference for win rate and KL: "
        + (f"`{summary['reference']}`." if summary["reference"] else "none (the SFT model is not evaluated)."),
        "",
        "## Metrics",
        "",
        format_table(table).to_markdown(),
        "",
        *[f"- `{c}`: {meaning}" for c, meaning in COLUMNS.items()],
        "",
    ]
    if summary.get("tasks"):
        lines += ["## Accuracy by task", "",
                  ("Greedy accuracy" + (f" / pass@{summary['pass_k']}" if summary.get("pass_k") else "")
                   + " on each task's prompts (their number in brackets)."), "",
                  task_table(summary).to_markdown(), ""]
    if summary.get("notes"):
        lines += ["Notes:", "", *[f"- {n}" for n in summary["notes"]], ""]
    if plots:
        lines += ["## Training curves", ""]
        for stage, path in plots.items():
            lines += [f"![{stage}]({path.relative_to(report_dir).as_posix()})", ""]
    lines += ["## Samples", ""]
    for stage, rows in samples.items():
        lines += [f"### {stage}", ""]
        for s in rows:
            verdict = "correct" if s["correct"] else "wrong"
            lines += [f"**{s['prompt']}** (reference: {s['answer']}; {verdict}, reward {s['rm_score']:.3f})", "",
                      _quote(s["response"]), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- several seeds


def seed_summary(tables: dict[int, str | Path]) -> pd.DataFrame:
    """Mean and sample std (ddof 1) of every metric per stage across seeds.

    tables: seed -> that seed's evaluation ``metrics.csv``. Returns one row per
    (stage, metric), in the stages' and metrics' order, with columns n, mean, std
    and one column per seed (the raw values, so nothing is hidden by the summary).
    """
    if not tables:
        raise LmforgeError("config key 'seeds' is empty: list two or more seeds (seeds: [1, 2, 3]) to compare them")
    frames = {}
    for seed, path in tables.items():
        try:
            frames[seed] = pd.read_csv(path, index_col="stage")
        except (OSError, ValueError) as e:
            raise LmforgeError(f"{path}: not an evaluation metrics.csv ({e})") from None
    long = pd.concat({seed: f.stack() for seed, f in frames.items()}, axis=1)  # (stage, metric) x seed
    long.index.names = ["stage", "metric"]
    out = pd.DataFrame({"n": long.notna().sum(axis=1), "mean": long.mean(axis=1), "std": long.std(axis=1, ddof=1)})
    return pd.concat([out, long.rename(columns=lambda s: f"seed_{s}")], axis=1)


def render_seed_summary(summary: pd.DataFrame) -> str:
    """Markdown: one row per stage, one 'mean ± std' cell per metric."""
    cells = summary.apply(lambda r: f"{r['mean']:.4g} ± {r['std']:.2g}" if r["n"] > 1 else f"{r['mean']:.4g}",
                          axis=1).unstack("metric")
    cells = cells.reindex(index=summary.index.unique("stage"), columns=summary.index.unique("metric")).fillna("–")
    seeds = [c[len("seed_"):] for c in summary.columns if c.startswith("seed_")]
    return (f"# Evaluation across seeds {', '.join(seeds)}\n\nmean ± sample std over the seeds "
            f"(n = {len(seeds)}); per-seed values in summary.csv.\n\n{cells.to_markdown()}\n")


def write_seed_summary(tables: dict[int, str | Path], csv_path: str | Path, md_path: str | Path) -> pd.DataFrame:
    summary = seed_summary(tables)
    atomic_write_text(csv_path, summary.to_csv())
    atomic_write_text(md_path, render_seed_summary(summary))
    return summary
