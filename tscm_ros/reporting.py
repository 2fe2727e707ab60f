"""Reports: Markdown tables, CSV files and plots of recall and training runs, written atomically.

matplotlib is imported on first use, with the file-only Agg backend (robots and CI have no display).
"""

from __future__ import annotations

import csv
import textwrap
from collections.abc import Sequence
from pathlib import Path

from tscm_ros.atomic import atomic_file
from tscm_ros.recall import RecallResult


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
