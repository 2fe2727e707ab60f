"""Training settings (config/train_*.yaml plus ``--set key=value``), the model they name, and the
mining radii left at 'auto', chosen from the training frames."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tscm_ros.describe.checkpoint import load_model_config
from tscm_ros.describe.preprocess import PreprocessConfig
from tscm_ros.errors import ConfigError
from tscm_ros.io.dataset import Dataset
from tscm_ros.train.augment import AugmentConfig
from tscm_ros.train.mining import AUTO, MiningConfig

KINDS = ("teacher", "student")
RADII = ("positive_radius_m", "negative_radius_m", "eval_radius_m")
MINING_KEYS = tuple(f.name for f in dataclasses.fields(MiningConfig))


def _auto_mining() -> MiningConfig:
    return MiningConfig(positive_radius_m=AUTO, negative_radius_m=AUTO)


@dataclass
class TrainConfig:
    """Training settings (config/train_*.yaml).

    ``model`` names the network: a model config preset ('tiny', 'student_offline', ...) or file, or, as
    written to a run's config.yaml, the model config itself (a mapping with ``kind`` and ``preprocess``).
    The mining settings are flat keys in the files and a :class:`MiningConfig` here.
    """

    model: Any
    epochs: int = 30
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.0
    margin: float = 0.1
    hard_weight: float = 1.0
    soft_weight: float = 1.0
    cross_metric_weight: float = 1.0
    init_heads: bool = True
    patience: int = 5
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    mining: MiningConfig = field(default_factory=_auto_mining)
    triplets_per_epoch: int | None = None
    eval_radius_m: float | str = AUTO
    cache_batch_size: int = 32
    augment_views: int = 6
    augment: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "lr", "cache_batch_size", "augment_views")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"training setting {name} must be > 0, got {getattr(self, name)}")
        value = self.eval_radius_m
        if value != AUTO and (isinstance(value, (str, bool)) or not value > 0):
            raise ConfigError(f"training setting eval_radius_m must be > 0 (metres) or 'auto', got {value!r}")
        self.augmentation()  # validates the augment section
        if min(self.patience, self.weight_decay, self.margin, self.hard_weight, self.soft_weight,
               self.cross_metric_weight) < 0:
            raise ConfigError(
                "training settings patience, weight_decay, margin and the loss weights must be >= 0"
            )
        if self.triplets_per_epoch is not None and self.triplets_per_epoch < 1:
            raise ConfigError(f"triplets_per_epoch must be >= 1 or null, got {self.triplets_per_epoch}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    def has_auto_radii(self) -> bool:
        return self.mining.has_auto_radii() or self.eval_radius_m == AUTO

    def augmentation(self) -> AugmentConfig:
        """The augmentation part of the settings."""
        return AugmentConfig.from_dict(self.augment, "training setting augment")

    def to_dict(self) -> dict:
        """Plain dict with flat keys, as written to the run's config.yaml."""
        flat = {}
        for name, value in dataclasses.asdict(self).items():
            if name == "mining":
                flat.update(value)
            else:
                flat[name] = value
        return flat

    @classmethod
    def from_dict(cls, values: dict, source: str) -> TrainConfig:
        """Build from a dict with flat keys, checking names and types; ``source`` names the file in errors."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.name != "mining"}
        defaults.update((f.name, f.default) for f in dataclasses.fields(MiningConfig))
        unknown = sorted(set(values) - set(defaults))
        if unknown:
            raise ConfigError(f"{source}: unknown training setting(s) {unknown}; known: {sorted(defaults)}")
        if "model" not in values:
            raise ConfigError(f"{source}: the training setting 'model' (model config file) is missing")
        checked = {}
        for name, value in values.items():
            default = defaults[name]
            if isinstance(value, str) and type(default) is float:
                try:  # YAML reads 1e-4 (no dot) as text
                    value = float(value)
                except ValueError:
                    pass
            if name in RADII and value == AUTO:
                checked[name] = value
                continue
            expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(type(default))
            if name == "heading_deg" or name == "triplets_per_epoch":
                expected = (int, float, type(None)) if name == "heading_deg" else (int, type(None))
            if name in RADII:
                expected = (int, float)
            if name == "augment":
                expected = (dict, bool, type(None))
            wrong_bool = isinstance(value, bool) and bool not in (expected or ())
            if expected and (not isinstance(value, expected) or wrong_bool):
                raise ConfigError(f"{source}: training setting {name}={value!r} has the wrong type")
            checked[name] = float(value) if expected == (int, float) else value
        if isinstance(checked.get("augment"), bool) or checked.get("augment", {}) is None:
            checked["augment"] = {"enabled": bool(checked["augment"])}
        mining = {name: checked.pop(name) for name in MINING_KEYS if name in checked}
        try:
            return cls(**checked, mining=dataclasses.replace(_auto_mining(), **mining))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc


def parse_overrides(overrides: Sequence[str]) -> dict:
    """``key=value`` strings (values parsed as YAML) to a dict."""
    parsed = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            parsed[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    return parsed


def _read_yaml(path: Path, what: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of settings")
    return data


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a training config file and apply ``key=value`` overrides."""
    path = Path(path)
    values = _read_yaml(path, "training config")
    values.update(parse_overrides(overrides))
    model = values.get("model")
    if model is not None and not isinstance(model, (str, dict)):
        raise ConfigError(f"{path}: 'model' must be a model config preset, file or mapping, got {model!r}")
    return TrainConfig.from_dict(values, str(path))


