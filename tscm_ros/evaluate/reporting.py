"""Reports: Markdown tables, JSON summaries, CSV files and plots of recall, loop-closure evaluation and
training runs, written atomically.

matplotlib is imported on first use, with the file-only Agg backend (robots and CI have no display).
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tscm_ros.atomic import atomic_directory, atomic_file
from tscm_ros.detect.detection import DEFAULT_MIN_SCORE
from tscm_ros.errors import ConfigError
from tscm_ros.evaluate.recall import RecallResult

if TYPE_CHECKING:
    from tscm_ros.evaluate.loop_evaluation import MethodRun


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def recall_table_markdown(results: Sequence[tuple[str, RecallResult]], title: str) -> str:
    """A Markdown table: one row per model, one column per recall@N (percent)."""
    ns = list(results[0][1].recall)
    lines = [
        f"## {title}",
        "",
        "| model | " + " | ".join(f"R@{n}" for n in ns) + " | queries |",
        "|---|" + "---:|" * (len(ns) + 1),
    ]
    for name, result in results:
        cells = " | ".join(f"{result.percent(n):.1f}" for n in ns)
        lines.append(f"| {name} | {cells} | {result.num_queries} |")
    return "\n".join(lines) + "\n"


def plot_recall_curves(results: Sequence[tuple[str, RecallResult]], path: str, title: str) -> None:
    """Recall@N against N for each model, as a PNG."""
    plt = pyplot()

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, result in results:
        ns = list(result.recall)
        axes.plot(ns, [result.percent(n) for n in ns], marker="o", label=name)
    axes.set_xscale("log")
    axes.set_xticks(list(results[0][1].recall), labels=[str(n) for n in results[0][1].recall])
    axes.set_xlabel("N (top-N retrieved)")
    axes.set_ylabel("recall@N (%)")
    axes.set_ylim(0, 100)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    axes.set_title(textwrap.fill(title, 70), fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_recall_report(results: Sequence[tuple[str, RecallResult]], title: str, out: Path,
                        overwrite: bool) -> None:
    """Write recall.md, recall.png and recall.json into ``out`` atomically."""
    if out.exists() and not overwrite:
        raise ConfigError(f"output {out} already exists (choose another path or pass --overwrite)")
    with atomic_directory(out) as staging:
        (staging / "recall.md").write_text(recall_table_markdown(results, title), encoding="utf-8")
        plot_recall_curves(results, str(staging / "recall.png"), title)
        summary = {
            "title": title,
            "models": [
                {"model": name, "recall": {str(n): r for n, r in result.recall.items()}, "queries": result.num_queries,
                 "queries_without_match": result.num_skipped}
                for name, result in results
            ],
        }
        (staging / "recall.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def write_metrics_csv(history: Sequence[dict], path: Path) -> None:
    """One row per epoch, atomically."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def plot_learning_curves(history: Sequence[dict], path: Path, title: str) -> None:
    """Losses and val recall@N per epoch as a PNG, atomically."""
    plt = pyplot()

    epochs = [row["epoch"] for row in history]
    figure, (losses, recalls) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("loss", "loss_hard", "loss_soft", "loss_cm"):
        if name in history[0]:
            losses.plot(epochs, [row[name] for row in history], marker="o", label=name)
    losses.set_xlabel("epoch")
    losses.set_ylabel("training loss")
    losses.legend()
    for key in (key for key in history[0] if key.startswith("val_recall@")):
        recalls.plot(epochs, [100 * row[key] for row in history], marker="o", label=key.removeprefix("val_"))
    recalls.set_xlabel("epoch")
    recalls.set_ylabel("val recall (%)")
    recalls.set_ylim(0, 100)
    recalls.legend()
    figure.suptitle(title)
    figure.tight_layout()
    with atomic_file(path) as tmp:
        figure.savefig(tmp, dpi=100)
    plt.close(figure)


