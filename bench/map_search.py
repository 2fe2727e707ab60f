"""Benchmark: keyframe-map search latency and recall@1 against exact search, per index type and map size.

Usage: python -m bench.map_search [--sizes 1000,10000,100000] [--dim D] [--pca-dim 256]
       [--ef-search 128,256,512] [--configs NAME,...]

Synthetic descriptors (deterministic, seeded): real VPR descriptors are unit-norm, have a fast-decaying
PCA spectrum and come in runs of similar frames seen around the same place. So each keyframe is
``normalize(z @ (S B) + e)``: ``B`` is a fixed random (rank x dim) basis with rows of unit norm, ``S`` a
power-law spectrum ``s_j = (1 + j) ** -0.5``, ``z = c_place + 0.5 n`` with one standard-normal centre
``c_place`` per run of ``PLACE_SIZE`` consecutive keyframes and ``n`` standard normal, and ``e`` isotropic
noise carrying about a tenth of the energy. A query is a random database keyframe perturbed the same way
(new latent noise and new isotropic noise, ``QUERY_NOISE`` times the in-place spread), renormalised, so its
exact nearest neighbour is usually, not always, the keyframe it came from; the fraction is printed.
Recall@1 is the fraction of queries whose top-1 equals the exact full-dimension search's top-1 (ids).
The dimension is the shipped default model's (3840 for its 32 x 120 VLAD), read from its config, unless
``--dim`` says otherwise.

Exclusion, as the node queries: keyframes are 0.1 s and 1 m apart along a path, and every query also runs
with ``exclude_recent_s`` 30 and ``exclude_within_m`` 20 as if the robot, back at the query's source place,
were 2 minutes further along its trajectory (query stamp and position those of the keyframe 1200 after the
source): about 600 keyframes around that point are excluded (not the source's place, so a real revisit stays
findable). "excl." columns are latency and recall@1 with exclusion on, against exact search over the keyframes
the exclusion allows.

Latency is the median (and 90th percentile) of single ``KeyframeMap.query(descriptor, k)`` calls, the way
the node queries, Python overhead included; "batched" is one ``query_batch`` over all queries divided by
their number. The database is generated and added in chunks of 100k, so the 1M case (``--sizes 1000000``,
``make bench LONG=1``) never holds the full float32 database (4 bytes x dim per keyframe: 15 GB at 3840-d):
there the exact baseline's latency is the sum, per query, of exact searches over each 100k chunk as it is
generated, and its top-1 is merged across chunks. Configurations keeping a float32 copy of the descriptors
(exact, plain HNSW, float32 re-ranking) are skipped above 200k keyframes; re-ranking from a float16 copy
(half that size) runs. The peak RAM is printed after each size. "index MiB" is the size of the FAISS index
file, roughly its memory.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import faiss
import numpy as np

from tscm_ros.io.geometry import Pose
from tscm_ros.map.exclusion import Exclusion
from tscm_ros.map.index import IndexConfig
from tscm_ros.map.keyframe_map import KeyframeMap, KeyframeMeta

RANK = 256
PLACE_SIZE = 10
IN_PLACE_SPREAD = 0.5
QUERY_NOISE = 2.0  # default of --query-noise
ISOTROPIC_ENERGY = 0.1
CHUNK = 100_000  # keyframes generated and added at a time
FULL_DESCRIPTOR_LIMIT = 200_000  # above this, configurations storing full float32 vectors are skipped


class Descriptors:
    """Deterministic synthetic descriptors; item i depends only on (seed, chunk of i)."""

    def __init__(self, dim: int, seed: int, query_noise: float = QUERY_NOISE) -> None:
        rng = np.random.default_rng([seed, 1])
        basis = rng.standard_normal((RANK, dim)).astype(np.float32)
        basis /= np.linalg.norm(basis, axis=1, keepdims=True)
        spectrum = (1.0 + np.arange(RANK, dtype=np.float32)) ** -0.5
        self.basis = spectrum[:, None] * basis
        self.dim, self.seed, self.query_noise = dim, seed, query_noise
        latent_energy = float((spectrum**2).sum()) * (1 + IN_PLACE_SPREAD**2)
        self.isotropic_sigma = float(np.sqrt(ISOTROPIC_ENERGY / (1 - ISOTROPIC_ENERGY) * latent_energy / dim))
        self.raw_norm = float(np.sqrt(latent_energy + self.isotropic_sigma**2 * dim))

    def _embed(self, latent: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = latent @ self.basis
        x += rng.standard_normal(x.shape, dtype=np.float32) * self.isotropic_sigma
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def chunk(self, start: int, count: int) -> np.ndarray:
        """Rows [start, start + count) of the database; start must be a multiple of CHUNK (or 0)."""
        rng = np.random.default_rng([self.seed, 2, start])
        places = -(-count // PLACE_SIZE)
        centres = rng.standard_normal((places, RANK), dtype=np.float32)
        latent = np.repeat(centres, PLACE_SIZE, axis=0)[:count]
        latent += IN_PLACE_SPREAD * rng.standard_normal((count, RANK), dtype=np.float32)
        return self._embed(latent, rng)

    def queries(self, database_rows: np.ndarray, seed_offset: int) -> np.ndarray:
        """Perturbed, renormalised copies of (unit-norm) database rows."""
        rng = np.random.default_rng([self.seed, 3, seed_offset])
        count = len(database_rows)
        latent_noise = (self.query_noise * IN_PLACE_SPREAD) * rng.standard_normal((count, RANK), dtype=np.float32)
        perturbation = latent_noise @ self.basis
        perturbation += (rng.standard_normal(perturbation.shape, dtype=np.float32)
                         * (self.isotropic_sigma * self.query_noise))
        x = database_rows * self.raw_norm + perturbation  # back on the scale the rows had before normalising
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


@dataclass
class Config:
    name: str
    index: IndexConfig
    sweep: list[dict] = field(default_factory=lambda: [{}])  # search settings measured on the built map


def configurations(pca_dim: int, n: int, ef_search: Sequence[int] = (128, 256, 512)) -> list[Config]:
    """What is compared; HNSW and re-ranking use the KeyframeMap defaults (M 32, efConstruction 200,
    efSearch 128, k_factor 4). Plain full-dimension HNSW and PCA without re-ranking only run up to 10k keyframes
    (they show what PCA alone loses; their builds dominate the run time). Above FULL_DESCRIPTOR_LIMIT only
    configurations without a float32 copy of the full descriptors run."""
    hnsw = IndexConfig(type="hnsw", pca_dim=pca_dim)
    ivf = IndexConfig(type="ivfpq", pca_dim=pca_dim, nprobe=32)
    ef = [{"ef_search": value} for value in ef_search]
    probes = [{"nprobe": 32}, {"nprobe": 64}, {"nprobe": 128}]
    return [config for config, largest in (
        (Config("exact", IndexConfig()), FULL_DESCRIPTOR_LIMIT),
        (Config("hnsw", IndexConfig(type="hnsw")), 10_000),
        (Config(f"pca{pca_dim}+hnsw+rerank", hnsw, ef), FULL_DESCRIPTOR_LIMIT),
        (Config(f"pca{pca_dim}+hnsw+rerank16", replace(hnsw, rerank_dtype="float16"), ef), None),
        (Config(f"pca{pca_dim}+ivfpq+rerank16", replace(ivf, rerank_dtype="float16"), probes), None),
        (Config(f"pca{pca_dim}+hnsw", replace(hnsw, rerank=False)), 10_000),
        (Config(f"pca{pca_dim}+ivfpq", replace(ivf, rerank=False)), None),
    ) if largest is None or n <= largest]


def index_bytes(keyframe_map: KeyframeMap) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "index.faiss")
        faiss.write_index(keyframe_map.contents().index.faiss_index, path)
        return os.path.getsize(path)


STEP_NS, STEP_M = 100_000_000, 1.0  # keyframes every 0.1 s and 1 m along a straight path
EXCLUDE_RECENT_S, EXCLUDE_WITHIN_M, QUERY_LATER = 30.0, 20.0, 1200  # see the module doc


def metas(start: int, count: int) -> list[KeyframeMeta]:
    identity = np.array([0.0, 0.0, 0.0, 1.0])
    return [KeyframeMeta(stamp_ns=(start + i) * STEP_NS,
                         pose=Pose(np.array([(start + i) * STEP_M, 0.0, 0.0]), identity), bag="synthetic")
            for i in range(count)]


def exclusions(sources: np.ndarray, n: int) -> tuple[list[Exclusion], np.ndarray]:
    """Each query's exclusion, and the [start, stop) keyframe ids it removes (computed from the layout)."""
    at = np.minimum(sources + QUERY_LATER, n - 1)
    out = [Exclusion(min_time_gap_s=EXCLUDE_RECENT_S, min_distance_m=EXCLUDE_WITHIN_M, query_stamp_ns=int(i) * STEP_NS,
                     query_position=np.array([i * STEP_M + 0.5, 0.0, 0.0])) for i in at]
    half = int(round(EXCLUDE_RECENT_S * 1e9 / STEP_NS))  # |i - at| < half (time); the 20 m of path lie inside
    ranges = np.stack([np.maximum(at - half + 1, 0), np.minimum(at + half, n)], axis=1)
    return out, ranges


