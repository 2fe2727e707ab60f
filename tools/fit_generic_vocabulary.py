"""Fit the generic VLAD vocabulary shipped in tscm_ros/weights/generic_vocabulary.npz.

A map describes with a vocabulary fitted on its own keyframes; the generic one serves maps too small to fit
their own (fewer than tscm_ros.map.building.MIN_FIT_KEYFRAMES keyframes) and mapping mode until its map has
enough keyframes. It is fitted on rendered images only, from worlds of their own seeds (no benchmark site,
test route or demo world uses them): box towns and gardens under several conditions, so that no real or
benchmark image decides it. Rerun it after changing config/model_vlad_default.yaml.

    python tools/fit_generic_vocabulary.py [--work DIR]     # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from tscm_ros.describe.checkpoint import load_model_config
from tscm_ros.describe.describer import DEFAULT_CONFIG, GENERIC_VOCABULARY
from tscm_ros.describe.models.nets import build_model
from tscm_ros.describe.preprocess import preprocess
from tscm_ros.io.bag import FrameSource
from tscm_ros.sim.simulate import simulate_route

ROUTES = [  # world, seed, traversal, condition
    ("town", 201, 0, "day"), ("town", 201, 1, "night"), ("town", 202, 0, "season"), ("town", 202, 1, "haze"),
    ("garden", 201, 0, "day"), ("garden", 201, 1, "clutter"), ("garden", 202, 0, "season"), ("garden", 202, 1, "auto"),
]
FRAMES = 60


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="directory for the rendered routes (default: a temporary one)")
    parser.add_argument("--out", default=str(GENERIC_VOCABULARY), help="where to write the vocabulary")
    args = parser.parse_args()
    config, preprocess_config = load_model_config(DEFAULT_CONFIG)
    model = build_model(config)
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.work or temporary)
        maps = []
        for world, seed, traversal, condition in ROUTES:
            bag = work / f"{world}{seed}_t{traversal}_{condition}"
            if not bag.exists():
                simulate_route(bag, seed=seed, traversal=traversal, condition=condition, frames=FRAMES,
                               route_length_m=2.0 * FRAMES, world=world, progress=False)
            images = [frame.image for frame in FrameSource(bag).open()]
            with torch.inference_mode():
                for start in range(0, len(images), 16):
                    maps.append(model.trunk(preprocess(images[start:start + 16], preprocess_config))[0])
            print(f"{bag.name}: {len(images)} images")
    vocabulary = model.fit_vocabulary(torch.cat(maps), source="generic")
    np.savez(args.out, **vocabulary.arrays(), images=vocabulary.images)
    print(f"wrote {args.out}: a vocabulary of shapes {vocabulary.shapes} fitted on {vocabulary.images} rendered "
          f"images (fingerprint {vocabulary.fingerprint()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
