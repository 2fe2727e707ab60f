"""Label-free distillation from a recording: a teacher (the default model) teaches a compact student its
metric space on the site's own frames, with no labels and no poses.

The student is a VLAD network on a smaller backbone at a smaller input (config/model_student_distilled.yaml):
its descriptor's cost is a fraction of the teacher's. What it learns is its vocabulary (the token projection
and the cluster centres of a soft-assignment VLAD, ``vlad.vocabulary: model``), which the checkpoint keeps and
maps use as it is. The backbone stays frozen, so its tokens are computed once per view of each frame.

Steps, each resumable from the run directory:

1. ``features/chunk_NNNNN.npz``: for each chunk of frames, the teacher's feature maps of each frame and the
   student's tokens of ``views`` views of it (view 0 as recorded, the others augmented as
   tscm_ros/train/augment.py does, seeded per frame and view), in float16.
2. The teacher describes every frame: a teacher with a vocabulary fits it on these frames first, as
   build_map does.
3. The student's vocabulary starts as k-means on its tokens of the recorded views (the augmented ones would
   steer the token projection towards the augmentations), then learns by cross-metric distillation (TSCM's
   idea: match distances, not only targets): for a batch of views of different frames, the student's cosine
   similarities between the views are to reproduce the teacher's between their frames, as distributions
   over the batch (listwise KL divergence at a temperature) and as values (squared difference). Two views of
   one frame have teacher similarity 1, which teaches invariance to the augmentations. ``last.pt`` after
   each epoch holds the vocabulary and the optimiser.
4. ``student.pt``: the student as a checkpoint, which build_map, the node, evaluate and export_model take.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from tscm_ros.atomic import atomic_file
from tscm_ros.describe.checkpoint import load_model_config, save_checkpoint, torch_load_problem
from tscm_ros.describe.describer import Describer, load_named_model
from tscm_ros.describe.models import build_model
from tscm_ros.describe.models.blocks import feature_map_to_tokens
from tscm_ros.describe.models.vlad import VladNet, Vocabulary
from tscm_ros.describe.preprocess import PreprocessConfig
from tscm_ros.errors import CheckpointError, ConfigError
from tscm_ros.progress import progress as progress_bar
from tscm_ros.train.augment import AugmentConfig, augment_image
from tscm_ros.train.config import _read_yaml, default_config_path, parse_overrides

LOG = logging.getLogger("train")
CHUNK_FRAMES = 256  # frames per feature file
STUDENT_FILE, LAST_FILE, METRICS_FILE, CONFIG_FILE = "student.pt", "last.pt", "metrics.csv", "config.yaml"
RECORDING_FILE = "recording.json"  # which recording (name, frames) a run learns from: --resume must give the same


@dataclass(frozen=True)
class DistillConfig:
    """Distillation settings (config/train_distill.yaml, ``--set key=value``)."""

    model: Any = "student_distilled"  # the student: a model config preset or file, or the config itself
    teacher: str = "default"  # a model name or checkpoint (load_named_model)
    views: int = 6  # views per frame: as recorded, and views - 1 augmented
    epochs: int = 15  # 0: the student keeps the k-means vocabulary of its tokens (no distillation)
    batch_size: int = 128  # views per step
    lr: float = 1.0e-3
    temperature: float = 0.05  # of the listwise term
    similarity_weight: float = 10.0  # of the squared-difference term
    max_frames: int = 4000  # a longer recording is thinned evenly to this many frames
    seed: int = 0
    device: str = "auto"
    augment: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("views", "epochs", "batch_size", "max_frames"):
            value, least = getattr(self, name), 0 if name == "epochs" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"distillation setting {name} must be an integer >= {least}, got {value!r}")
        if self.batch_size < 2:
            raise ConfigError("distillation setting batch_size must be >= 2 (it compares views with each other)")
        for name in ("lr", "temperature", "similarity_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                    value <= 0 if name != "similarity_weight" else value < 0):
                raise ConfigError(f"distillation setting {name} must be a finite number "
                                  f"{'>= 0' if name == 'similarity_weight' else '> 0'}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"distillation setting seed must be an integer >= 0, got {self.seed!r}")
        if self.device != "auto" and not (self.device == "cpu" or str(self.device).startswith("cuda")):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        self.augmentation()

    def augmentation(self) -> AugmentConfig:
        return AugmentConfig.from_dict(self.augment, "distillation setting augment")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str) -> DistillConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown distillation setting(s) {unknown}; known: {sorted(known)}")
        values = dict(values)
        for name in ("lr", "temperature", "similarity_weight"):
            if isinstance(values.get(name), str):
                try:  # YAML reads 1e-3 (no dot) as text
                    values[name] = float(values[name])
                except ValueError:
                    pass
        if isinstance(values.get("augment"), bool):
            values["augment"] = {"enabled": values["augment"]}
        try:
            return cls(**values)
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"{source}: {exc}") from exc


def load_distill_config(path: str | Path | None, overrides: Sequence[str] = ()) -> DistillConfig:
    """Settings from ``path`` (default config/train_distill.yaml) with ``key=value`` overrides."""
    path = Path(path) if path else default_config_path("distill")
    values = _read_yaml(path, "distillation config")
    values.update(parse_overrides(overrides))
    return DistillConfig.from_dict(values, str(path))


@dataclass
class DistillResult:
    """What a distillation produced: the checkpoint, its fingerprint, the frames it learnt from, the loss of
    the last epoch and the teacher's name."""

    checkpoint: Path
    fingerprint: str
    frames: int
    epochs: int
    final_loss: float
    teacher: str