def make_queries(data: Descriptors, sources: np.ndarray, n: int) -> np.ndarray:
    queries = np.empty((len(sources), data.dim), np.float32)
    for start in range(0, n, CHUNK):
        inside = (sources >= start) & (sources < start + CHUNK)
        if inside.any():
            chunk = data.chunk(start, min(CHUNK, n - start))
            queries[inside] = data.queries(chunk[sources[inside] - start], start)
    return queries


def time_queries(keyframe_map: KeyframeMap, queries: np.ndarray, k: int, excluded: list | None = None) -> np.ndarray:
    seconds = np.empty(len(queries))
    for i, query in enumerate(queries):
        exclusion = excluded[i] if excluded is not None else None
        began = time.perf_counter()
        keyframe_map.query(query, k, exclusion)
        seconds[i] = time.perf_counter() - began
    return seconds


def run_size(n: int, args: argparse.Namespace) -> str:
    """Build every configuration for an n-keyframe map, measure it, return a Markdown section."""
    data = Descriptors(args.dim, args.seed, args.query_noise)
    sources = np.sort(np.random.default_rng([args.seed, 4, n]).choice(n, args.queries, replace=False))
    queries = make_queries(data, sources, n)
    timed_rows = np.random.default_rng([args.seed, 5, n]).permutation(args.queries)[: args.latency_queries]
    timed = queries[timed_rows]
    query_exclusions, excluded_ranges = exclusions(sources, n)
    timed_exclusions = [query_exclusions[i] for i in timed_rows]
    most_excluded = int((excluded_ranges[:, 1] - excluded_ranges[:, 0]).max())
    best_allowed_distance = np.full(len(queries), np.inf, np.float32)
    best_allowed_id = np.full(len(queries), -1, np.int64)
    chunked_exact = n > FULL_DESCRIPTOR_LIMIT
    configs = [c for c in configurations(args.pca_dim, n, args.ef_search)
               if not args.configs or c.name in args.configs]
    maps = {c.name: KeyframeMap(args.dim, "synthetic", {}, c.index, model_name="synthetic") for c in configs}
    build_seconds = dict.fromkeys(maps, 0.0)
    best_distance = np.full(len(queries), np.inf, np.float32)
    best_id = np.full(len(queries), -1, np.int64)
    exact_seconds = np.zeros(len(timed))
    for start in range(0, n, CHUNK):
        count = min(CHUNK, n - start)
        chunk = data.chunk(start, count)
        chunk_metas = metas(start, count)
        for name, keyframe_map in maps.items():
            began = time.perf_counter()
            keyframe_map.add(chunk, chunk_metas)
            build_seconds[name] += time.perf_counter() - began
        exact = faiss.IndexFlatL2(args.dim)
        exact.add(chunk)
        distances, ids = exact.search(queries, 1)
        better = distances[:, 0] < best_distance
        best_distance[better], best_id[better] = distances[better, 0], ids[better, 0] + start
        # exact search with each query's exclusion: the best of the k nearest that the exclusion allows
        distances, ids = exact.search(queries, min(count, most_excluded + 1))
        ids += start
        allowed = ~((ids >= excluded_ranges[:, :1]) & (ids < excluded_ranges[:, 1:]))
        first = np.argmax(allowed, axis=1)
        rows = np.flatnonzero(allowed.any(axis=1))
        candidate = distances[rows, first[rows]]
        better = candidate < best_allowed_distance[rows]
        best_allowed_distance[rows[better]] = candidate[better]
        best_allowed_id[rows[better]] = ids[rows[better], first[rows[better]]]
        if chunked_exact:  # timed like KeyframeMap.query searches single queries: on one thread
            threads = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
            for i, query in enumerate(timed):
                began = time.perf_counter()
                exact.search(query[None, :], args.k)
                exact_seconds[i] += time.perf_counter() - began
            faiss.omp_set_num_threads(threads)
        del exact, chunk, chunk_metas
        gc.collect()
        print(f"  n={n}: {start + count} keyframes added", file=sys.stderr, flush=True)

    rows = []
    if chunked_exact:
        chunks = -(-n // CHUNK)
        rows.append(("exact (chunked)", f"Flat, summed over {chunks} chunks of {CHUNK:,}", "-",
                     f"{n * args.dim * 4 / 2**20:.0f} (not held)",
                     np.median(exact_seconds), np.percentile(exact_seconds, 90), float("nan"), 1.0,
                     float("nan"), float("nan"), 1.0))
    for config in configs:
        keyframe_map = maps[config.name]
        size = f"{index_bytes(keyframe_map) / 2**20:.0f}"
        factory = keyframe_map.factory + ("" if keyframe_map.is_trained else " (untrained: exact)")
        for setting in config.sweep if keyframe_map.is_trained else [{}]:
            keyframe_map.set_search_params(**setting)
            seconds = time_queries(keyframe_map, timed, args.k)
            began = time.perf_counter()
            results = keyframe_map.query_batch(queries, args.k)
            batched = (time.perf_counter() - began) / len(queries)
            top1 = np.array([r[0].keyframe_id if r else -1 for r in results])
            recall = float(np.mean(top1 == best_id))
            name = " ".join([config.name, *(f"{key}={value}" for key, value in setting.items())])
            excluded_seconds = time_queries(keyframe_map, timed, args.k, timed_exclusions)
            results = keyframe_map.query_batch(queries, args.k, query_exclusions)
            top1 = np.array([r[0].keyframe_id if r else -1 for r in results])
            excluded_recall = float(np.mean(top1 == best_allowed_id))
            returned = [np.array([c.keyframe_id for c in r]) for r in results]
            assert not any(((ids >= lo) & (ids < hi)).any()
                           for ids, (lo, hi) in zip(returned, excluded_ranges)), "an excluded keyframe was returned"
            rows.append((name, factory, f"{build_seconds[config.name]:.1f}", size,
                         np.median(seconds), np.percentile(seconds, 90), batched, recall,
                         np.median(excluded_seconds), np.percentile(excluded_seconds, 90), excluded_recall))
        del keyframe_map
        maps[config.name] = None
        gc.collect()
    baseline = rows[0][4]
    lines = [f"### {n:,} keyframes x {args.dim}-d ({len(queries)} queries, {len(timed)} timed, k={args.k}; "
             f"exact top-1 = query's source for {np.mean(best_id == sources):.1%})", "",
             "| configuration | FAISS index | build s | index MiB | median ms/query | p90 ms | batched ms/query "
             "| recall@1 vs exact | loss (points) | speed-up vs exact | excl.: median ms | excl.: p90 ms "
             "| excl.: recall@1 vs exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, factory, build, size, median, p90, batched, recall, x_median, x_p90, x_recall in rows:
        batched_text = "-" if np.isnan(batched) else f"{batched * 1e3:.3f}"
        x_text = "-" if np.isnan(x_median) else f"{x_median * 1e3:.3f} | {x_p90 * 1e3:.3f}"
        lines.append(f"| {name} | {factory} | {build} | {size} | {median * 1e3:.3f} | {p90 * 1e3:.3f} | {batched_text} "
                     f"| {recall:.1%} | {(1 - recall) * 100:.1f} | {baseline / median:.1f}x | "
                     f"{x_text if x_text != '-' else '- | -'} | {x_recall:.1%} |")
    return "\n".join(lines) + "\n"


def shipped_dimension() -> int:
    """The descriptor dimension of the default model the package ships (its config; no weights loaded)."""
    from tscm_ros.describe.checkpoint import load_model_config
    from tscm_ros.describe.describer import DEFAULT_CONFIG
    from tscm_ros.describe.models import build_model

    return int(build_model(load_model_config(DEFAULT_CONFIG)[0], load_pretrained=False).dim)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000",
                        help="comma-separated map sizes (default 1000,10000,100000; 1000000 is the long run)")
    parser.add_argument("--dim", type=int, default=None,
                        help="descriptor dimension (default: the shipped default model's, 3840)")
    parser.add_argument("--pca-dim", type=int, default=256, help="PCA reduction for the reduced configurations")
    parser.add_argument("--queries", type=int, default=1000, help="queries for recall@1")
    parser.add_argument("--latency-queries", type=int, default=300, help="single queries timed for latency")
    parser.add_argument("--k", type=int, default=10, help="candidates per query")
    parser.add_argument("--query-noise", type=float, default=QUERY_NOISE,
                        help="query perturbation in units of the in-place spread (higher: harder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ef-search", default="128,256,512", help="HNSW efSearch values swept on each HNSW map")
    parser.add_argument("--configs", default="", help="comma-separated configuration names to run (default: all)")
    args = parser.parse_args(argv)
    if args.dim is None:
        args.dim = shipped_dimension()
    args.ef_search = [int(v) for v in args.ef_search.split(",")]
    args.configs = [name for name in args.configs.split(",") if name]
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {os.cpu_count()} CPUs")
    for n in sorted(int(s) for s in args.sizes.split(",")):
        print(run_size(n, args), flush=True)
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"peak resident memory so far: {peak_gib:.1f} GiB\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
