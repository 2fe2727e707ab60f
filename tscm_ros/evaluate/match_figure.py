"""matches.png of ``evaluate --bag``: why a loop closure was wrong, shown. The queries whose top-1 candidate
was wrong and scored highest (the false loops a threshold lets through first), and a sample of right ones,
each as the query image next to the keyframe image with the score, the descriptor distance and how far
apart the two places are. Only the frames shown are read again from the bags."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tscm_ros.evaluate.loop_evaluation import MethodRun
from tscm_ros.evaluate.reporting import pyplot
from tscm_ros.io.bag import FrameSource

WORST_FALSE = 6
TRUE_SAMPLE = 3


def chosen_queries(run: MethodRun, worst_false: int = WORST_FALSE, true_sample: int = TRUE_SAMPLE
                   ) -> list[tuple[int, bool]]:
    """(query index, top-1 right) to show: the highest-scored wrong top-1 candidates, best first, then
    ``true_sample`` right ones spread over the traversal."""
    answered = [q for q, ids in enumerate(run.ranked_ids) if len(ids)]
    right = [q for q in answered if run.within[q, run.ranked_ids[q][0]]]
    wrong = sorted((q for q in answered if not run.within[q, run.ranked_ids[q][0]]),
                   key=lambda q: (-run.ranked_scores[q][0], q))
    picks = np.linspace(0, len(right) - 1, min(true_sample, len(right))).round().astype(int) if right else []
    return [(q, False) for q in wrong[:worst_false]] + [(right[i], True) for i in picks]


def write_matches_figure(run: MethodRun, queries: FrameSource, reference: FrameSource, path: Path,
                         radius_m: float) -> bool:
    """Write the figure of ``run`` (a method of ``evaluate --bag`` on these bags) to ``path``; False when no
    query had a candidate (nothing to show)."""
    shown = chosen_queries(run)
    if not shown:
        return False
    query_images = queries.open().images_at([run.query_stamps[q] for q, _ in shown])
    keyframe_images = reference.open().images_at([run.top1_stamp_ns[q] for q, _ in shown])
    plt = pyplot()
    figure, axes = plt.subplots(len(shown), 2, figsize=(8, 2.6 * len(shown)), squeeze=False)
    for row, (q, right) in enumerate(shown):
        keyframe = int(run.ranked_ids[q][0])
        apart = float(np.linalg.norm(run.query_positions[q] - run.map_positions[keyframe]))
        verdict = f"TRUE (within {radius_m:g} m)" if right else "FALSE"
        pairs = ((query_images.get(int(run.query_stamps[q])), f"query {q}"),
                 (keyframe_images.get(int(run.top1_stamp_ns[q])), f"keyframe {keyframe}"))
        for axis, (image, label) in zip(axes[row], pairs):
            if image is not None:
                axis.imshow(image)
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_xlabel(label, fontsize="small")
        distance = run.top1_distance[q]
        axes[row, 0].set_title(
            f"{verdict}: score {run.ranked_scores[q][0]:.3f}, descriptor distance "
            f"{'n/a' if math.isnan(distance) else f'{distance:.3f}'}, {apart:.1f} m apart",
            loc="left", fontsize="small", color="tab:green" if right else "tab:red")
    figure.suptitle(f"{run.name}: the highest-scored false top-1 matches, then a sample of true ones",
                    fontsize="medium")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return True