def student_model_config(config: DistillConfig) -> tuple[dict, PreprocessConfig]:
    """The student's model config and preprocessing; ConfigError unless it is a VLAD model with its own
    vocabulary (``vlad.vocabulary: model``) and soft assignment (the distillation needs gradients)."""
    if isinstance(config.model, dict):
        model_config = dict(config.model)
        preprocess = PreprocessConfig.from_dict(model_config.pop("preprocess", None))
    else:
        model_config, preprocess = load_model_config(config.model, kind="vlad")
    vlad = model_config.get("vlad") or {}
    if model_config.get("kind") != "vlad" or vlad.get("vocabulary") != "model" or vlad.get("assignment") != "soft":
        raise ConfigError(f"the distilled student must be a VLAD model with vlad.vocabulary: model and "
                          f"vlad.assignment: soft, got {config.model!r}")
    return model_config, preprocess


def _thinned(count: int, limit: int) -> np.ndarray:
    """Indices of ``limit`` frames spread evenly over ``count`` (all of them when there are fewer)."""
    if count <= limit:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).round().astype(int))


def _chunks(frames: Iterable[np.ndarray], keep: np.ndarray) -> Iterator[tuple[int, list[int], list[np.ndarray]]]:
    """(chunk number, frame numbers, images) of the kept frames, CHUNK_FRAMES at a time."""
    wanted = set(keep.tolist())
    numbers: list[int] = []
    images: list[np.ndarray] = []
    chunk = 0
    for number, image in enumerate(frames):
        if number not in wanted:
            continue
        numbers.append(number)
        images.append(image)
        if len(images) == CHUNK_FRAMES:
            yield chunk, numbers, images
            chunk, numbers, images = chunk + 1, [], []
    if images:
        yield chunk, numbers, images


def _describer(model: str, device: torch.device) -> Describer:
    named = load_named_model(model)
    return Describer(named.network, named.preprocess, named.fingerprint, named.name, device, 32, "auto",
                     named.vocabulary, named.calibration)


def _placeholder_vocabulary(network: VladNet) -> Vocabulary:
    shapes = network.vocabulary_shapes()
    arrays = {"centres": np.eye(*shapes["centres"], dtype=np.float32)}
    if "token_basis" in shapes:
        arrays |= {"token_mean": np.zeros(shapes["token_mean"], np.float32),
                   "token_basis": np.eye(*shapes["token_basis"], dtype=np.float32)}
    return Vocabulary(**arrays, images=0, source="distilled")


def _feature_file(out: Path, chunk: int) -> Path:
    return out / "features" / f"chunk_{chunk:05d}.npz"


FEATURES_DONE = "features/complete.json"  # the chunks there are, once every frame was read
TEACHER_KEYS = ("teacher_maps", "teacher_descriptors")  # a teacher's feature maps (it fits a vocabulary), or not