# ----- loop-closure evaluation (evaluate --bag) ----------------------------------------------------


def format_percent(value: float) -> str:
    """A share as a percentage with one decimal; ``n/a`` for NaN (undefined)."""
    return "n/a" if math.isnan(value) else f"{100.0 * value:.1f}"


def loop_closure_table_markdown(runs: Sequence[MethodRun], title: str) -> str:
    """The Markdown table: one row per method, recall@N, AP, max recall at 100 % precision, latency."""
    ns = list(runs[0].metrics.recall_at)
    header = (["method", "model"] + [f"R@{n} %" for n in ns]
              + ["AP %", "max R @ P=100 % ", "at score >=", f"P / R % at score >= {DEFAULT_MIN_SCORE:g}",
                 "median ms/query", "keyframes", "dim"])
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |",
             "|---|---|" + "---:|" * (len(header) - 2)]
    for run in runs:
        m = run.metrics
        threshold = "-" if math.isnan(m.full_precision_threshold) else f"{m.full_precision_threshold:.3f}"
        precision, recall = run.at_score(DEFAULT_MIN_SCORE)
        at_default = f"{format_percent(precision)} / {format_percent(recall)}" if run.calibrated else "(uncalibrated)"
        cells = ([run.name, run.model_name] + [format_percent(m.recall_at[n]) for n in ns]
                 + [format_percent(m.average_precision), format_percent(m.max_recall_at_full_precision), threshold,
                    at_default, f"{run.median_latency_ms:.1f}", str(len(run.map_positions)), str(run.dim)])
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("R@N: share of queries with a true loop whose N best candidates include a keyframe within the "
                 "radius. AP and max R @ P=100 %: precision-recall of the top-1 candidate's score (see "
                 f"tscm_ros/evaluate/loop_metrics.py). P / R at score >= {DEFAULT_MIN_SCORE:g}: precision and recall "
                 "of the top-1 candidates the node publishes with its default min_score, scored by the map's own "
                 "calibration (tscm_ros/map/calibration.py). Latency: one query, describe + search "
                 "(+ the row's stages), this machine.")
    return "\n".join(lines) + "\n"


def _plot_pr_curves(runs: Sequence[MethodRun], path: Path, title: str) -> None:
    plt = pyplot()

    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    for run in runs:
        curve = run.metrics.curve
        recall = np.concatenate([[0.0], curve.recall])
        precision = np.concatenate([[1.0], curve.precision])
        line, = axes.step(100 * recall, 100 * precision, where="post",
                          label=f"{run.name} (AP {format_percent(run.metrics.average_precision)} %)")
        best = run.metrics.max_recall_at_full_precision
        if not math.isnan(best) and best > 0:
            axes.plot([100 * best], [100.0], marker="*", markersize=12, color=line.get_color())
    axes.set_xlabel("recall (% of queries with a true loop)")
    axes.set_ylabel("precision of the top-1 candidate (%)")
    axes.set_xlim(0, 100)
    axes.set_ylim(0, 102)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="lower left")
    axes.set_title("Top-1 precision-recall (star: max recall at 100 % precision)\n"
                   + textwrap.fill(title, 100), fontsize="x-small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_trajectories(runs: Sequence[MethodRun], path: Path, radius_m: float) -> None:
    plt = pyplot()

    columns = min(2, len(runs))
    rows = math.ceil(len(runs) / columns)
    figure, axes_grid = plt.subplots(rows, columns, figsize=(6 * columns, 5 * rows), squeeze=False)
    for axes, run in zip(axes_grid.flat, runs):
        axes.plot(run.map_positions[:, 0], run.map_positions[:, 1], ".", color="0.6", markersize=4,
                  label="map keyframes (reference)")
        axes.plot(run.query_positions[:, 0], run.query_positions[:, 1], "-", color="tab:blue", linewidth=0.8,
                  label="query trajectory")
        for good, colour, label in ((True, "tab:green", "top-1 within radius"), (False, "tab:red", "top-1 wrong")):
            segments = [(run.query_positions[q, :2], run.map_positions[ids[0], :2])
                        for q, ids in enumerate(run.ranked_ids)
                        if len(ids) and bool(run.within[q, ids[0]]) == good]
            for i, (start, end) in enumerate(segments):
                axes.plot([start[0], end[0]], [start[1], end[1]], "-", color=colour, linewidth=1.0, alpha=0.7,
                          label=label if i == 0 else None)
        no_loop = ~run.within.any(axis=1) if run.within.size else np.ones(len(run.query_positions), dtype=bool)
        if no_loop.any():
            axes.plot(run.query_positions[no_loop, 0], run.query_positions[no_loop, 1], "x", color="black",
                      markersize=5, label=f"query with no keyframe within {radius_m:g} m")
        axes.set_aspect("equal", adjustable="datalim")
        axes.set_xlabel("x (m)")
        axes.set_ylabel("y (m)")
        axes.set_title(f"{run.name}: R@1 {format_percent(run.metrics.recall_at[min(run.metrics.recall_at)])} %",
                       fontsize="small")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="x-small", loc="best")
    for axes in list(axes_grid.flat)[len(runs):]:
        axes.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_") or "method"


