"""Classical loop-closure baseline: ORB features and a bag of binary words, scored like DBoW2.

What ORB-SLAM and RTAB-Map do with DBoW2, built from maintained libraries instead of a clone:
- Features: OpenCV's ORB (256-bit binary descriptors) on the grey image.
- Vocabulary: ``num_words`` binary words learned from the reference traversal's images by
  scikit-learn's ``MiniBatchKMeans`` on the unpacked bits, each centre rounded to its majority bit
  pattern (the k-majority centre DBoW2 uses for binary features); a flat vocabulary rather than DBoW2's
  tree, which only matters for speed on vocabularies far larger than a route needs. A descriptor is
  assigned to the word at the smallest Hamming distance (FAISS ``IndexBinaryFlat``, exact).
- Weighting: tf-idf as in DBoW2: ``tf = n_wd / n_d`` (occurrences of word w in the image over the
  image's features), ``idf = log(N / N_w)`` over the N training images (N_w of them contain w; a word
  in no training image weighs 0). Image vectors are L1-normalised.
- Score: DBoW2's L1 score ``s(v, w) = 1 - |v - w|_1 / 2`` in [0, 1], which for L1-normalised
  non-negative vectors equals ``sum_i min(v_i, w_i)``; computed over the query's non-zero words
  only (the inverted-file shortcut). An image without features scores 0 against everything.
``BowLoopDetector`` is a ``detection.Detector`` like ``LoopDetector``, so the evaluation runs it exactly like the
learned methods; ``Candidate.distance`` is the L1 distance in [0, 2].
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import cv2
import faiss
import numpy as np

from tscm_ros.detect.detection import Detection, Match, MatchingConfig
from tscm_ros.errors import ConfigError
from tscm_ros.map.keyframe_map import Candidate

DESCRIPTOR_BYTES = 32  # ORB: 256 bits
MAX_TRAINING_DESCRIPTORS = 200_000


MIN_SIDE_PX = 240  # smaller images are enlarged first: ORB needs 31-pixel patches away from the border


def orb_descriptors(image: np.ndarray, max_features: int = 500) -> np.ndarray:
    """ORB descriptors (n, 32) uint8 of an HxWx3 uint8 RGB image (n may be 0); an image whose short side is
    under ``MIN_SIDE_PX`` (a thumbnail) is enlarged to it first."""
    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    scale = MIN_SIDE_PX / min(grey.shape)
    if scale > 1:
        grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    orb = cv2.ORB_create(nfeatures=max_features)
    _, descriptors = orb.detectAndCompute(grey, None)
    if descriptors is None:
        return np.zeros((0, DESCRIPTOR_BYTES), dtype=np.uint8)
    return descriptors


class OrbVocabulary:
    """Binary visual words with their idf weights; turns an image's ORB descriptors into a BoW vector."""

    def __init__(self, words: np.ndarray, idf: np.ndarray) -> None:
        words = np.ascontiguousarray(words, dtype=np.uint8)
        idf = np.asarray(idf, dtype=np.float32)
        if words.ndim != 2 or words.shape[1] != DESCRIPTOR_BYTES or len(words) == 0 or idf.shape != (len(words),):
            raise ConfigError(f"a vocabulary needs (K, {DESCRIPTOR_BYTES}) uint8 words and K idf weights; "
                              f"got words {words.shape} and idf {idf.shape}")
        self.words = words
        self.idf = idf
        self._index = faiss.IndexBinaryFlat(8 * DESCRIPTOR_BYTES)
        self._index.add(words)
        digest = hashlib.sha256(words.tobytes() + idf.tobytes()).hexdigest()[:16]
        self.fingerprint = f"orb-bow-{digest}"

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def train(cls, descriptor_sets: Sequence[np.ndarray], num_words: int = 1000, seed: int = 0) -> OrbVocabulary:
        """Learn up to ``num_words`` words and their idf from the ORB descriptors of N training images."""
        from sklearn.cluster import MiniBatchKMeans

        if num_words < 2:
            raise ConfigError(f"the ORB vocabulary needs at least 2 words, got {num_words}")
        non_empty = [d for d in descriptor_sets if len(d)]
        if not non_empty:
            raise ConfigError("cannot train an ORB vocabulary: the training images have no ORB features")
        all_descriptors = np.concatenate(non_empty)
        rng = np.random.default_rng(seed)
        if len(all_descriptors) > MAX_TRAINING_DESCRIPTORS:
            all_descriptors = all_descriptors[rng.choice(len(all_descriptors), MAX_TRAINING_DESCRIPTORS, replace=False)]
        bits = np.unpackbits(all_descriptors, axis=1).astype(np.float32)
        clusters = min(num_words, len(np.unique(all_descriptors, axis=0)))
        # Random initial centres: k-means++ seeding alone takes minutes for 1000 words on 2 CPU cores.
        kmeans = MiniBatchKMeans(n_clusters=clusters, init="random", n_init=1, max_iter=10, batch_size=4096,
                                 random_state=seed)
        kmeans.fit(bits)
        words = np.unique(np.packbits(kmeans.cluster_centers_ >= 0.5, axis=1), axis=0)
        vocabulary = cls(words, np.zeros(len(words), dtype=np.float32))
        images_with_word = np.zeros(len(words), dtype=np.int64)
        for descriptors in descriptor_sets:
            images_with_word[np.unique(vocabulary.assign(descriptors))] += 1
        idf = np.zeros(len(words), dtype=np.float32)
        seen = images_with_word > 0
        idf[seen] = np.log(len(descriptor_sets) / images_with_word[seen])
        return cls(words, idf)

    def assign(self, descriptors: np.ndarray) -> np.ndarray:
        """Index of the nearest word (Hamming distance) of each (n, 32) uint8 descriptor."""
        if len(descriptors) == 0:
            return np.zeros(0, dtype=np.int64)
        _, nearest = self._index.search(np.ascontiguousarray(descriptors, dtype=np.uint8), 1)
        return nearest[:, 0]

    def bow_vector(self, descriptors: np.ndarray) -> np.ndarray:
        """The L1-normalised tf-idf vector (K,) float32 of one image's ORB descriptors (zeros if none)."""
        vector = np.zeros(len(self.words), dtype=np.float32)
        if len(descriptors) == 0:
            return vector
        counts = np.bincount(self.assign(descriptors), minlength=len(self.words)).astype(np.float32)
        vector = counts / len(descriptors) * self.idf
        total = float(vector.sum())
        return vector / total if total > 0 else vector


