"""Benchmark: keyframe-map search latency and recall@1 against exact search, per index type and map size.

Usage: python -m bench.map_search [--real DIR] [--sizes 1000,10000,100000] [--dim D] [--pca-dims 256,512]
       [--ef-search 128,256,512] [--configs NAME,...]

Synthetic descriptors (deterministic, seeded), generated in runs of ``PLACE_SIZE`` similar keyframes seen
around the same place: ``normalize(mean + (c_place + 0.5 n) @ basis)``, one standard-normal centre
``c_place`` per place and ``n`` standard normal (``Descriptors``).

- With ``--real DIR`` (``make bench REAL=DIR``) the statistics are the shipped default model's on real
  photographs: every revisit set under DIR is described as build_map would (a vocabulary fitted on its
  references), and the mean, principal directions and variances of the references become ``mean`` and
  ``basis``. A query keeps a correlation with the keyframe it came from and is otherwise a new keyframe;
  the correlation is drawn from the real queries', ``1 - d(query, its match) / mean d(query, reference)``
  (median about 0.3 on ../shared/realdata: real revisits are little closer than unrelated places).
- Without it, hand-set statistics: zero mean, a power-law spectrum ``(1 + j) ** -0.5`` over 256 random
  directions, a tenth of the energy isotropic noise, and a query is its source plus new noise
  ``QUERY_NOISE`` times the in-place spread.

Either way a query's exact nearest neighbour is often, not always, the keyframe it came from; the fraction
is printed. Recall@1 is the fraction of queries whose top-1 equals the exact full-dimension search's top-1
(ids); "same place as exact" counts a top-1 among the keyframes of the exact top-1's place (its run of
``PLACE_SIZE``) as right: a loop detector that finds another keyframe of that place still closes the loop.
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
from tscm_ros.map.index import AUTO_PCA_DIM, IndexConfig
from tscm_ros.map.keyframe_map import KeyframeMap, KeyframeMeta

RANK = 256
PLACE_SIZE = 10
IN_PLACE_SPREAD = 0.5
QUERY_NOISE = 2.0  # default of --query-noise
ISOTROPIC_ENERGY = 0.1
CHUNK = 100_000  # keyframes generated and added at a time
FULL_DESCRIPTOR_LIMIT = 200_000  # above this, configurations storing full float32 vectors are skipped


class Descriptors:
    """Deterministic synthetic descriptors; item i depends only on (seed, chunk of i).

    A keyframe is ``normalize(mean + (c_place + spread n) @ basis + e)``: ``basis`` (rank x dim) carries the
    spectrum, ``c`` and ``n`` are standard normal, ``e`` isotropic with ``isotropic_sigma`` per dimension.
    ``power_law`` sets these by hand, and its query is the raw form of its source keyframe plus
    ``query_noise (m @ basis + e')``. ``fitted`` measures them on real descriptors, and its query keeps a
    correlation ``r`` with its source and is otherwise a new keyframe of the same statistics:
    ``mean + r (x - mean) + sqrt(1 - r^2) sqrt(1 + spread^2) m @ basis``, with ``r`` drawn per query from
    those measured on real queries.
    """

    def __init__(self, mean: np.ndarray, basis: np.ndarray, isotropic_sigma: float, in_place_spread: float,
                 query_noise: float, seed: int, source: str, query_correlations: np.ndarray | None = None) -> None:
        self.mean, self.basis = mean.astype(np.float32), basis.astype(np.float32)
        self.query_correlations = query_correlations
        self.dim, self.rank = basis.shape[1], basis.shape[0]
        self.isotropic_sigma, self.in_place_spread, self.query_noise = isotropic_sigma, in_place_spread, query_noise
        self.seed, self.source = seed, source
        latent_energy = float((self.basis**2).sum()) * (1 + in_place_spread**2)
        self.raw_norm = float(np.sqrt(float(self.mean @ self.mean) + latent_energy + isotropic_sigma**2 * self.dim))

    @classmethod
    def power_law(cls, dim: int, seed: int, query_noise: float = QUERY_NOISE) -> Descriptors:
        """Zero mean, ``RANK`` random directions with spectrum ``(1 + j) ** -0.5``, a tenth of the energy isotropic."""
        rng = np.random.default_rng([seed, 1])
        basis = rng.standard_normal((RANK, dim)).astype(np.float32)
        basis /= np.linalg.norm(basis, axis=1, keepdims=True)
        spectrum = (1.0 + np.arange(RANK, dtype=np.float32)) ** -0.5
        latent_energy = float((spectrum**2).sum()) * (1 + IN_PLACE_SPREAD**2)
        sigma = float(np.sqrt(ISOTROPIC_ENERGY / (1 - ISOTROPIC_ENERGY) * latent_energy / dim))
        return cls(np.zeros(dim, np.float32), spectrum[:, None] * basis, sigma, IN_PLACE_SPREAD,
                   query_noise * IN_PLACE_SPREAD, seed,
                   f"power-law spectrum over {RANK} random directions, query noise {query_noise:g} x in-place spread")

    @classmethod
    def fitted(cls, sets: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], seed: int, source: str) -> Descriptors:
        """Statistics of real descriptors: ``sets`` of (references in traversal order, queries, each query's
        matching reference). The mean, and the covariance's principal directions and variances, come from
        the references (each set centred on its own mean; the mean is theirs averaged). Keyframes of a place
        keep the hand-set ``IN_PLACE_SPREAD`` (1 m apart, closer than the real sets' consecutive frames). A
        query's correlation with its source is one of the real queries' ``1 - d(query, its nearest match) /
        mean d(query, reference)``."""
        centred = np.concatenate([refs - refs.mean(axis=0) for refs, _, _ in sets])
        mean = np.mean([refs.mean(axis=0) for refs, _, _ in sets], axis=0)
        _, singular, directions = np.linalg.svd(centred, full_matrices=False)
        variances = singular**2 / (len(centred) - len(sets))
        keep = variances > variances[0] * 1e-6
        basis = np.sqrt(variances[keep])[:, None] * directions[keep]

        correlations = []
        for refs, queries, match in sets:  # 1 - d(query, its match) / mean d(query, any reference)
            distances = ((queries**2).sum(axis=1)[:, None] - 2 * queries @ refs.T + (refs**2).sum(axis=1)[None, :])
            correlations.append(1 - distances[np.arange(len(queries)), match] / distances.mean(axis=1))
        correlations = np.clip(np.concatenate(correlations), 0.0, 1.0)
        spread = IN_PLACE_SPREAD
        return cls(mean, basis / np.sqrt(1 + spread**2), 0.0, spread, 0.0, seed,
                   f"fitted on {source}: {len(centred)} references, {int(keep.sum())} principal directions; "
                   f"{len(correlations)} queries, correlation with their match median {np.median(correlations):.2f}",
                   correlations)

    def _embed(self, latent: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = latent @ self.basis
        x += self.mean
        if self.isotropic_sigma:
            x += rng.standard_normal(x.shape, dtype=np.float32) * self.isotropic_sigma
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def chunk(self, start: int, count: int) -> np.ndarray:
        """Rows [start, start + count) of the database; start must be a multiple of CHUNK (or 0)."""
        rng = np.random.default_rng([self.seed, 2, start])
        places = -(-count // PLACE_SIZE)
        centres = rng.standard_normal((places, self.rank), dtype=np.float32)
        latent = np.repeat(centres, PLACE_SIZE, axis=0)[:count]
        latent += self.in_place_spread * rng.standard_normal((count, self.rank), dtype=np.float32)
        return self._embed(latent, rng)

    def queries(self, database_rows: np.ndarray, seed_offset: int) -> np.ndarray:
        """Perturbed, renormalised copies of (unit-norm) database rows."""
        rng = np.random.default_rng([self.seed, 3, seed_offset])
        count = len(database_rows)
        if self.query_correlations is not None:
            r = rng.choice(self.query_correlations, count).astype(np.float32)[:, None]
            fresh = rng.standard_normal((count, self.rank), dtype=np.float32) @ self.basis
            x = self.mean + r * (database_rows * self.raw_norm - self.mean)
            x += np.sqrt(1 - r**2) * np.sqrt(1 + self.in_place_spread**2) * fresh
            return x / np.linalg.norm(x, axis=1, keepdims=True)
        perturbation = (self.query_noise * rng.standard_normal((count, self.rank), dtype=np.float32)) @ self.basis
        if self.isotropic_sigma:
            perturbation += (rng.standard_normal(perturbation.shape, dtype=np.float32)
                             * (self.isotropic_sigma * self.query_noise / self.in_place_spread))
        x = database_rows * self.raw_norm + perturbation  # back on the scale the rows had before normalising
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


def real_descriptor_sets(directory: str, student: bool = False) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(references, queries, each query's nearest matching reference) of every revisit set under ``directory``,
    described by the shipped default with a vocabulary fitted on the set's references, as build_map does, or
    with ``student`` by the distilled student, distilled on the set's references as ``train student --bag`` does."""
    import tempfile

    from tscm_ros.describe.describer import describer_for
    from tscm_ros.io.revisit_set import find_revisit_sets, read_rgb
    from tscm_ros.train.distillation import STUDENT_FILE, distil, load_distill_config

    describer = describer_for("default")
    sets = []
    for revisit_set in find_revisit_sets(directory):
        references = [read_rgb(path) for path in revisit_set.references]
        if student:
            with tempfile.TemporaryDirectory() as run:
                distil(lambda: references, len(references), run, load_distill_config(None), revisit_set.name,
                       show_progress=False)
                adapted = describer_for(os.path.join(run, STUDENT_FILE))
            refs = adapted.describe(references)
        else:
            _, maps = describer.describe_with_maps(references)
            adapted = describer.with_vocabulary(describer.fit_vocabulary([m[0] for m in maps]))
            refs = adapted.aggregate(maps)
        queries = adapted.describe([read_rgb(path) for path in revisit_set.queries])
        nearest = [matches[np.argmin(((refs[list(matches)] - query) ** 2).sum(axis=1))]
                   for query, matches in zip(queries, revisit_set.matches)]
        sets.append((refs, queries, np.array(nearest)))
        print(f"  described {revisit_set.name}", file=sys.stderr, flush=True)
    return sets


@dataclass
class Config:
    name: str
    index: IndexConfig
    sweep: list[dict] = field(default_factory=lambda: [{}])  # search settings measured on the built map


def configurations(pca_dims: Sequence[int], n: int, ef_search: Sequence[int] = (128, 256, 512),
                   dim: int = 3840) -> list[Config]:
    """What is compared, for each PCA dimension; HNSW and re-ranking use the KeyframeMap defaults (M 32,
    efConstruction 200, efSearch 128, k_factor 4); ``pq`` (4-bit codes of every keyframe scanned) re-ranks
    k * k_factor but at least 320: 320 and 640 at k 10 (k_factor 4, the default, and 64). Plain full-dimension
    HNSW and PCA without re-ranking only run up to 10k keyframes (they show what PCA alone loses; their builds
    dominate the run time). Above FULL_DESCRIPTOR_LIMIT only configurations without a float32 copy of the full
    descriptors run. Compact descriptors (``dim`` up to 2 * AUTO_PCA_DIM, the distilled student's) get plain
    HNSW with the efSearch sweep at every size: it stores them once, at 2 GiB for 1M 512-d keyframes."""
    compact = dim <= 2 * AUTO_PCA_DIM
    ef = [{"ef_search": value} for value in ef_search]
    probes = [{"nprobe": 32}, {"nprobe": 64}, {"nprobe": 128}]
    shortlists = [{"k_factor": 4}, {"k_factor": 64}]
    pq = IndexConfig(type="pq")
    candidates = [(Config("exact", IndexConfig()), FULL_DESCRIPTOR_LIMIT),
                  (Config("hnsw", IndexConfig(type="hnsw"), ef if compact else [{}]), None if compact else 10_000),
                  (Config("pq+rerank", pq, shortlists), FULL_DESCRIPTOR_LIMIT),
                  (Config("pq+rerank16", replace(pq, rerank_dtype="float16"), shortlists), None)]
    for pca_dim in (d for d in pca_dims if d < dim):
        hnsw = IndexConfig(type="hnsw", pca_dim=pca_dim)
        ivf = IndexConfig(type="ivfpq", pca_dim=pca_dim, nprobe=32)
        candidates += [
            (Config(f"pca{pca_dim}+hnsw+rerank", hnsw, ef), FULL_DESCRIPTOR_LIMIT),
            (Config(f"pca{pca_dim}+hnsw+rerank16", replace(hnsw, rerank_dtype="float16"), ef), None),
            (Config(f"pca{pca_dim}+ivfpq+rerank16", replace(ivf, rerank_dtype="float16"), probes), None),
            (Config(f"pca{pca_dim}+pq+rerank", IndexConfig(type="pq", pca_dim=pca_dim), shortlists),
             FULL_DESCRIPTOR_LIMIT),
            (Config(f"pca{pca_dim}+pq+rerank16", IndexConfig(type="pq", pca_dim=pca_dim, rerank_dtype="float16"),
                    shortlists), None),
            (Config(f"pca{pca_dim}+hnsw", replace(hnsw, rerank=False)), 10_000),
            (Config(f"pca{pca_dim}+ivfpq", replace(ivf, rerank=False)), None),
        ]
    return [config for config, largest in candidates if largest is None or n <= largest]


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


def run_size(n: int, data: Descriptors, args: argparse.Namespace) -> str:
    """Build every configuration for an n-keyframe map, measure it, return a Markdown section."""
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
    configs = [c for c in configurations(args.pca_dims, n, args.ef_search, args.dim)
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
                     np.median(exact_seconds), np.percentile(exact_seconds, 90), float("nan"), 1.0, 1.0,
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
            place_recall = float(np.mean(top1 // PLACE_SIZE == best_id // PLACE_SIZE))
            name = " ".join([config.name, *(f"{key}={value}" for key, value in setting.items())])
            excluded_seconds = time_queries(keyframe_map, timed, args.k, timed_exclusions)
            results = keyframe_map.query_batch(queries, args.k, query_exclusions)
            top1 = np.array([r[0].keyframe_id if r else -1 for r in results])
            excluded_recall = float(np.mean(top1 == best_allowed_id))
            returned = [np.array([c.keyframe_id for c in r]) for r in results]
            assert not any(((ids >= lo) & (ids < hi)).any()
                           for ids, (lo, hi) in zip(returned, excluded_ranges)), "an excluded keyframe was returned"
            rows.append((name, factory, f"{build_seconds[config.name]:.1f}", size,
                         np.median(seconds), np.percentile(seconds, 90), batched, recall, place_recall,
                         np.median(excluded_seconds), np.percentile(excluded_seconds, 90), excluded_recall))
        del keyframe_map
        maps[config.name] = None
        gc.collect()
    baseline = rows[0][4]
    lines = [f"### {n:,} keyframes x {args.dim}-d ({len(queries)} queries, {len(timed)} timed, k={args.k}; "
             f"exact top-1 = query's source for {np.mean(best_id == sources):.1%})", "",
             "| configuration | FAISS index | build s | index MiB | median ms/query | p90 ms | batched ms/query "
             "| recall@1 vs exact | loss (points) | same place as exact | speed-up vs exact | excl.: median ms "
             "| excl.: p90 ms | excl.: recall@1 vs exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, factory, build, size, median, p90, batched, recall, place_recall, x_median, x_p90, x_recall in rows:
        batched_text = "-" if np.isnan(batched) else f"{batched * 1e3:.3f}"
        x_text = "-" if np.isnan(x_median) else f"{x_median * 1e3:.3f} | {x_p90 * 1e3:.3f}"
        lines.append(f"| {name} | {factory} | {build} | {size} | {median * 1e3:.3f} | {p90 * 1e3:.3f} | {batched_text} "
                     f"| {recall:.1%} | {(1 - recall) * 100:.1f} | {place_recall:.1%} | {baseline / median:.1f}x | "
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
    parser.add_argument("--pca-dims", default="256,512",
                        help="comma-separated PCA reductions for the reduced configurations (default 256,512)")
    parser.add_argument("--queries", type=int, default=1000, help="queries for recall@1")
    parser.add_argument("--latency-queries", type=int, default=300, help="single queries timed for latency")
    parser.add_argument("--k", type=int, default=10, help="candidates per query")
    parser.add_argument("--real", metavar="DIR", default=None,
                        help="revisit sets (ref/, query/, gt.csv) whose default-model descriptors the generator's "
                             "statistics are fitted on (default: the hand-set power-law statistics)")
    parser.add_argument("--student", action="store_true",
                        help="with --real: the distilled student's descriptors (512-d; distilled on each set's "
                             "references), not the default's")
    parser.add_argument("--query-noise", type=float, default=QUERY_NOISE,
                        help="without --real: query perturbation in units of the in-place spread (higher: harder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ef-search", default="128,256,512", help="HNSW efSearch values swept on each HNSW map")
    parser.add_argument("--configs", default="", help="comma-separated configuration names to run (default: all)")
    args = parser.parse_args(argv)
    if args.dim is None:
        args.dim = 512 if args.student else shipped_dimension()
    args.ef_search = [int(v) for v in args.ef_search.split(",")]
    args.pca_dims = [int(v) for v in args.pca_dims.split(",")]
    args.configs = [name for name in args.configs.split(",") if name]
    if args.real:
        data = Descriptors.fitted(real_descriptor_sets(args.real, args.student), args.seed,
                                  f"{args.real} ({'distilled student' if args.student else 'default model'})")
        if data.dim != args.dim:
            parser.error(f"--dim {args.dim} differs from the {data.dim}-d descriptors of --real")
    else:
        data = Descriptors.power_law(args.dim, args.seed, args.query_noise)
    print(f"descriptors: {data.dim}-d, {data.source}")
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {os.cpu_count()} CPUs")
    for n in sorted(int(s) for s in args.sizes.split(",")):
        print(run_size(n, data, args), flush=True)
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"peak resident memory so far: {peak_gib:.1f} GiB\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