def _write_queries_csv(run: MethodRun, path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["stamp_ns", "x", "y", "z", "has_true_loop", "top1_keyframe_id", "top1_score",
                         "top1_correct", "first_correct_rank", "latency_ms"])
        for q, (ids, scores) in enumerate(zip(run.ranked_ids, run.ranked_scores)):
            correct = run.within[q, ids] if len(ids) else np.zeros(0, dtype=bool)
            first = int(np.argmax(correct)) + 1 if correct.any() else ""
            writer.writerow([int(run.query_stamps[q]), *(f"{v:.3f}" for v in run.query_positions[q]),
                             int(run.within[q].any()), int(ids[0]) if len(ids) else "",
                             f"{scores[0]:.6f}" if len(scores) else "", int(bool(correct[:1].any())), first,
                             f"{run.latencies_ms[q]:.3f}"])


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def write_loop_closure_report(runs: Sequence[MethodRun], title: str, out: Path, radius_m: float, overwrite: bool,
                              settings: dict, extra: Callable[[Path], None] | None = None) -> None:
    """Write loop_closure.md/.json, pr_curve.png, trajectories.png (when the queries have positions) and
    queries_<method>.csv into ``out`` atomically (a temp dir next to it, renamed into place); ``extra`` writes
    more into that temp dir."""
    if out.exists() and not overwrite:
        raise ConfigError(f"output {out} already exists (choose another path or pass --overwrite)")
    with atomic_directory(out) as staging:
        (staging / "loop_closure.md").write_text(loop_closure_table_markdown(runs, title), encoding="utf-8")
        _plot_pr_curves(runs, staging / "pr_curve.png", title)
        if not np.isnan(runs[0].query_positions).all():
            _plot_trajectories(runs, staging / "trajectories.png", radius_m)
        summary = {"title": title, "settings": settings, "methods": []}
        for run in runs:
            m = run.metrics
            precision, recall = run.at_score(DEFAULT_MIN_SCORE)
            _write_queries_csv(run, staging / f"queries_{_slug(run.name)}.csv")
            summary["methods"].append({
                "name": run.name, "model_name": run.model_name, "fingerprint": run.fingerprint, "dim": run.dim,
                "keyframes": len(run.map_positions), "queries": m.num_queries,
                "queries_with_true_loop": m.num_with_loop, "queries_without_candidates": m.num_without_candidates,
                "recall_at": {str(n): _nan_to_none(r) for n, r in m.recall_at.items()},
                "average_precision": _nan_to_none(m.average_precision),
                "max_recall_at_full_precision": _nan_to_none(m.max_recall_at_full_precision),
                "full_precision_threshold": _nan_to_none(m.full_precision_threshold),
                "calibrated": run.calibrated,
                "at_default_min_score": {"min_score": DEFAULT_MIN_SCORE, "precision": _nan_to_none(precision),
                                         "recall": _nan_to_none(recall)},
                "latency_ms": {"median": _nan_to_none(run.median_latency_ms),
                               "p95": _nan_to_none(float(np.percentile(run.latencies_ms, 95)))},
                "pr_curve": {"threshold": m.curve.thresholds.tolist(), "precision": m.curve.precision.tolist(),
                             "recall": [_nan_to_none(r) for r in m.curve.recall]},
                "queries_csv": f"queries_{_slug(run.name)}.csv",
            })
        (staging / "loop_closure.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if extra is not None:
            extra(staging)


def pose_graph_table_markdown(figures: Sequence, title: str) -> str:
    """A Markdown table of the trajectory errors per method (tscm_ros/evaluate/trajectory.py)."""
    lines = [f"## {title}", "",
             "| method | loops published | ATE odometry only (m) | ATE with loops (m) | ratio | "
             "ATE with false loops (m) | false loops |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for f in figures:
        ratio = f.ate_loops / f.ate_odometry if f.ate_odometry > 0 else math.nan
        lines.append(f"| {f.name} | {f.loops} | {f.ate_odometry:.2f} | {f.ate_loops:.2f} | {ratio:.2f} | "
                     f"{f.ate_false_loops:.2f} | {f.false_loops} |")
    return "\n".join(lines) + "\n"


def write_pose_graph_report(directory: Path, figures: Sequence, truth: np.ndarray, odometry: np.ndarray,
                            keyframes: np.ndarray, title: str, settings: dict) -> None:
    """pose_graph.md, pose_graph.json and pose_graph.png (ground truth, drifted odometry and each method's
    corrected path) into ``directory``."""
    (directory / "pose_graph.md").write_text(pose_graph_table_markdown(figures, title), encoding="utf-8")
    summary = {"title": title, "settings": settings, "methods": [
        {"name": f.name, "loops": f.loops, "loops_used": f.loops_used, "ate_odometry_m": _nan_to_none(f.ate_odometry),
         "ate_loops_m": _nan_to_none(f.ate_loops), "ate_false_loops_m": _nan_to_none(f.ate_false_loops),
         "false_loops": f.false_loops} for f in figures]}
    (directory / "pose_graph.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plt = pyplot()
    columns = min(2, len(figures))
    rows = math.ceil(len(figures) / columns)
    figure, axes_grid = plt.subplots(rows, columns, figsize=(6 * columns, 5 * rows), squeeze=False)
    for axes, f in zip(axes_grid.flat, figures):
        axes.plot(keyframes[:, 0], keyframes[:, 1], ".", color="0.7", markersize=3, label="map keyframes")
        axes.plot(truth[:, 0], truth[:, 1], "-", color="black", linewidth=1.0, label="ground truth")
        axes.plot(odometry[:, 0], odometry[:, 1], "-", color="tab:red", linewidth=0.8,
                  label=f"drifted odometry (ATE {f.ate_odometry:.2f} m)")
        axes.plot(f.corrected[:, 0], f.corrected[:, 1], "-", color="tab:green", linewidth=1.0,
                  label=f"with {f.loops} loops (ATE {f.ate_loops:.2f} m)")
        axes.set_aspect("equal", adjustable="datalim")
        axes.set_xlabel("x (m)")
        axes.set_ylabel("y (m)")
        axes.set_title(f.name, fontsize="small")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="x-small", loc="best")
    for axes in list(axes_grid.flat)[len(figures):]:
        axes.set_visible(False)
    figure.tight_layout()
    figure.savefig(directory / "pose_graph.png", dpi=90)
    plt.close(figure)
