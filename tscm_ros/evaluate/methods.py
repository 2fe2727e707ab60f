"""The methods an evaluation compares, side by side: built-in baselines and given models, each with the
node's stages, run over the same map and queries (``evaluate --bag`` and ``--revisit-set``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tscm_ros.describe.describer import DEFAULT_MODEL, PRETRAINED, describer_for
from tscm_ros.detect.detection import Detector, MatchingConfig
from tscm_ros.detect.loop_detector import LoopDetector
from tscm_ros.detect.temporal import TemporalConfig
from tscm_ros.detect.verification import CameraIntrinsics, VerificationConfig
from tscm_ros.errors import ConfigError
from tscm_ros.evaluate.loop_evaluation import MethodRun, build_bow_detector, build_descriptor_map
from tscm_ros.evaluate.reporting import format_percent
from tscm_ros.io.bag import Frame

BASELINES = ("gem", "default", "bow")
BASELINE_NAMES = {"gem": "GeM baseline (pretrained, no training)", "default": "default model (training-free VLAD)",
                  "bow": "ORB bag of words"}
BASELINE_MODELS = {"gem": PRETRAINED, "default": DEFAULT_MODEL}
STAGES = [  # row suffix, verification, temporal consistency
    ("", None, None),
    (" + temporal", None, TemporalConfig()),
    (" + verification", VerificationConfig(), None),
    (" + verification + temporal", VerificationConfig(), TemporalConfig()),
]


@dataclass(frozen=True)
class MethodSpec:
    """A method to evaluate: its row name and model (a checkpoint, 'pretrained' or 'default'; None: ORB bag
    of words)."""

    name: str
    model: str | None = None


def method_specs(baselines: str, models: Sequence[str]) -> list[MethodSpec]:
    """The methods of a run: the built-in ``baselines`` (comma-separated names, or 'none'), then each of
    ``models`` (NAME=CKPT or CKPT), the bag of words last."""
    chosen = [] if baselines.strip() == "none" else [b.strip() for b in baselines.split(",") if b.strip()]
    unknown = sorted(set(chosen) - set(BASELINES))
    if unknown:
        raise ConfigError(f"--baselines: unknown {', '.join(unknown)} (choose from {', '.join(BASELINES)} or none)")
    specs = [MethodSpec(BASELINE_NAMES[b], BASELINE_MODELS[b]) for b in ("gem", "default") if b in chosen]
    baseline_names = {model: BASELINE_NAMES[b] for b, model in BASELINE_MODELS.items()}
    for entry in models:
        name, _, model = entry.rpartition("=")
        if not model:
            raise ConfigError(f"--model {entry!r}: expected NAME=CKPT or CKPT")
        specs.append(MethodSpec(name or baseline_names.get(model) or Path(model).parent.name or Path(model).stem,
                                model))
    if "bow" in chosen:
        specs.append(MethodSpec(BASELINE_NAMES["bow"]))
    if not specs:
        raise ConfigError("nothing to evaluate: give --model NAME=CKPT or keep some --baselines")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"method names must be unique, got {names}")
    return specs


def run_methods(specs: Sequence[MethodSpec], keyframes: Callable[[], Iterable[Frame]], stages: Sequence,
                run: Callable[[str, Detector], MethodRun], ns: Sequence[int], source: str,
                intrinsics: CameraIntrinsics | None, device: str, batch_size: int, bow_words: int,
                progress: Callable[[str], None] | None = None) -> list[MethodRun]:
    """Every method of ``specs``: a map of ``keyframes()``, a detector per stage (rows of ``STAGES``), each
    through ``run``; ``progress`` gets a line per row (default: printed, flushed)."""
    progress = progress or _print
    # Offline evaluation of two traversals: every keyframe is a valid answer, nothing is excluded.
    matching = MatchingConfig(k=max(ns), min_score=0.0, exclude_recent_s=0.0, exclude_within_m=0.0)
    runs = []
    for spec in specs:
        started = time.perf_counter()
        if spec.model is None:
            detectors = [(spec.name, build_bow_detector(keyframes(), matching, bow_words))]
        else:
            describer = describer_for(spec.model, device=device, batch_size=batch_size)
            keyframe_map, describer = build_descriptor_map(describer, keyframes())
            # The stage rows keep the node's k (5): its latency and what it publishes.
            staged = replace(matching, k=min(matching.k, MatchingConfig().k))
            detectors = [(spec.name + suffix, LoopDetector(describer, keyframe_map, staged if suffix else matching,
                                                           source=source, verification=verification,
                                                           temporal=temporal, intrinsics=intrinsics))
                         for suffix, verification, temporal in stages]
        mapped = time.perf_counter()
        for name, detector in detectors:
            result = run(name, detector)
            runs.append(result)
            progress(f"evaluate: {name}: map of {len(result.map_positions)} keyframes in {mapped - started:.1f} s, "
                     f"{result.metrics.num_queries} queries in {time.perf_counter() - mapped:.1f} s, "
                     f"R@{ns[0]} {format_percent(result.metrics.recall_at[ns[0]])} %, "
                     f"max R @ P=100 % {format_percent(result.metrics.max_recall_at_full_precision)} %, "
                     f"median {result.median_latency_ms:.1f} ms/query")
            mapped = time.perf_counter()
    return runs


def matches_run(runs: list[MethodRun], specs: list[MethodSpec]) -> MethodRun:
    """The method matches.png shows: the first --model, else the default model, else the first method (its
    global retrieval row)."""
    by_name = {run.name: run for run in runs}
    given = [spec for spec in specs if spec.model is not None and spec.name not in BASELINE_NAMES.values()]
    for spec in given[:1] + [MethodSpec(BASELINE_NAMES["default"])]:
        if spec.name in by_name:
            return by_name[spec.name]
    return runs[0]


def _print(line: str) -> None:
    print(line, flush=True)