def _write_features(path: Path, numbers: list[int], teacher: tuple[str, np.ndarray],
                    student_tokens: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as temp, open(temp, "wb") as stream:
        np.savez(stream, frames=np.asarray(numbers), student_tokens=student_tokens, **{teacher[0]: teacher[1]})


def _read_features(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            teacher = [key for key in TEACHER_KEYS if key in data.files]
            return {name: data[name] for name in ("frames", "student_tokens", *teacher[:1])} | {"teacher": teacher[0]}
    except (OSError, KeyError, ValueError, IndexError) as exc:
        raise ConfigError(f"{path} is damaged ({exc}); delete it and run again with --resume") from exc


def compute_features(frames: Callable[[], Iterable[np.ndarray]], count: int, out: Path, config: DistillConfig,
                     teacher: Describer, student: Describer, show_progress: bool) -> list[Path]:
    """Step 1 of the module doc: the feature files of the kept frames, computing only the missing ones.
    Frames the recording counts but cannot decode are not there; the chunks read are recorded once all are."""
    done = out / FEATURES_DONE
    if done.is_file():
        return [_feature_file(out, c) for c in range(json.loads(done.read_text(encoding="utf-8"))["chunks"])]
    keep = _thinned(count, config.max_frames)
    augment = config.augmentation()
    chunks = 0
    bar = progress_bar(total=len(keep), desc="distil: teacher and student features", unit="frame",
                       enabled=show_progress)
    with bar:
        for chunk, numbers, images in _chunks(frames(), keep):
            chunks = chunk + 1
            path = _feature_file(out, chunk)
            if not path.is_file():
                if teacher.adapts_to_map:
                    taught = ("teacher_maps", np.stack([maps[0] for maps in teacher.describe_with_maps(images)[1]]))
                else:
                    taught = ("teacher_descriptors", teacher.describe(images))
                views = []
                for view in range(config.views):
                    if view == 0:
                        shown = images
                    else:
                        shown = [augment_image(image, np.random.default_rng((config.seed, number, view)), augment)
                                 for number, image in zip(numbers, images)]
                    views.append(np.stack([maps[0] for maps in student.describe_with_maps(shown)[1]]))
                tokens = feature_map_to_tokens(torch.from_numpy(np.stack(views, axis=1).reshape(
                    -1, *views[0].shape[1:]))).numpy().reshape(len(images), config.views, -1, views[0].shape[1])
                _write_features(path, numbers, (taught[0], taught[1].astype(np.float16)), tokens.astype(np.float16))
            bar.update(len(images))
    if chunks == 0:
        raise ConfigError("the recording gave no frame that could be decoded")
    with atomic_file(done) as temp:
        temp.write_text(json.dumps({"chunks": chunks}), encoding="utf-8")
    return [_feature_file(out, c) for c in range(chunks)]


def _listwise_loss(student: torch.Tensor, target: torch.Tensor, config: DistillConfig) -> torch.Tensor:
    """Cross-metric loss of student descriptors (B, D) against the teacher's similarities (B, B)."""
    similarity = student @ student.T
    off_diagonal = ~torch.eye(len(student), dtype=torch.bool, device=student.device)
    student_log = torch.log_softmax((similarity / config.temperature).masked_fill(~off_diagonal, -1e9), dim=1)
    teacher_p = torch.softmax((target / config.temperature).masked_fill(~off_diagonal, -1e9), dim=1)
    listwise = (teacher_p * (torch.log(teacher_p + 1e-12) - student_log)).sum(dim=1).mean()
    values = ((similarity - target)[off_diagonal] ** 2).mean()
    return listwise + config.similarity_weight * values


def _save_state(path: Path, epoch: int, params: Sequence[torch.Tensor], optimiser: torch.optim.Optimizer,
                losses: list[float]) -> None:
    with atomic_file(path) as temp:
        torch.save({"epoch": epoch, "params": [p.detach().cpu() for p in params],
                    "optimiser": optimiser.state_dict(), "losses": losses}, temp)


def _load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise CheckpointError(f"cannot resume from {path}: {torch_load_problem(exc)}; delete it to restart "
                              "the training (the features are kept)") from exc


def distil(frames: Callable[[], Iterable[np.ndarray]], count: int, out: str | Path, config: DistillConfig,
           recording: str, resume: bool = False, show_progress: bool = True) -> DistillResult:
    """Distil a student from ``config.teacher`` on the RGB images ``frames()`` yields (``count`` of them, the
    recording called ``recording``), into the run directory ``out`` (see the module doc).

    ``frames`` is called again on resume and must give the same images in the same order. ``resume``
    continues a run that stopped; without it ``out`` must be new or empty.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise ConfigError(f"run directory {out} is not empty: give a new --out, or --resume to continue it")
    if count < 2:
        raise ConfigError(f"{recording}: distillation needs at least 2 frames, got {count}")
    from tscm_ros.describe.describer import resolve_device

    device = resolve_device(config.device)
    model_config, preprocess = student_model_config(config)  # bad settings fail before the run directory exists
    network = build_model(model_config)
    teacher = _describer(config.teacher, device)
    config_path, recording_path = out / CONFIG_FILE, out / RECORDING_FILE
    source = {"recording": recording, "frames": count}
    if resume and config_path.is_file():
        saved = load_distill_config(config_path)
        if dataclasses.replace(saved, epochs=config.epochs) != config:
            raise ConfigError(f"{out} was started with other settings ({config_path}); resume with the same ones "
                              "(only epochs may change)")
        if recording_path.is_file() and json.loads(recording_path.read_text(encoding="utf-8")) != source:
            raise ConfigError(f"{out} was started on another recording ({recording_path}: "
                              f"{recording_path.read_text(encoding='utf-8').strip()}), not {source}")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(config_path) as temp:
        temp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    with atomic_file(recording_path) as temp:
        temp.write_text(json.dumps(source), encoding="utf-8")
    student = Describer(network, preprocess, "untrained", "student", device, 32, "auto",
                        _placeholder_vocabulary(network))
    files = compute_features(frames, count, out, config, teacher, student, show_progress)
    features = [_read_features(path) for path in files]
    if teacher.adapts_to_map:
        teacher_maps = [m for f in features for m in f["teacher_maps"].astype(np.float32)]
        teacher = teacher.with_vocabulary(teacher.fit_vocabulary(teacher_maps))
        targets = torch.from_numpy(teacher.aggregate([(m,) for m in teacher_maps])).to(device)
        del teacher_maps
    else:
        targets = torch.nn.functional.normalize(torch.from_numpy(np.concatenate(
            [f["teacher_descriptors"] for f in features]).astype(np.float32)), dim=1).to(device)
    tokens = torch.from_numpy(np.concatenate([f["student_tokens"] for f in features]))  # (N, V, T, C) float16
    frame_count, views = tokens.shape[:2]
    tokens = tokens.reshape(frame_count * views, *tokens.shape[2:])
    LOG.info("distil: %d frames of %s, %d views each; teacher %s (%s)", frame_count, recording, views,
             teacher.model_name, teacher.vocabulary.describe() if teacher.vocabulary is not None else "no vocabulary")

    vlad = network.vlad.to(device)
    recorded = tokens.reshape(frame_count, views, *tokens.shape[1:])[:, 0]  # augmented views would steer the PCA
    initial = vlad.fit(recorded.reshape(-1, tokens.shape[-1]).float(), frame_count, source="distilled")
    params = [torch.nn.Parameter(t.clone().to(device)) for t in initial.tensors()]
    optimiser = torch.optim.Adam(params, lr=config.lr)
    losses: list[float] = []
    start = 0
    state_path = out / LAST_FILE
    if resume and state_path.is_file():
        state = _load_state(state_path)
        with torch.no_grad():
            for param, saved in zip(params, state["params"]):
                param.copy_(saved)
        optimiser.load_state_dict(state["optimiser"])
        start, losses = int(state["epoch"]), list(state["losses"])
        if start > config.epochs:
            raise ConfigError(f"{out} has trained {start} epochs already; resume with epochs >= {start}")
        LOG.info("distil: resuming after epoch %d of %d", start, config.epochs)
    owner = torch.arange(frame_count).repeat_interleave(views)
    batch = min(config.batch_size, len(tokens))
    teacher_similarity = targets @ targets.T
    for epoch in range(start, config.epochs):
        order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
        total, steps = 0.0, 0
        for first in range(0, len(order) - batch + 1, batch):
            chosen = order[first : first + batch]
            described = vlad(tokens[chosen].to(device).float(), *params)
            frames_of = owner[chosen].to(device)
            loss = _listwise_loss(described, teacher_similarity[frames_of][:, frames_of], config)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total, steps = total + loss.item(), steps + 1
        losses.append(total / max(steps, 1))
        _save_state(state_path, epoch + 1, params, optimiser, losses)
        LOG.info("distil: epoch %d/%d, loss %.4f", epoch + 1, config.epochs, losses[-1])
    _write_metrics(out / METRICS_FILE, losses)

    distilled = Vocabulary(*(p.detach().cpu().numpy() for p in params[:1]), images=frame_count, source="distilled",
                           **({"token_mean": params[1].detach().cpu().numpy(),
                               "token_basis": params[2].detach().cpu().numpy()} if len(params) == 3 else {}))
    network.set_vocabulary(distilled)
    model_config = {**model_config, "name": f"{model_config.get('name', 'student')} ({recording})"}
    extra = {"vocabulary_images": frame_count, "distilled_from": {
        "teacher": teacher.model_name, "teacher_fingerprint": teacher.fingerprint, "recording": recording,
        "frames": frame_count, "views": views, "epochs": config.epochs}}
    checkpoint = out / STUDENT_FILE
    fingerprint = save_checkpoint(checkpoint, network.cpu(), model_config, preprocess, extra)
    return DistillResult(checkpoint, fingerprint, frame_count, len(losses), losses[-1] if losses else float("nan"),
                         teacher.model_name)


def _write_metrics(path: Path, losses: list[float]) -> None:
    with atomic_file(path) as temp, open(temp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["epoch", "loss"])
        writer.writerows((epoch, f"{loss:.6f}") for epoch, loss in enumerate(losses, start=1))
