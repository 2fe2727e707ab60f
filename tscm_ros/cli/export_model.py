"""export_model: a model as ONNX or TorchScript, for loop-closure front ends outside Python (C++)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from tscm_ros.cli.common import run_main
from tscm_ros.describe.describer import DEFAULT_MODEL, PRETRAINED, adapted_fingerprint, load_named_model
from tscm_ros.errors import ConfigError
from tscm_ros.map.keyframe_map import KeyframeMap

DESCRIPTION = f"""\
Export a place-recognition network for use outside Python, e.g. in the loop-closure front end of an
RTAB-Map or ORB-SLAM integration written in C++:

  --onnx         an ONNX model, for ONNX Runtime (C++, C, C#, Java; CPU or GPU execution providers)
  --torchscript  a TorchScript archive, for libtorch (C++: torch::jit::load)

Input: images as float32 (N, 3, H, W), RGB scaled to [0, 1], resized to the model's H x W ('stretch',
or 'short_side_center_crop': the short side scaled, the centre cropped) and normalised per channel as
(x - mean) / std; the batch size N is free. ONNX names the input 'images'; TorchScript takes it as the
one argument of forward().
Output: descriptors as float32 (N, dim), each row of unit length, so the similarity of two images is
the dot product of their descriptors. ONNX names the output 'descriptors'. They are the descriptors
that build_map and place_recognition_node compute with the same model (up to float rounding).

Metadata embedded, as JSON values: fingerprint (the model's hash, which maps built with it record),
preprocess (height, width, mean, std, resize), dim, kind and name. ONNX: one metadata_props entry
per key; TorchScript: the extra file 'tscm_ros.json' in the archive (read it with the extra_files
argument of torch::jit::load).

--model takes a checkpoint (.pt from train), '{DEFAULT_MODEL}' (the training-free VLAD that the node uses
without model_path; the default) or '{PRETRAINED}' (the ImageNet-pretrained CNN + GeM baseline).
The default model describes with the vocabulary of the map it queries: give that map with --map, and the
exported network carries the map's vocabulary and fingerprint (without --map: the generic vocabulary,
which matches only maps too small to fit their own).
The file is written atomically: it appears complete or not at all.
"""

EXAMPLE = """\
examples:
  export_model --onnx --map maps/site --out site.onnx
  export_model --torchscript --model runs/student/best.pt --out student.ts
"""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of export_model."""
    parser = argparse.ArgumentParser(
        prog="export_model", description=DESCRIPTION, epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kind = parser.add_mutually_exclusive_group(required=True)
    kind.add_argument("--onnx", action="store_true", help="write an ONNX model (needs the onnx package)")
    kind.add_argument("--torchscript", action="store_true", help="write a TorchScript archive")
    parser.add_argument("--model", default=DEFAULT_MODEL, metavar="CKPT",
                        help=f"checkpoint, '{DEFAULT_MODEL}' or '{PRETRAINED}' "
                        f"(default: '{DEFAULT_MODEL}', the training-free VLAD)")
    parser.add_argument("--map", metavar="MAP", help="the keyframe map the front end will query: the network then "
                        "describes with the map's own vocabulary (the map's fingerprint)")
    parser.add_argument("--out", required=True, metavar="FILE", help="file to write")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name such as {out / 'student.onnx'}")
    if out.exists() and not args.force:
        raise ConfigError(f"{out} already exists (use --force to replace it)")
    if args.onnx:
        try:
            import onnx  # noqa: F401  (torch's ONNX exporter needs it)
        except ImportError:
            raise ConfigError("--onnx needs the Python package onnx (pip install onnx); "
                              "--torchscript needs nothing more") from None
    from tscm_ros.describe.checkpoint import export_onnx, export_torchscript

    named = load_named_model(args.model)
    model, preprocess, fingerprint = named.network.eval(), named.preprocess, named.fingerprint
    if args.map:
        keyframe_map = KeyframeMap.load(args.map, expected_fingerprint=fingerprint, expected_model_name=named.name)
        if keyframe_map.vocabulary is not None and named.vocabulary is not None:
            model.set_vocabulary(keyframe_map.vocabulary)
            fingerprint = adapted_fingerprint(fingerprint, named.vocabulary, keyframe_map.vocabulary)
        if fingerprint != keyframe_map.model_fingerprint:
            raise ConfigError(f"{args.model} with the vocabulary of {args.map} gives fingerprint {fingerprint}, "
                              f"but the map records {keyframe_map.model_fingerprint}: rebuild the map with build_map")
    export = export_onnx if args.onnx else export_torchscript
    try:
        export(model, preprocess, out, fingerprint)
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc}") from exc
    print(f"export_model: wrote {out} ({'ONNX' if args.onnx else 'TorchScript'}): {args.model}, "
          f"{getattr(model, 'name', '') or 'model'}, input (N, 3, {preprocess.height}, {preprocess.width}), "
          f"output (N, {model.dim}), fingerprint {fingerprint}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: export a model; exit code 2 with ``error: ...`` on bad input."""
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
