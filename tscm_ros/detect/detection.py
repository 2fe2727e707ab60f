"""What a loop detector gives for one image, shared by the learned detector (tscm_ros/detect/loop_detector.py) and
the ORB bag-of-words baseline (tscm_ros/detect/bow_baseline.py): how a query is matched (``MatchingConfig``), each
candidate as the detector judged it (``Match``, which wraps the map's ``Candidate``), what one image gave
(``Detection``), and the ``Detector`` protocol the evaluation runs every method through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from tscm_ros.errors import ConfigError

if TYPE_CHECKING:  # annotations only: this module stays light (numpy), for the reports that need its constants
    from tscm_ros.detect.verification import Verification
    from tscm_ros.io.geometry import Pose
    from tscm_ros.map.keyframe_map import Candidate

DEFAULT_MIN_SCORE = 0.99


@dataclass(frozen=True)
class MatchingConfig:
    """How a query is matched: at most ``k`` candidates scoring at least ``min_score``, ignoring
    keyframes within ``exclude_recent_s`` of the query stamp or ``exclude_within_m`` along the path."""

    k: int = 5
    min_score: float = DEFAULT_MIN_SCORE
    exclude_recent_s: float = 30.0
    exclude_within_m: float = 0.0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")
        if not 0.0 <= self.min_score <= 1.0:
            raise ConfigError(f"min_score must be in [0, 1], got {self.min_score}")
        if not (math.isfinite(self.exclude_recent_s) and math.isfinite(self.exclude_within_m)
                and self.exclude_recent_s >= 0 and self.exclude_within_m >= 0):
            raise ConfigError("exclude_recent_s and exclude_within_m must be finite and >= 0, got "
                              f"{self.exclude_recent_s} and {self.exclude_within_m}")


@dataclass(frozen=True)
class Match:
    """A map candidate as the detector judged it.

    ``candidate`` is what the map gave (the keyframe, the descriptor ``distance`` and the raw ``similarity``);
    ``score`` is what the detector publishes for it (the map's calibration of the candidate's margin,
    tscm_ros/map/calibration.py, or the raw similarity where there is none). The stages add the temporal
    ``sequence_score`` and ``consistent`` flag (tscm_ros/detect/temporal.py) and the geometric ``verification``
    (tscm_ros/detect/verification.py); NaN / False / None where that stage is off.
    """

    candidate: Candidate
    score: float
    sequence_score: float = math.nan
    consistent: bool = False
    verification: Verification | None = None

    @property
    def keyframe_id(self) -> int:
        return self.candidate.keyframe_id

    @property
    def stamp_ns(self) -> int:
        """The keyframe's stamp."""
        return self.candidate.stamp_ns

    @property
    def pose(self) -> Pose | None:
        """The keyframe's pose (None when the map has none)."""
        return self.candidate.pose

    @property
    def distance(self) -> float:
        """The descriptor distance the map measured."""
        return self.candidate.distance

    @property
    def similarity(self) -> float:
        """The raw similarity the map gave (its ``Candidate.score``)."""
        return self.candidate.score


@dataclass
class Detection:
    """What one processed image gave: its descriptor and the ``fingerprint`` of the model that computed it, the
    candidates (best first), which of them passed every stage that is on (``accepted``: the loops to publish),
    and its keyframe id if added."""

    descriptor: np.ndarray
    fingerprint: str
    candidates: list[Match]
    accepted: list[Match]
    added_keyframe_id: int | None = None


class Detector(Protocol):
    """What the evaluation runs every method through (``LoopDetector``, ``BowLoopDetector``): ``process`` one
    image after another, and the description of the method and of the keyframes it matches against."""

    @property
    def model_name(self) -> str: ...

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the descriptors it matches (the model's, or the map's with its own vocabulary)."""
        ...

    @property
    def dim(self) -> int: ...

    @property
    def calibrated(self) -> bool:
        """Whether its scores are calibrated (by the map or by the model's checkpoint), not raw similarity."""
        ...

    @property
    def keyframe_positions(self) -> np.ndarray:
        """(N, 3) float64 positions of the keyframes it matches against, by id; NaN rows where there is no pose."""
        ...

    def process(self, image: np.ndarray, stamp_ns: int, pose: Pose | None = None) -> Detection:
        """Candidates for one HxWx3 uint8 RGB image taken at ``stamp_ns``."""
        ...
