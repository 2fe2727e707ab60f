"""The FAISS index of a keyframe map: its configuration (``IndexConfig``) and the index chain built from it.

Index types
-----------
- ``flat``: exact search (``IndexFlatL2``). Adding is an append, so online mapping one keyframe at a time
  between queries is cheap.
- ``hnsw``: graph search (``IndexHNSWFlat``: ``hnsw_m`` links per node, ``ef_construction``,
  ``ef_search``). Incremental adds, no training.
- ``ivfpq``: inverted lists with product quantisation (``nlist`` lists, ``pq_m`` bytes per vector,
  ``nprobe`` lists visited per query). Needs training.
- ``pq``: every keyframe's 4-bit product-quantised code (``pq_m`` codes, by default one per 4 dimensions: 64
  bytes for a 512-d descriptor) scanned in full with FAISS's SIMD fast scan; the best ``k * k_factor``, and
  at least ``PQ_MIN_SHORTLIST`` (320), re-ranked exactly. Needs training, and always re-ranks. No partition
  to miss, and built in seconds. FAISS's fast scan takes no ID selector, so a query with exclusion fetches
  as many more as there are excluded keyframes and drops those (the allowed shortlist keeps its size).

Measured by ``bench/map_search.py`` on this 2-core CPU, recall@1 against exact search:

- 512-d descriptors with a distilled student's statistics (``--real DIR --student``): ``pq`` finds the exact
  top-1 for 99.9 % of queries at 100k keyframes in 0.7-1.2 ms (exact search: 16-18 ms; HNSW needs 5.4 ms for
  as much), and for 97.9 % at 1M in 6.5-7.7 ms (99.2 % with a shortlist of 640), built in 17 s where HNSW
  over PCA took 17 min. ``auto_index_config`` gives it to such maps.
- 3840-d descriptors of the default model's real-photo statistics (``--real DIR``): ``hnsw`` over PCA to 512
  answers in 0.8 ms at 10k keyframes with 99.4 % at the default ``ef_search`` 128, and in 2.4 ms with 90.4 %
  at 100k, where ``ef_search`` 512 gives 98.8 % in 5.3 ms; at 1M, 2048 gives 95.3 % in 30 ms. PCA to 256 caps
  recall there: the exact top-1 is among its 40 nearest in PCA-256 space for 90 % of queries. ``pq`` (960
  codes) gives 100 % at 10k and 100k, at 0.9x and 1.5x the time of HNSW at efSearch 128, built in 20 s
  against 165 s at 100k; it is not the default for them because training it on 4096 keyframes takes 7 s
  (PCA + HNSW: under 2 s), which a node in mapping mode waits for.
- Queries with exclusion on cost the same recall and up to 0.6 ms more (``pq``: 0.8 ms more at 100k, with
  600 keyframes excluded). ``ivfpq`` is the choice when memory, not latency, is the limit.

Any type can put a PCA reduction to ``pca_dim`` (optionally whitened) in front; it is learned from the
map's own descriptors. Types that need training (``ivfpq``, ``pq``, or any with ``pca_dim``) keep an exact flat
index until the map holds ``train_size`` descriptors; the ``add`` that reaches it trains on them (at most
``MAX_TRAIN_POINTS``, sampled with a fixed seed) and moves them into the real index, so that one call takes
seconds on a big map. Later adds go straight in; the learned PCA and quantisers are not updated.
``nlist`` left at None is chosen at training time as the power of two nearest ``sqrt(n)`` for the ``n``
descriptors present then: set it explicitly for a map that will grow far beyond ``train_size``.

Exact distances
---------------
The distance is exact (computed from the full descriptors) for the ``flat`` and plain ``hnsw`` indexes, and
for every lossy index (PCA reduction, IVF-PQ or PQ) built with ``rerank=True``, the default: the lossy index
then only proposes a shortlist of ``k * k_factor`` keyframes, which FAISS re-ranks by their exact distance
to the query (``IndexRefineFlat``), so scores and thresholds mean the same for every index type.
``rerank_dtype='float16'`` keeps the full descriptors in half precision instead (half the memory: 4 GB for
1M 2048-d keyframes; distances then differ from exact by about 1e-3). With ``rerank=False`` the map does not
keep the full descriptors (``4 * dim`` bytes less per keyframe) and the distance is the lossy index's own
estimate: for PCA, the squared distance between the projections on the ``pca_dim`` principal components (a
lower bound of the true distance, so scores are slightly optimistic); for PQ, its quantised approximation of
that. Whitening changes the metric itself, so it requires ``rerank=True``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import faiss
import numpy as np

from tscm_ros.errors import ConfigError
from tscm_ros.map.exclusion import ExcludedIds

INDEX_TYPES = ("flat", "hnsw", "ivfpq", "pq")
MAX_TRAIN_POINTS = 100_000
AUTO_PCA_DIM = 512  # ``auto_index_config``: descriptors of more than twice this are reduced for the graph
SINGLE_THREAD_BELOW = 20  # queries per search below which FAISS runs single-threaded
PQ_TRAIN_SIZE = 4096  # a ``pq`` map searches exactly (under 0.5 ms for 512-d) until it holds this many
PQ_MIN_SHORTLIST = 320  # re-ranked at least (bench/map_search.py: 100k keyframes, 99.9 % of exact top-1)


def _as_int(value):
    return int(value) if isinstance(value, np.integer) else value


def _positive_int(value) -> bool:
    return isinstance(value, int) and value >= 1


@dataclass(frozen=True)
class IndexConfig:
    """Which FAISS index a keyframe map uses, and its settings (see the module doc).

    Raises ConfigError on invalid settings; ``for_dim`` checks those that depend on the descriptor
    dimension and fills in the defaults of ``pq_m`` and ``train_size``. ``nlist`` left at None is chosen at
    training time.
    """

    type: str = "flat"
    pca_dim: int | None = None
    whiten: bool = False
    rerank: bool = True
    rerank_dtype: str = "float32"
    k_factor: int = 4
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    nlist: int | None = None
    pq_m: int | None = None
    nprobe: int = 16
    train_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("pca_dim", "nlist", "pq_m", "train_size"):
            object.__setattr__(self, name, _as_int(getattr(self, name)))
        if self.type not in INDEX_TYPES:
            raise ConfigError(f"keyframe map: unknown index type {self.type!r}; choose one of {', '.join(INDEX_TYPES)}")
        if self.whiten and self.pca_dim is None:
            raise ConfigError("keyframe map: whiten=True needs pca_dim (whitening is part of the PCA reduction)")
        if self.whiten and not self.rerank:
            raise ConfigError("keyframe map: whiten=True needs rerank=True "
                              "(whitened distances are not descriptor distances)")
        if self.type == "pq" and not self.rerank:
            raise ConfigError("keyframe map: index type 'pq' needs rerank=True (its 4-bit codes only shortlist "
                              "candidates; their distances are too rough to score with)")
        if self.rerank_dtype not in ("float32", "float16"):
            raise ConfigError(f"keyframe map: rerank_dtype must be 'float32' or 'float16', got {self.rerank_dtype!r}")
        for name in ("k_factor", "hnsw_m", "ef_construction", "ef_search", "nprobe"):
            if not _positive_int(getattr(self, name)):
                raise ConfigError(f"keyframe map: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.nlist is not None and not _positive_int(self.nlist):
            raise ConfigError(f"keyframe map: nlist must be a positive integer or None, got {self.nlist!r}")

    @property
    def needs_training(self) -> bool:
        return self.type in ("ivfpq", "pq") or self.pca_dim is not None

    def for_dim(self, dim: int) -> IndexConfig:
        """This config checked against ``dim``-d descriptors, with the defaults of ``pq_m`` and ``train_size``."""
        if self.pca_dim is not None and not (isinstance(self.pca_dim, int) and 1 <= self.pca_dim < dim):
            raise ConfigError(f"keyframe map: pca_dim must be an integer in [1, {dim - 1}] for {dim}-d descriptors, "
                              f"got {self.pca_dim!r}")
        reduced_dim = self.pca_dim or dim
        pq_m = self.pq_m
        if pq_m is None:
            per_code = 4 if self.type == "pq" else 8  # dimensions per sub-quantiser
            pq_m = max(d for d in range(1, max(1, reduced_dim // per_code) + 1) if reduced_dim % d == 0)
        if not _positive_int(pq_m) or reduced_dim % pq_m:
            raise ConfigError(f"keyframe map: pq_m must divide the indexed dimension {reduced_dim}, got {pq_m!r}")
        train_size = self.train_size
        if train_size is None:
            train_size = 0
            if self.pca_dim is not None:
                train_size = max(1000, 4 * self.pca_dim)
            if self.type == "ivfpq":
                train_size = max(train_size, 10_000, 39 * (self.nlist or 0))
            if self.type == "pq":
                train_size = max(train_size, PQ_TRAIN_SIZE)
        least = max(256, self.nlist or 0, self.pca_dim or 0) if self.needs_training else 0
        if not isinstance(train_size, int) or train_size < least:
            raise ConfigError(f"keyframe map: train_size {train_size!r} is too small for index {self.type!r} "
                              f"(needs at least {least})")
        return replace(self, pq_m=pq_m, train_size=train_size)

    def factory_string(self) -> str:
        """The FAISS ``index_factory`` string of the trained index (``nlist`` must be set for ivfpq)."""
        parts = []
        if self.pca_dim:
            parts.append(f"{'PCAW' if self.whiten else 'PCA'}{self.pca_dim}")
        if self.type == "flat":
            parts.append("Flat")
        elif self.type == "hnsw":
            parts.append(f"HNSW{self.hnsw_m}")
        elif self.type == "pq":
            parts.append(f"PQ{self.pq_m}x4fs")
        else:
            parts.append(f"IVF{self.nlist},PQ{self.pq_m}np")  # np: no polysemous training (slow, unused)
        if self.rerank and (self.pca_dim or self.type in ("ivfpq", "pq")):
            parts.append("RFlat" if self.rerank_dtype == "float32" else "Refine(SQfp16)")
        return ",".join(parts)

    def to_dict(self) -> dict:
        """The settings by name, as the map manifest's ``index`` entry records them."""
        return asdict(self)

    @classmethod
    def from_dict(cls, settings: dict) -> IndexConfig:
        """The config of a manifest's ``index`` entry (its ``factory`` and ``trained`` describe the index, not
        the config, and are ignored here); ConfigError on unknown or invalid settings."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(settings) - known - {"factory", "trained"})
        if unknown:
            raise ConfigError(f"unknown index settings {', '.join(unknown)}")
        return cls(**{key: value for key, value in settings.items() if key in known})


def auto_index_config(dim: int) -> IndexConfig:
    """The index a map of ``dim``-d descriptors gets by default. Both search exactly (flat) until the map holds
    ``train_size`` keyframes, and train then.

    - Over ``2 * AUTO_PCA_DIM`` dimensions (the default model's 3840): PCA to ``AUTO_PCA_DIM`` + HNSW with exact
      re-ranking, trained at 2048 keyframes. bench/map_search.py with descriptors of real-photo statistics
      (``--real``): at 10k keyframes 0.8 ms median per query and 99.4 % recall@1 of exact search (exact 8.0 ms);
      at 100k 2.4 ms and 90.4 %.
    - Compact descriptors (a distilled student's 512): ``pq``, trained at ``PQ_TRAIN_SIZE`` keyframes
      (``--real --student``: 100k keyframes in 0.7 ms at 99.9 %, exact 15.5 ms).
    """
    if dim > 2 * AUTO_PCA_DIM:
        return IndexConfig(type="hnsw", pca_dim=AUTO_PCA_DIM)
    return IndexConfig(type="pq")


def fit_pca(pca: faiss.PCAMatrix, sample: np.ndarray) -> None:
    """Train ``pca`` on ``sample`` (N, d_in) as FAISS would (the eigenvectors and eigenvalues of the centred
    sample's scatter matrix), with NumPy's divide-and-conquer eigensolver: FAISS's own took 12 s for 2048
    descriptors of 3840-d here, against 1.5 s for 1024, and a map growing past ``train_size`` waits for it."""
    mean = sample.mean(axis=0)
    centred = sample - mean
    if len(sample) < pca.d_in:  # eigenvectors of the Gram matrix, mapped back: N x N instead of d x d
        values, vectors = np.linalg.eigh(centred @ centred.T)
        values, vectors = values[::-1], vectors[:, ::-1]
        positive = values > values[0] * 1e-6
        components = (vectors[:, positive].T @ centred) / np.sqrt(values[positive])[:, None]
        values = values[positive]
    else:
        values, vectors = np.linalg.eigh(centred.T @ centred)
        values, components = values[::-1], vectors[:, ::-1].T
    if len(components) < pca.d_out:  # the sample spans fewer dimensions: the rest project to 0
        missing = pca.d_out - len(components)
        components = np.concatenate([components, np.zeros((missing, pca.d_in), components.dtype)])
        values = np.concatenate([values, np.zeros(missing, values.dtype)])
    faiss.copy_array_to_vector(np.ascontiguousarray(mean, dtype=np.float32), pca.mean)
    faiss.copy_array_to_vector(np.ascontiguousarray(values, dtype=np.float32), pca.eigenvalues)
    faiss.copy_array_to_vector(np.ascontiguousarray(components[: pca.d_out], dtype=np.float32).ravel(), pca.PCAMat)
    pca.prepare_Ab()
    pca.is_trained = True


def sub_indexes(index: faiss.Index) -> list[faiss.Index]:
    """The index and the ones it wraps (refinement, pre-transform), outermost first."""
    chain = [faiss.downcast_index(index)]
    while True:
        last = chain[-1]
        if isinstance(last, faiss.IndexRefine):
            chain.append(faiss.downcast_index(last.base_index))
        elif isinstance(last, faiss.IndexPreTransform):
            chain.append(faiss.downcast_index(last.index))
        else:
            return chain


class DescriptorIndex:
    """The descriptors of a map's keyframes, by keyframe id, in the FAISS index an ``IndexConfig`` describes.

    Until a type that needs training is trained, it is an exact flat index (see the module doc).
    """

    def __init__(self, config: IndexConfig, index: faiss.Index, trained: bool) -> None:
        """Wrap ``index``: built from ``config`` (already ``for_dim``) if ``trained``, else its flat fallback."""
        self._config = config
        self._index = index
        self._trained = trained
        self._configure()

    @classmethod
    def empty(cls, dim: int, config: IndexConfig) -> DescriptorIndex:
        """An empty index of ``dim``-d descriptors; ``config`` must be ``config.for_dim(dim)``."""
        trained = not config.needs_training
        factory = config.factory_string() if trained else "Flat"
        return cls(config, faiss.index_factory(dim, factory, faiss.METRIC_L2), trained)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def config(self) -> IndexConfig:
        return self._config

    @property
    def is_trained(self) -> bool:
        """False while a type that needs training still searches its exact flat fallback."""
        return self._trained

    @property
    def factory(self) -> str:
        """The FAISS factory string of the index in use ('Flat' until trained)."""
        return self._config.factory_string() if self._trained else "Flat"

    @property
    def faiss_index(self) -> faiss.Index:
        return self._index

    def copy(self) -> DescriptorIndex:
        """An independent copy (the map's autosave writes it while keyframes keep coming)."""
        return DescriptorIndex(self._config, faiss.clone_index(self._index), self._trained)

    def _configure(self) -> None:
        for sub in sub_indexes(self._index):
            if isinstance(sub, faiss.IndexRefine):
                sub.k_factor = float(self._config.k_factor)
            elif isinstance(sub, faiss.IndexHNSW):
                sub.hnsw.efConstruction = self._config.ef_construction
                sub.hnsw.efSearch = self._config.ef_search
            elif isinstance(sub, faiss.IndexIVF):
                sub.nprobe = self._config.nprobe

    def set_search_params(self, *, ef_search: int | None = None, nprobe: int | None = None,
                          k_factor: int | None = None) -> None:
        """Change speed/recall trade-offs of the index (ConfigError on invalid values)."""
        changes = {name: value for name, value in (("ef_search", ef_search), ("nprobe", nprobe),
                                                    ("k_factor", k_factor)) if value is not None}
        self._config = replace(self._config, **changes)
        self._configure()

    def add(self, vectors: np.ndarray) -> None:
        """Add (N, dim) float32 descriptors; the add that reaches ``train_size`` trains the real index."""
        self._index.add(vectors)
        if not self._trained and len(self) >= self._config.train_size:
            self._train()

    def descriptors(self, ids: np.ndarray) -> np.ndarray:
        """The descriptors of keyframes ``ids`` as (N, dim) float32: exact for flat, HNSW and float32
        re-ranked indexes, the lossy index's reconstruction otherwise."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.zeros((0, self._index.d), dtype=np.float32)
        index = self._index
        for sub in sub_indexes(self._index):
            if isinstance(sub, faiss.IndexRefine):
                index = sub.refine_index
                break
            if isinstance(sub, faiss.IndexIVF):
                sub.make_direct_map()
        return index.reconstruct_batch(ids)

    def _train(self) -> None:
        """Replace the exact fallback by the real index, trained on the descriptors held so far."""
        vectors = self._index.reconstruct_n(0, self._index.ntotal)
        sample = vectors
        if len(vectors) > MAX_TRAIN_POINTS:
            chosen = np.random.default_rng(0).choice(len(vectors), MAX_TRAIN_POINTS, replace=False)
            sample = vectors[np.sort(chosen)]
        if self._config.type == "ivfpq" and self._config.nlist is None:
            nearest_power_of_two = 2 ** max(0, round(math.log2(max(1.0, math.sqrt(len(vectors))))))
            self._config = replace(self._config, nlist=min(nearest_power_of_two, len(sample) // 39 or 1))
        index = faiss.index_factory(self._index.d, self._config.factory_string(), faiss.METRIC_L2)
        self._index = index
        self._configure()
        sample = np.ascontiguousarray(sample)
        for sub in sub_indexes(index):
            if isinstance(sub, faiss.IndexPreTransform):
                fit_pca(faiss.downcast_VectorTransform(sub.chain.at(0)), sample)
        index.train(sample)  # what is left to train: the quantisers of ivfpq
        index.add(vectors)
        self._trained = True

    def _search_parameters(self, selector: faiss.IDSelector) -> tuple[faiss.SearchParameters, list]:
        """Search parameters for this index chain that search only the ids ``selector`` accepts, with the
        index's own settings (efSearch, nprobe, k_factor); and the objects they point to (keep them alive)."""
        params = None
        alive: list = []
        for sub in reversed(sub_indexes(self._index)):
            if params is None:  # the innermost index does the selecting
                if isinstance(sub, faiss.IndexHNSW):
                    params = faiss.SearchParametersHNSW()
                    params.efSearch = self._config.ef_search
                elif isinstance(sub, faiss.IndexIVF):
                    params = faiss.SearchParametersIVF()
                    params.nprobe = self._config.nprobe
                else:
                    params = faiss.SearchParameters()
                params.sel = selector
            elif isinstance(sub, faiss.IndexPreTransform):
                params = faiss.SearchParametersPreTransform()
                params.index_params = alive[-1]
            elif isinstance(sub, faiss.IndexRefine):
                params = faiss.IndexRefineSearchParameters()
                params.k_factor = float(self._config.k_factor)
                params.base_index_params = alive[-1]
            alive.append(params)
        return params, alive

    def search(self, vectors: np.ndarray, k: int, excluded: ExcludedIds | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search for the ``k`` nearest keyframes not in ``excluded`` (rows padded with id -1 where fewer
        are found); a few queries run on one OpenMP thread.

        Measured here: one query through a PCA index took 8-16 ms with 2 threads on a busy 2-core machine
        (threads waiting for time slices) and 0.2 ms with one; batches still use every thread. The thread
        count set here is the calling thread's own (OpenMP's nthreads-var belongs to each thread's data
        environment, as test_keyframe_map checks), so concurrent queries from other threads are unaffected.
        """
        vectors = np.ascontiguousarray(vectors)
        if self._trained and self._config.type == "pq":
            return self._search_pq(vectors, k, excluded)
        if not excluded:
            return self._run(vectors, k, None)
        selector, _selector_alive = excluded.selector()
        params, _alive = self._search_parameters(selector)
        return self._run(vectors, k, params)

    def _search_pq(self, vectors: np.ndarray, k: int, excluded: ExcludedIds | None) -> tuple[np.ndarray, np.ndarray]:
        """``search`` in the ``pq`` index: a shortlist of ``max(k * k_factor, PQ_MIN_SHORTLIST)`` re-ranked (the
        top-1 needs a shortlist of that size whatever ``k``). Its fast scan takes no ID selector: with
        exclusion, the best ``k`` + (number excluded) come from a shortlist that many longer, and the excluded
        are dropped."""
        count = excluded.count() if excluded else 0
        wider = min(len(self), k + count)
        shortlist = min(len(self), max(k * self._config.k_factor, PQ_MIN_SHORTLIST) + count)
        params = faiss.IndexRefineSearchParameters()
        params.k_factor = (shortlist + 0.5) / wider  # FAISS truncates wider * k_factor
        distances, ids = self._run(vectors, wider, params)
        if not count:
            return distances, ids
        keep = (ids >= 0) & ~excluded.contains(ids.ravel()).reshape(ids.shape)
        kept_distances = np.full((len(ids), k), np.inf, np.float32)
        kept_ids = np.full((len(ids), k), -1, np.int64)
        for row, mask in enumerate(keep):
            columns = np.flatnonzero(mask)[:k]
            kept_distances[row, : len(columns)] = distances[row, columns]
            kept_ids[row, : len(columns)] = ids[row, columns]
        return kept_distances, kept_ids

    def _run(self, vectors: np.ndarray, k: int, params: faiss.SearchParameters | None
             ) -> tuple[np.ndarray, np.ndarray]:
        if len(vectors) >= SINGLE_THREAD_BELOW:
            return self._index.search(vectors, k, params=params)
        threads = faiss.omp_get_max_threads()
        if threads != 1:
            faiss.omp_set_num_threads(1)
        try:
            return self._index.search(vectors, k, params=params)
        finally:
            if threads != 1:
                faiss.omp_set_num_threads(threads)