def resolve_model_config(config: TrainConfig, kind: str) -> tuple[dict, PreprocessConfig]:
    """The model config (with ``kind``) and preprocessing that ``config.model`` names, checked against ``kind``."""
    if isinstance(config.model, dict):
        model_config = dict(config.model)
        preprocess_config = PreprocessConfig.from_dict(model_config.pop("preprocess", None))
    else:
        model_config, preprocess_config = load_model_config(config.model, kind=kind)
    if model_config.get("kind") != kind:
        raise ConfigError(
            f"train {kind}: the model config describes a {model_config.get('kind')!r} model, not a {kind}"
        )
    if model_config.get("projection_dim"):
        raise ConfigError(f"train {kind}: set projection_dim to null for training (descriptors of the native size)")
    return model_config, preprocess_config


def default_config_path(kind: str) -> Path:
    """config/train_<kind>.yaml of a source checkout, else of the installed package share directory."""
    name = f"train_{kind}.yaml"
    candidates = [Path(__file__).resolve().parents[2] / "config" / name,
                  Path(sys.prefix) / "share" / "tscm_ros" / "config" / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"default training config {name} not found (looked in {', '.join(map(str, candidates))}); pass --config"
    )


def frame_spacing_m(dataset: Dataset) -> float:
    """Median horizontal distance between consecutive frames of each sequence (stamp order)."""
    steps = []
    for sequence in np.unique(dataset.sequences):
        rows = np.flatnonzero(dataset.sequences == sequence)
        xy = dataset.positions[rows[np.argsort(dataset.stamps_ns[rows], kind="stable")], :2]
        steps.append(np.linalg.norm(np.diff(xy, axis=0), axis=1))
    steps = np.concatenate(steps) if steps else np.zeros(0)
    steps = steps[steps > 1e-3]
    return float(np.median(steps)) if len(steps) else math.nan


def resolve_radii(config: TrainConfig, train_set: Dataset) -> tuple[TrainConfig, str]:
    """``config`` with its 'auto' radii chosen from the training frames, and a sentence saying why.

    Positives within 2.5 frame spacings (3 to 10 m: a robot's odometry is metre-accurate, and the
    Pittsburgh 10 m fits street-view spacing), negatives beyond 2.5 positive radii (at most the
    Pittsburgh 25 m), a retrieval correct within the positive radius.
    """
    if not config.has_auto_radii():
        return config, "mining radii as configured"
    spacing = frame_spacing_m(train_set)
    if math.isnan(spacing):
        spacing = 2.0
    chosen = {}
    positive = config.mining.positive_radius_m
    if positive == AUTO:
        positive = chosen["positive_radius_m"] = round(float(np.clip(2.5 * spacing, 3.0, 10.0)) * 2) / 2
    if config.mining.negative_radius_m == AUTO:
        chosen["negative_radius_m"] = float(min(25.0, max(2.5 * positive, positive)))
    if config.eval_radius_m == AUTO:
        chosen["eval_radius_m"] = float(positive)
    mining = {name: value for name, value in chosen.items() if name in MINING_KEYS}
    resolved = dataclasses.replace(config, mining=dataclasses.replace(config.mining, **mining),
                                   eval_radius_m=chosen.get("eval_radius_m", config.eval_radius_m))
    reason = (f"frames {spacing:.1f} m apart: " + ", ".join(f"{name} {value:g}" for name, value in chosen.items())
              + " (auto)")
    return resolved, reason
