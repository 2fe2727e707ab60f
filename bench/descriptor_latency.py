"""Descriptor latency benchmark: the default (VLAD), the TSCM student and teacher, and a pretrained-backbone +
GeM baseline, same run, same input.

Reports median and p90 latency per image at batch 1 and batch 16, and parameter counts, on the CPU (and
the GPU when one is usable), for each execution path: the plain eager network, the Describer's torch path
(batch norms folded into convolutions, channels-last), ONNX Runtime (the Describer's CPU default when
installed), a frozen TorchScript trace (the default), and describe() end to end from a 640x480 RGB image
(preprocessing included, the Describer's default backend) for the default and the student.

    python -m bench.descriptor_latency                 # 2 threads, CPU (+ GPU if present)
    python -m bench.descriptor_latency --threads 1 --repeats 50 --json out.json

Latency on a shared machine is noisy: the load average before and after is printed with the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

from tscm_ros.describe.checkpoint import load_model_config
from tscm_ros.describe.describer import (
    DEFAULT_MODEL,
    Describer,
    OnnxRuntimeRunner,
    load_named_model,
    onnxruntime_available,
)
from tscm_ros.describe.models import build_model, prepare_for_inference

MODELS = {"default (VLAD)": DEFAULT_MODEL, "student": "student_offline", "teacher": "teacher_offline",
          "baseline (GeM)": "baseline_offline"}
END_TO_END = ("default (VLAD)", "student")


def time_per_image(
    run: Callable[[], object], batch: int, repeats: int, warmup: int, sync: Callable[[], None], max_seconds: float
) -> tuple[float, float]:
    """Median and p90 milliseconds per image over up to ``repeats`` timed calls of ``run`` on a batch
    (fewer, but at least 5, when the calls would take more than ``max_seconds``)."""
    for _ in range(warmup):
        run()
    sync()
    start = time.perf_counter()
    run()
    sync()
    repeats = max(5, min(repeats, int(max_seconds / max(time.perf_counter() - start, 1e-6))))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        samples.append((time.perf_counter() - start) * 1000.0 / batch)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(round(0.9 * (len(samples) - 1))))]


def torchscript_frozen(model: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.freeze(torch.jit.trace(copy.deepcopy(model).eval(), example))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per measurement (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    parser.add_argument("--max-seconds", type=float, default=8.0,
                        help="time budget per measurement; fewer repeats (at least 5) beyond it (default 8)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes (default 1 16)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS),
                        help="which models to measure (default all)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    load_before = os.getloadavg()
    rows = []
    for device in devices:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for label, preset in MODELS.items():
            if label not in args.models:
                continue
            if preset == DEFAULT_MODEL:
                named = load_named_model(DEFAULT_MODEL)
                model, preprocess = named.network.to(device), named.preprocess
                name, vocabulary = named.name, named.vocabulary
            else:
                config, preprocess = load_model_config(preset)
                model, name, vocabulary = build_model(config).to(device), config["name"], None
            parameters = sum(p.numel() for p in model.parameters())
            paths = {"eager": (model, torch.contiguous_format),
                     "fused channels-last": (prepare_for_inference(model), torch.channels_last)}
            if device.type == "cpu" and onnxruntime_available():
                runner = OnnxRuntimeRunner(model, preprocess, args.threads)
                tensors = vocabulary.tensors() if vocabulary is not None else ()
                paths["onnxruntime"] = (lambda x, runner=runner, tensors=tensors: runner(x, *tensors, maps=False),
                                        torch.contiguous_format)
            if label == "default (VLAD)" and device.type == "cpu":
                example = torch.zeros(1, 3, preprocess.height, preprocess.width)
                paths["TorchScript frozen"] = (torchscript_frozen(model, example), torch.contiguous_format)
            for path_name, (network, layout) in paths.items():
                for batch in args.batches:
                    images = torch.randn(batch, 3, preprocess.height, preprocess.width, device=device)
                    images = images.contiguous(memory_format=layout)
                    with torch.inference_mode():
                        median, p90 = time_per_image(lambda: network(images), batch, args.repeats, args.warmup, sync,
                                                     args.max_seconds)
                    rows.append(dict(device=device.type, model=label, path=path_name, batch=batch, dim=model.dim,
                                     params=parameters, input=f"{preprocess.height}x{preprocess.width}",
                                     median_ms=median, p90_ms=p90))
            if label in END_TO_END:
                describer = Describer(model, preprocess, "bench", name, device=device, batch_size=16,
                                      vocabulary=vocabulary)
                frame = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
                for batch in args.batches:
                    frames = [frame] * batch
                    median, p90 = time_per_image(lambda: describer.describe(frames), batch, args.repeats, args.warmup,
                                                 sync, args.max_seconds)
                    describe_path = f"describe() from 640x480 ({describer.backend})"
                    rows.append(dict(device=device.type, model=label, path=describe_path, batch=batch, dim=model.dim,
                                     params=parameters, input=f"{preprocess.height}x{preprocess.width}",
                                     median_ms=median, p90_ms=p90))
    load_after = os.getloadavg()
    print(f"torch {torch.__version__}, {args.threads} CPU threads, {os.cpu_count()} cores, "
          f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print("| device | model | path | batch | input | dim | params (M) | median ms/img | p90 ms/img |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['device']} | {r['model']} | {r['path']} | {r['batch']} | {r['input']} | {r['dim']} | "
              f"{r['params'] / 1e6:.2f} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"threads": args.threads, "load_before": load_before, "load_after": load_after, "rows": rows},
                      handle, indent=1)


if __name__ == "__main__":
    main()