def l1_scores(query: np.ndarray, keyframes: np.ndarray) -> np.ndarray:
    """DBoW2's L1 score of one L1-normalised BoW vector (K,) against each row of (N, K)."""
    words = np.flatnonzero(query)
    return np.minimum(keyframes[:, words], query[words]).sum(axis=1)


class BowLoopDetector:
    """A map of keyframe BoW vectors queried with DBoW2's L1 score; a ``detection.Detector`` like ``LoopDetector``.

    Honours ``MatchingConfig``'s ``k``, ``min_score`` and ``exclude_recent_s``; spatial exclusion
    (``exclude_within_m``) is not supported by this baseline.
    """

    def __init__(self, vocabulary: OrbVocabulary, matching: MatchingConfig, max_features: int = 500) -> None:
        if matching.exclude_within_m > 0:
            raise ConfigError("the ORB bag-of-words baseline does not support exclude_within_m")
        self.vocabulary = vocabulary
        self.matching = matching
        self.max_features = max_features
        self.model_name = f"orb_bow_{len(vocabulary)}w"
        self.fingerprint = vocabulary.fingerprint
        self.dim = len(vocabulary)
        self._vectors: list[np.ndarray] = []
        self._matrix = np.zeros((0, self.dim), dtype=np.float32)
        self._stamps: list[int] = []
        self._poses: list = []

    def __len__(self) -> int:
        return len(self._vectors)

    @property
    def calibrated(self) -> bool:
        """Its scores are DBoW2's L1 scores, never calibrated."""
        return False

    @property
    def keyframe_positions(self) -> np.ndarray:
        """(N, 3) keyframe positions, NaN where a keyframe has no pose (as ``KeyframeMap.positions``)."""
        rows = [p.position if p is not None else np.full(3, np.nan) for p in self._poses]
        return np.asarray(rows, dtype=np.float64).reshape(-1, 3)

    def add_keyframe(self, descriptors: np.ndarray, stamp_ns: int, pose=None) -> int:
        """Add a keyframe from its ORB descriptors; returns its id (consecutive from 0)."""
        self._vectors.append(self.vocabulary.bow_vector(descriptors))
        self._stamps.append(int(stamp_ns))
        self._poses.append(pose)
        return len(self._vectors) - 1

    def _keyframe_matrix(self) -> np.ndarray:
        if len(self._matrix) != len(self._vectors):
            self._matrix = np.stack(self._vectors)
        return self._matrix

    def process(self, image: np.ndarray, stamp_ns: int, pose=None) -> Detection:
        """Candidates for one HxWx3 uint8 RGB image, best first (no keyframe is added)."""
        vector = self.vocabulary.bow_vector(orb_descriptors(image, self.max_features))
        if not self._vectors:
            return Detection(descriptor=vector, fingerprint=self.fingerprint, candidates=[], accepted=[])
        scores = l1_scores(vector, self._keyframe_matrix())
        keep = scores >= self.matching.min_score
        if self.matching.exclude_recent_s > 0:
            gap_ns = np.abs(np.asarray(self._stamps, dtype=np.int64) - int(stamp_ns))
            keep &= gap_ns >= self.matching.exclude_recent_s * 1e9
        # Best first; equal scores in keyframe order.
        order = np.lexsort((np.arange(len(scores)), -scores))
        chosen = [i for i in order if keep[i]][: self.matching.k]
        candidates = [Match(Candidate(keyframe_id=int(i), stamp_ns=self._stamps[i], pose=self._poses[i],
                                      distance=float(2.0 * (1.0 - scores[i])), score=float(scores[i])),
                            score=float(scores[i]))
                      for i in chosen]
        return Detection(descriptor=vector, fingerprint=self.fingerprint, candidates=candidates, accepted=candidates)

