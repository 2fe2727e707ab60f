"""How the default descriptor was chosen: VLAD variants on the tune half of each real revisit set, the chosen
one reported on the other half.

For each set under --real (folders with ref/, query/ and gt.csv; see tscm_ros/io/revisit_set.py), the first
half of its queries (file order) is the *tune* half and the second half the *report* half. Every variant
describes the set's references, fits its vocabulary on them (as build_map does on a map's keyframes) and
is scored by R@1 on the tune half. Two stages, each a full grid:

1. backbone (EfficientNet-Lite0/1/2), input size (192x256, 240x320, or both: two scales pooled into one
   VLAD), layers (stage 5, or stages 4 and 5 concatenated), clusters (16, 32, 64), assignment (hard, soft);
2. for the best backbone, size and layers of stage 1: tokens projected on their principal directions (none,
   64, 32), clusters (32, 64), assignment, power normalisation (1, 0.5).

The rule, fixed before looking at the report halves: among the variants that fit the speed budget and the
map budget, those within one point of the best mean tune R@1 over the sets (one query more or less on
these sets moves a set's R@1 by 0.2-2.3 points), and of those the smallest descriptor (then the best).
Speed: the trunk at batch 1 at most --budget times EfficientNet-Lite0's at 192x256 (1.85: about 8 ms of
trunk on an idle 2-core machine, where describe() from 640x480, adding preprocessing and the head, stays
within 10 ms); latencies are medians over interleaved rounds in the same run, so a loaded machine slows
every backbone alike. Map: at most --max-dim dimensions (8192: 32 kB per keyframe). The report half gives
the chosen variant's R@1 beside the GeM baseline's and, to show what the map's own fit is worth, beside
the same variant with a vocabulary fitted on the *other* sets' references instead.

    python -m bench.descriptor_selection --real ../shared/realdata       # about 30-40 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from tscm_ros.describe.describer import PRETRAINED, OnnxRuntimeRunner, describer_for
from tscm_ros.describe.models.backbones import EfficientNetLiteBackbone
from tscm_ros.describe.models.blocks import feature_map_to_tokens
from tscm_ros.describe.models.vlad import VLAD
from tscm_ros.describe.preprocess import PreprocessConfig, preprocess
from tscm_ros.io.revisit_set import RevisitSet, find_revisit_sets, read_rgb

REPO = Path(__file__).resolve().parent.parent

SIZES = {"192x256": [(192, 256)], "240x320": [(240, 320)], "192x256+240x320": [(192, 256), (240, 320)]}
LAYERS = {"5": (5,), "4+5": (4, 5)}
SOFTNESS = 20.0


def stage_outputs(variant: int, size: tuple[int, int], images: list[np.ndarray]) -> dict[int, np.ndarray]:
    """Stage 4 and stage 5 outputs (float16) of EfficientNet-Lite``variant`` for ``images`` at ``size``."""
    backbone = EfficientNetLiteBackbone(variant, stage=5).eval()
    blocks = list(backbone._blocks)
    stage4_end = len(EfficientNetLiteBackbone(variant, stage=4, load_pretrained=False)._blocks) - 1
    outputs: dict[int, list[np.ndarray]] = {4: [], 5: []}
    config = PreprocessConfig(height=size[0], width=size[1])
    with torch.inference_mode():
        for start in range(0, len(images), 16):
            x = preprocess(images[start:start + 16], config)
            x = backbone.activation(backbone._bn0(backbone._conv_stem(x)))
            for i, block in enumerate(blocks):
                x = block(x)
                if i == stage4_end:
                    outputs[4].append(x.half().numpy())
            outputs[5].append(x.half().numpy())
    return {stage: np.concatenate(parts) for stage, parts in outputs.items()}


def cached_outputs(cache: Path, revisit_set: RevisitSet, variant: int, size: tuple[int, int]) -> dict[str, np.ndarray]:
    path = cache / f"{revisit_set.name}_lite{variant}_{size[0]}x{size[1]}.npz"
    if not path.exists():
        images = [read_rgb(p) for p in (*revisit_set.references, *revisit_set.queries)]
        outputs = stage_outputs(variant, size, images)
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{f"stage{s}": v for s, v in outputs.items()})
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def tokens_of(outputs: list[dict[str, np.ndarray]], layers: tuple[int, ...]) -> torch.Tensor:
    """(N, T, C) tokens: per scale the layers' tokens (each unit-norm) side by side, the scales one after
    another along T."""
    per_scale = []
    for scale in outputs:
        parts = [torch.nn.functional.normalize(feature_map_to_tokens(torch.from_numpy(scale[f"stage{s}"]).float()),
                                               dim=-1) for s in layers]
        per_scale.append(torch.cat(parts, dim=-1))
    return torch.cat(per_scale, dim=1)


def recall_at_1(references: np.ndarray, queries: np.ndarray, matches, rows: np.ndarray) -> float:
    index = faiss.IndexFlatIP(references.shape[1])
    index.add(np.ascontiguousarray(references, dtype=np.float32))
    _, best = index.search(np.ascontiguousarray(queries[rows], dtype=np.float32), 1)
    return float(np.mean([best[i, 0] in matches[q] for i, q in enumerate(rows)]))


def halves(revisit_set: RevisitSet) -> tuple[np.ndarray, np.ndarray]:
    count = len(revisit_set.queries)
    return np.arange(count // 2), np.arange(count // 2, count)


def vlad_descriptors(vlad: VLAD, tokens: torch.Tensor, vocabulary) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([vlad(tokens[i:i + 64], *vocabulary.tensors()).numpy()
                               for i in range(0, len(tokens), 64)])


def evaluate(spec: dict, data: dict, sets: list[RevisitSet], foreign: bool = False) -> dict[str, dict]:
    """R@1 of one variant per set on both halves; ``foreign``: the vocabulary fitted on the other sets."""
    results = {}
    tokens = {s.name: tokens_of([data[(s.name, spec["backbone"], size)] for size in SIZES[spec["size"]]],
                                LAYERS[spec["layers"]]) for s in sets}
    for revisit_set in sets:
        all_tokens = tokens[revisit_set.name]
        references = all_tokens[:len(revisit_set.references)]
        vlad = VLAD(all_tokens.shape[-1], spec["clusters"], spec["token_dim"], spec["assignment"], SOFTNESS,
                    spec["power"])
        fit_on = (torch.cat([tokens[s.name][:len(s.references)] for s in sets if s is not revisit_set])
                  if foreign else references)
        vocabulary = vlad.fit(fit_on.reshape(-1, fit_on.shape[-1]), len(fit_on))
        descriptors = vlad_descriptors(vlad, all_tokens, vocabulary)
        tune, report = halves(revisit_set)
        ref, query = descriptors[:len(revisit_set.references)], descriptors[len(revisit_set.references):]
        results[revisit_set.name] = {"tune": recall_at_1(ref, query, revisit_set.matches, tune),
                                     "report": recall_at_1(ref, query, revisit_set.matches, report)}
    return results


def trunk_latencies_ms(backbones: list[tuple[int, tuple[int, int]]], threads: int, rounds: int = 8
                       ) -> dict[tuple[int, tuple[int, int]], float]:
    """Median ms of each backbone's trunk at batch 1 (ONNX Runtime), over rounds that take turns, so that
    other load on the machine slows every backbone alike."""
    from tscm_ros.describe.models.backbones import build_backbone

    class Trunk(torch.nn.Module):
        def __init__(self, variant: int) -> None:
            super().__init__()
            self.backbone = build_backbone({"name": f"efficientnet_lite{variant}", "stage": 5})

        def trunk(self, images):
            return (self.backbone(images),)

        def head(self, feature_map):
            return feature_map.mean(dim=(2, 3))

    runners = {(v, size): (OnnxRuntimeRunner(Trunk(v).eval(), PreprocessConfig(height=size[0], width=size[1]),
                                             threads), torch.zeros(1, 3, *size)) for v, size in backbones}
    samples: dict = {key: [] for key in runners}
    for _ in range(rounds):
        for key, (runner, images) in runners.items():
            runner(images)
            for _ in range(10):
                started = time.perf_counter()
                runner(images)
                samples[key].append(1000 * (time.perf_counter() - started))
    return {key: statistics.median(values) for key, values in samples.items()}


def table(rows: list[tuple[dict, dict]], sets: list[RevisitSet], title: str, limit: int) -> list[str]:
    lines = [f"### {title}", "", "| variant | dim | " + " | ".join(s.name for s in sets) + " | mean tune R@1 |",
             "|---|---:|" + "---:|" * (len(sets) + 1)]
    for spec, result in rows[:limit]:
        mean = np.mean([result[s.name]["tune"] for s in sets])
        lines.append(f"| {label(spec)} | {dimension(spec)} | "
                     + " | ".join(f"{result[s.name]['tune']:.3f}" for s in sets) + f" | {mean:.3f} |")
    return lines + [""]


def label(spec: dict) -> str:
    return (f"Lite{spec['backbone']} {spec['size']} stage {spec['layers']}, {spec['clusters']} clusters, "
            f"{spec['assignment']}, tokens {spec['token_dim'] or 'unprojected'}, power {spec['power']:g}")


def dimension(spec: dict) -> int:
    channels = {0: 112, 1: 112, 2: 120}[spec["backbone"]] + ({0: 80, 1: 80, 2: 88}[spec["backbone"]]
                                                            if spec["layers"] == "4+5" else 0)
    return spec["clusters"] * (spec["token_dim"] or channels)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", required=True, help="folder of revisit sets (e.g. ../shared/realdata)")
    parser.add_argument("--budget", type=float, default=1.85,
                        help="trunk latency budget, in multiples of Lite0 at 192x256 (default 1.85)")
    parser.add_argument("--max-dim", type=int, default=8192, help="largest descriptor (default 8192)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench_output" / "descriptor_selection"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sets = find_revisit_sets(args.real)
    cache = REPO / ".cache" / "bench" / "selection"
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    latency = trunk_latencies_ms([(v, size) for v in (0, 1, 2) for size in [(192, 256), (240, 320)]], args.threads)
    budget_ms = args.budget * latency[(0, (192, 256))]

    def cost(spec: dict) -> float:
        return sum(latency[(spec["backbone"], size)] for size in SIZES[spec["size"]])

    data = {(s.name, v, size): cached_outputs(cache, s, v, size) for s in sets for v in (0, 1, 2)
            for size in [(192, 256), (240, 320)]}
    first = [dict(backbone=v, size=size, layers=layers, clusters=k, assignment=a, token_dim=None, power=1.0)
             for v, size, layers, k, a in itertools.product((0, 1, 2), SIZES, LAYERS, (16, 32, 64), ("hard", "soft"))]
    scored = [(spec, evaluate(spec, data, sets)) for spec in first]

    def mean_tune(item) -> float:
        return float(np.mean([item[1][s.name]["tune"] for s in sets]))

    def best(items):
        within = [item for item in items if cost(item[0]) <= budget_ms and dimension(item[0]) <= args.max_dim]
        top = max(mean_tune(item) for item in within)
        close = [item for item in within if mean_tune(item) >= top - 0.01]
        return min(close, key=lambda item: (dimension(item[0]), -mean_tune(item)))

    base = best(scored)[0]
    second = [dict(base, clusters=k, assignment=a, token_dim=d, power=p)
              for d, k, a, p in itertools.product((None, 64, 32), (32, 64), ("hard", "soft"), (1.0, 0.5))]
    scored_second = [(spec, evaluate(spec, data, sets)) for spec in second]
    chosen, chosen_result = best(scored + scored_second)
    foreign = evaluate(chosen, data, sets, foreign=True)
    gem = describer_for(PRETRAINED, device="cpu")
    gem_result = {}
    for s in sets:
        descriptors = gem.describe([read_rgb(p) for p in (*s.references, *s.queries)])
        ref, query = descriptors[:len(s.references)], descriptors[len(s.references):]
        tune, report = halves(s)
        gem_result[s.name] = {"tune": recall_at_1(ref, query, s.matches, tune),
                              "report": recall_at_1(ref, query, s.matches, report)}

    lines = [f"## Descriptor selection on {', '.join(s.name for s in sets)} (tune: first half of each set's "
             "queries; report: second half)", "",
             f"Trunk latency at batch 1, ONNX Runtime, {args.threads} threads, this machine (load {load_before:.2f} "
             "before): " + ", ".join(f"Lite{v} {h}x{w} {ms:.1f} ms" for (v, (h, w)), ms in latency.items())
             + f"; budget {budget_ms:.1f} ms ({args.budget:g} x Lite0 192x256), at most {args.max_dim} dimensions.",
             ""]
    lines += table(sorted(scored, key=mean_tune, reverse=True), sets, "Stage 1, best 15 of "
                   f"{len(scored)} (tune-half R@1)", 15)
    lines += table(sorted(scored_second, key=mean_tune, reverse=True), sets,
                   f"Stage 2 on Lite{base['backbone']} {base['size']} stage {base['layers']} (tune-half R@1)", 24)
    lines += [f"Chosen: **{label(chosen)}** ({dimension(chosen)}-d, trunk {cost(chosen):.1f} ms).", "",
              "| report half R@1 | " + " | ".join(s.name for s in sets) + " |", "|---|" + "---:|" * len(sets),
              "| chosen, the set's own vocabulary | " + " | ".join(f"{chosen_result[s.name]['report']:.3f}"
                                                                  for s in sets) + " |",
              "| chosen, vocabulary of the other sets | " + " | ".join(f"{foreign[s.name]['report']:.3f}"
                                                                      for s in sets) + " |",
              "| GeM baseline (pretrained) | " + " | ".join(f"{gem_result[s.name]['report']:.3f}" for s in sets) + " |",
              "", f"{len(scored) + len(scored_second)} variants in {(time.monotonic() - started) / 60:.0f} min."]
    report = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "selection.md").write_text(report, encoding="utf-8")
    (out / "selection.json").write_text(json.dumps({
        "latency_ms": {f"lite{v}_{h}x{w}": ms for (v, (h, w)), ms in latency.items()},
        "stage1": [[spec, result] for spec, result in scored],
        "stage2": [[spec, result] for spec, result in scored_second],
        "chosen": chosen, "chosen_result": chosen_result, "foreign_vocabulary": foreign, "gem": gem_result},
        indent=1) + "\n", encoding="utf-8")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
