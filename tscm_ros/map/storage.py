"""A keyframe map on disk: writing its directory atomically, and reading it back with every file checked.

A map is a directory written atomically (tscm_ros/atomic.py: a temp dir, then an existing map is exchanged with
it in one step, then deleted): ``manifest.json`` (``format_version``, model fingerprint and name,
``dim``, ``preprocess``, ``index`` type, parameters and FAISS factory string, ``count``, ``created``,
``tscm_ros_version``, size and SHA-256 of every file), ``index.faiss`` (FAISS's own format),
``keyframes.npz`` (stamps, positions, orientations with NaN for unknown poses, source bags), when any
keyframe has one, ``thumbnails.npz``, and when keyframes have them, ``local_features.npz``: the local
features geometric verification needs (tscm_ros/describe/local_features.py; per keyframe at most 500 ORB features
of 36 bytes: 18 kB), and for a model that describes with a VLAD vocabulary (tscm_ros/describe/models/vlad.py),
``vocabulary.npz``: the cluster centres the map fitted on its own images (or the generic ones it fell back
to), which the describer must use for queries; ``calibration.npz``: the null margins of its score
calibration (tscm_ros/map/calibration.py), for a map of at least 20 keyframes. The manifest records
``model_fingerprint`` (the model with that vocabulary: what the descriptors in the index were computed
with), ``base_model_fingerprint`` (the model as loaded by name or checkpoint, which a node must load), the
vocabulary's size, source and fingerprint, and the calibration's size. Nothing is pickled. ``read_map``
checks all of it. Maps of an older format_version (before maps carried their own vocabulary) are refused
with a message to rebuild them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np

from tscm_ros import __version__
from tscm_ros.atomic import atomic_directory
from tscm_ros.describe.local_features import LocalFeatures
from tscm_ros.describe.models.vlad import Vocabulary
from tscm_ros.errors import ConfigError, MapError
from tscm_ros.map.calibration import MapCalibration
from tscm_ros.map.index import INDEX_TYPES, DescriptorIndex, IndexConfig, sub_indexes

FORMAT_VERSION = 3  # 2: local features for geometric verification; 3: the map's own vocabulary
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
KEYFRAMES_FILE = "keyframes.npz"
THUMBNAILS_FILE = "thumbnails.npz"
LOCAL_FEATURES_FILE = "local_features.npz"
VOCABULARY_FILE = "vocabulary.npz"
CALIBRATION_FILE = "calibration.npz"
VOCABULARY_SAMPLES_FILE = "vocabulary_samples.npz"
MAP_FILES = (INDEX_FILE, KEYFRAMES_FILE, THUMBNAILS_FILE, LOCAL_FEATURES_FILE, VOCABULARY_FILE, CALIBRATION_FILE,
             VOCABULARY_SAMPLES_FILE)


@dataclass
class KeyframeTable:
    """The keyframes' metadata by keyframe id, as columns: the form a map saves it in."""

    stamp_ns: np.ndarray  # (N,) int64
    position: np.ndarray  # (N, 3) float64, NaN rows for keyframes without a pose
    orientation: np.ndarray  # (N, 4) float64, NaN rows likewise
    bag_index: np.ndarray  # (N,) int32 into bag_names
    bag_names: list[str]
    thumbnails: dict[int, np.ndarray]
    local_features: dict[int, LocalFeatures]


@dataclass
class MapContents:
    """Everything a map directory holds."""

    dim: int
    model_fingerprint: str
    model_name: str
    frame_id: str
    preprocess: dict
    index: DescriptorIndex
    keyframes: KeyframeTable
    base_fingerprint: str
    vocabulary: Vocabulary | None
    calibration: MapCalibration | None = None
    # Per keyframe, the feature maps (float16) its own vocabulary will be fitted on, while the map still has the
    # generic one (tscm_ros/map/building.py); None once fitted or for models without a vocabulary.
    vocabulary_samples: list[tuple[np.ndarray, ...]] | None = None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----- writing -------------------------------------------------------------------------------------------


def check_replaceable(directory: str | os.PathLike) -> None:
    """MapError unless a map may be written to ``directory``: it does not exist, is empty, or holds a map."""
    target = Path(directory)
    if target.exists() and not (target.is_dir()
                                and ((target / MANIFEST_FILE).is_file() or not any(target.iterdir()))):
        raise MapError(f"cannot save the map to {target}: it exists and is not a keyframe map; "
                       "refusing to replace it")


def write_map(contents: MapContents, directory: str | os.PathLike) -> None:
    """Write a map to ``directory`` atomically, replacing a map already there only once complete."""
    target = Path(directory)
    check_replaceable(target)
    with atomic_directory(target) as staging:
        _write_files(contents, staging)


def _write_files(contents: MapContents, directory: Path) -> None:
    try:
        faiss.write_index(contents.index.faiss_index, str(directory / INDEX_FILE))
    except RuntimeError as exc:
        raise MapError(f"cannot write {directory / INDEX_FILE}: {exc}") from exc
    keyframes = contents.keyframes
    np.savez(directory / KEYFRAMES_FILE, stamp_ns=keyframes.stamp_ns, position=keyframes.position,
             orientation=keyframes.orientation, bag_index=keyframes.bag_index,
             bag_names=np.array(keyframes.bag_names, dtype=np.str_))
    files = [INDEX_FILE, KEYFRAMES_FILE]
    if keyframes.thumbnails:
        np.savez(directory / THUMBNAILS_FILE,
                 **{f"k{i}": image for i, image in sorted(keyframes.thumbnails.items())})
        files.append(THUMBNAILS_FILE)
    if keyframes.local_features:
        ids = np.array(sorted(keyframes.local_features), dtype=np.int64)
        features = [keyframes.local_features[i] for i in ids]
        np.savez(directory / LOCAL_FEATURES_FILE, keyframe_ids=ids,
                 counts=np.array([len(f) for f in features], dtype=np.int32),
                 keypoints=np.concatenate([f.packed_keypoints() for f in features]),
                 descriptors=np.concatenate([f.descriptors for f in features]))
        files.append(LOCAL_FEATURES_FILE)
    vocabulary = contents.vocabulary
    if vocabulary is not None:
        np.savez(directory / VOCABULARY_FILE, **vocabulary.arrays())
        files.append(VOCABULARY_FILE)
    calibration = contents.calibration
    if calibration is not None:
        np.savez(directory / CALIBRATION_FILE, null_margins=calibration.null)
        files.append(CALIBRATION_FILE)
    samples = contents.vocabulary_samples
    if samples:
        np.savez(directory / VOCABULARY_SAMPLES_FILE,
                 **{f"part{j}": np.stack([sample[j] for sample in samples]) for j in range(len(samples[0]))})
        files.append(VOCABULARY_SAMPLES_FILE)
    settings = contents.index.config.to_dict()
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_fingerprint": contents.model_fingerprint,
        "base_model_fingerprint": contents.base_fingerprint,
        "model_name": contents.model_name,
        "vocabulary": None if vocabulary is None else {
            "shapes": {name: list(shape) for name, shape in vocabulary.shapes.items()}, "images": vocabulary.images,
            "source": vocabulary.source, "fingerprint": vocabulary.fingerprint()},
        "calibration": None if calibration is None else {"keyframes": calibration.keyframes,
                                                         "samples": len(calibration.null)},
        "vocabulary_samples": {"keyframes": len(samples), "parts": len(samples[0])} if samples else None,
        "frame_id": contents.frame_id,
        "dim": contents.dim,
        "preprocess": contents.preprocess,
        "index": {"type": settings.pop("type"), "factory": contents.index.factory,
                  "trained": contents.index.is_trained, **settings},
        "count": len(contents.index),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tscm_ros_version": __version__,
        "files": {name: {"bytes": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
                  for name in files},
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


# ----- reading -------------------------------------------------------------------------------------------


def read_map(directory: str | os.PathLike, expected_fingerprint: str | None = None, *,
             expected_model_name: str | None = None) -> MapContents:
    """Read a map written by ``write_map``, checking every file; MapError if anything is wrong.

    With ``expected_fingerprint`` (the loaded model's own, before any vocabulary of the map replaces its), a
    map built with another model is refused with a message naming the model it needs (``expected_model_name``
    names the loaded one in that message).
    """
    root = Path(directory)
    if not root.is_dir():
        name = glob.escape(root.name)
        leftovers = sorted(root.parent.glob(f".{name}.tmp-*/{name}*/{MANIFEST_FILE}"))
        hint = f"; an interrupted save left a map at {leftovers[0].parent}" if leftovers else ""
        raise MapError(f"map {root} does not exist or is not a directory{hint}")
    manifest = _read_manifest(root)
    if expected_fingerprint is not None and expected_fingerprint != manifest["base_model_fingerprint"]:
        _refuse_other_model(root, manifest, expected_fingerprint, expected_model_name)
    for name, expected in manifest["files"].items():
        path = root / name
        if not path.is_file():
            raise MapError(f"map {root} is incomplete: {name} is missing")
        if path.stat().st_size != expected.get("bytes") or _sha256(path) != expected.get("sha256"):
            raise MapError(f"{path} is corrupt: its size or SHA-256 does not match {root / MANIFEST_FILE}")

    try:
        config = IndexConfig.from_dict(manifest["index"]).for_dim(manifest["dim"])
    except (ConfigError, TypeError) as exc:
        raise MapError(f"{root / MANIFEST_FILE} has invalid index settings: {exc}") from exc
    trained = manifest["index"]["trained"]
    factory = manifest["index"]["factory"] if trained else "Flat"
    index = DescriptorIndex(config, _read_index(root, manifest, factory), trained)
    if index.factory != factory:
        raise MapError(f"{root / MANIFEST_FILE}: index factory {factory!r} does not match its index settings "
                       f"({index.factory!r})")
    return MapContents(dim=manifest["dim"], model_fingerprint=manifest["model_fingerprint"],
                       model_name=manifest["model_name"], frame_id=str(manifest.get("frame_id", "")),
                       preprocess=manifest["preprocess"], index=index,
                       keyframes=_read_keyframes(root, manifest["count"]),
                       base_fingerprint=manifest["base_model_fingerprint"], vocabulary=_read_vocabulary(root, manifest),
                       calibration=_read_calibration(root, manifest),
                       vocabulary_samples=_read_vocabulary_samples(root, manifest))


def _refuse_other_model(root: Path, manifest: dict, expected_fingerprint: str,
                        expected_model_name: str | None) -> None:
    built_with = manifest["model_name"] or "(unnamed)"
    loaded = f"{expected_model_name} " if expected_model_name else ""
    if expected_model_name and expected_model_name == manifest["model_name"]:
        raise MapError(
            f"map {root} was built with an earlier version of {built_with} (fingerprint "
            f"{manifest['base_model_fingerprint']}; the loaded one is {expected_fingerprint}), for example the "
            f"previous default model, or a student distilled again from the same recording: rebuild the map with "
            f"build_map, or use --model with the checkpoint it was built with")
    raise MapError(
        f"map {root} was built with model {built_with} (fingerprint {manifest['base_model_fingerprint']}); "
        f"the loaded model {loaded}has fingerprint {expected_fingerprint}. Use --model with the checkpoint "
        f"the map was built with ({built_with}), or rebuild the map with this model (build_map)")


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise MapError(f"map {root} has no {MANIFEST_FILE}: not a keyframe map, or an incomplete one")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MapError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise MapError(f"{path} must hold a JSON object")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise MapError(f"{path} has no valid format_version")
    if version < FORMAT_VERSION:
        raise MapError(f"map {root} has format_version {version}, written by tscm_ros "
                       f"{manifest.get('tscm_ros_version', '?')} before maps fitted their own vocabulary; this "
                       f"tscm_ros ({__version__}) needs format_version {FORMAT_VERSION}: rebuild the map with "
                       "build_map")
    if version > FORMAT_VERSION:
        raise MapError(f"{path} has format_version {version}, written by tscm_ros "
                       f"{manifest.get('tscm_ros_version', '?')}; this tscm_ros ({__version__}) reads up to "
                       f"format_version {FORMAT_VERSION}: upgrade tscm_ros to load this map")
    expected_types = {"model_fingerprint": str, "base_model_fingerprint": str, "model_name": str, "dim": int,
                      "preprocess": dict, "index": dict, "count": int, "files": dict}
    for key, kind in expected_types.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise MapError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    index = manifest["index"]
    if index.get("type") not in INDEX_TYPES or not isinstance(index.get("factory"), str) \
            or not isinstance(index.get("trained"), bool):
        raise MapError(f"{path}: field 'index' needs a type ({', '.join(INDEX_TYPES)}), a factory string "
                       "and trained")
    for name in (INDEX_FILE, KEYFRAMES_FILE):
        if name not in manifest["files"]:
            raise MapError(f"{path} does not list {name}")
    if not set(manifest["files"]) <= set(MAP_FILES) or \
            not all(isinstance(entry, dict) for entry in manifest["files"].values()):
        raise MapError(f"{path}: field 'files' lists unexpected entries")
    return manifest


def _read_index(root: Path, manifest: dict, factory: str) -> faiss.Index:
    path = root / INDEX_FILE
    try:
        index = faiss.read_index(str(path))
    except (RuntimeError, MemoryError) as exc:
        raise MapError(f"{path} is not a readable FAISS index: {str(exc).strip().splitlines()[0]}") from exc
    if index.d != manifest["dim"]:
        raise MapError(f"{path} holds {index.d}-d vectors but {root / MANIFEST_FILE} says dim {manifest['dim']}")
    if index.ntotal != manifest["count"]:
        raise MapError(f"{path} holds {index.ntotal} vectors but {root / MANIFEST_FILE} "
                       f"says count {manifest['count']}")
    try:
        expected = faiss.index_factory(manifest["dim"], factory, faiss.METRIC_L2)
    except RuntimeError as exc:
        raise MapError(f"{root / MANIFEST_FILE}: invalid index factory string {factory!r}") from exc
    found, wanted = sub_indexes(index), sub_indexes(expected)
    same_structure = len(found) == len(wanted) and all(isinstance(f, type(w)) for f, w in zip(found, wanted))
    if not same_structure or index.metric_type != faiss.METRIC_L2 or not index.is_trained:
        structure = " > ".join(type(sub).__name__ for sub in found)
        raise MapError(f"{path} is not the trained L2 index {factory!r} that {root / MANIFEST_FILE} describes "
                       f"(found {structure})")
    return index


def _read_keyframes(root: Path, count: int) -> KeyframeTable:
    path = root / KEYFRAMES_FILE
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in ("stamp_ns", "position", "orientation", "bag_index", "bag_names")}
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise MapError(f"{path} is not a valid keyframe table: {exc}") from exc
    shapes_ok = (arrays["stamp_ns"].shape == (count,) and arrays["position"].shape == (count, 3)
                 and arrays["orientation"].shape == (count, 4) and arrays["bag_index"].shape == (count,)
                 and arrays["bag_names"].ndim == 1 and arrays["stamp_ns"].dtype.kind == "i"
                 and arrays["bag_index"].dtype.kind == "i" and arrays["bag_names"].dtype.kind == "U")
    bags_ok = count == 0 or (0 <= arrays["bag_index"].min() and arrays["bag_index"].max() < len(arrays["bag_names"]))
    if not shapes_ok or not bags_ok:
        raise MapError(f"{path} does not describe the {count} keyframes of the index (wrong shapes or types)")
    return KeyframeTable(stamp_ns=arrays["stamp_ns"].astype(np.int64), position=arrays["position"].astype(np.float64),
                         orientation=arrays["orientation"].astype(np.float64),
                         bag_index=arrays["bag_index"].astype(np.int32),
                         bag_names=[str(name) for name in arrays["bag_names"]],
                         thumbnails=_read_thumbnails(root / THUMBNAILS_FILE, count),
                         local_features=_read_local_features(root / LOCAL_FEATURES_FILE, count))


def _read_thumbnails(path: Path, count: int) -> dict[int, np.ndarray]:
    thumbnails: dict[int, np.ndarray] = {}
    if not path.is_file():
        return thumbnails
    try:
        with np.load(path, allow_pickle=False) as data:
            for key in data.files:
                if not (key.startswith("k") and key[1:].isdigit() and int(key[1:]) < count):
                    raise ValueError(f"unexpected entry {key}")
                thumbnails[int(key[1:])] = data[key]
    except (OSError, ValueError, EOFError) as exc:
        raise MapError(f"{path} is not a valid thumbnail table: {exc}") from exc
    return thumbnails


def _read_local_features(path: Path, count: int) -> dict[int, LocalFeatures]:
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            ids, counts, keypoints, descriptors = (data[key] for key in
                                                   ("keyframe_ids", "counts", "keypoints", "descriptors"))
        valid = (ids.ndim == 1 and ids.dtype.kind == "i" and counts.shape == ids.shape and counts.dtype.kind == "i"
                 and keypoints.dtype == np.uint16 and keypoints.ndim == 2 and keypoints.shape[1] == 2
                 and descriptors.shape == (len(keypoints), 32) and descriptors.dtype == np.uint8
                 and int(counts.sum()) == len(keypoints) and (counts >= 0).all()
                 and (len(ids) == 0 or (ids.min() >= 0 and ids.max() < count and len(np.unique(ids)) == len(ids))))
        if not valid:
            raise ValueError("wrong shapes, types or keyframe ids")
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise MapError(f"{path} is not a valid local feature table: {exc}") from exc
    starts = np.concatenate([[0], np.cumsum(counts)])
    return {int(keyframe_id): LocalFeatures.unpack(keypoints[starts[i]:starts[i + 1]],
                                                   descriptors[starts[i]:starts[i + 1]])
            for i, keyframe_id in enumerate(ids)}


def _optional_entry(root: Path, manifest: dict, key: str, file_name: str, required: dict) -> dict | None:
    """The manifest's entry ``key`` for the optional file ``file_name``: None when the map has neither; MapError
    when only one of them is there or the entry lacks a field of ``required`` (name: type)."""
    entry = manifest.get(key)
    listed = file_name in manifest["files"]
    if entry is None and not listed:
        return None
    if not (isinstance(entry, dict) and listed and all(isinstance(entry.get(name), kind)
                                                        for name, kind in required.items())):
        raise MapError(f"{root / MANIFEST_FILE}: the {key} entry and {file_name} do not go together "
                       f"(need both, with {', '.join(required)})")
    return entry


def _read_vocabulary(root: Path, manifest: dict) -> Vocabulary | None:
    entry = _optional_entry(root, manifest, "vocabulary", VOCABULARY_FILE, {"source": str, "images": int})
    if entry is None:
        return None
    path = root / VOCABULARY_FILE
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in ("centres", "token_mean", "token_basis") if name in data.files}
        vocabulary = Vocabulary(**arrays, images=entry["images"], source=entry["source"])
    except (OSError, ValueError, KeyError, EOFError, TypeError, ConfigError) as exc:
        raise MapError(f"{path} is not a valid vocabulary: {exc}") from exc
    shapes = {name: list(shape) for name, shape in vocabulary.shapes.items()}
    if shapes != entry.get("shapes") or vocabulary.fingerprint() != entry.get("fingerprint"):
        raise MapError(f"{path} does not match the vocabulary {root / MANIFEST_FILE} describes")
    return vocabulary


def _read_calibration(root: Path, manifest: dict) -> MapCalibration | None:
    entry = _optional_entry(root, manifest, "calibration", CALIBRATION_FILE, {"keyframes": int, "samples": int})
    if entry is None:
        return None
    path = root / CALIBRATION_FILE
    try:
        with np.load(path, allow_pickle=False) as data:
            calibration = MapCalibration(data["null_margins"], entry["keyframes"])
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise MapError(f"{path} is not a valid score calibration: {exc}") from exc
    if len(calibration.null) != entry["samples"]:
        raise MapError(f"{path} does not match the calibration {root / MANIFEST_FILE} describes")
    return calibration


def _read_vocabulary_samples(root: Path, manifest: dict) -> list[tuple[np.ndarray, ...]] | None:
    entry = _optional_entry(root, manifest, "vocabulary_samples", VOCABULARY_SAMPLES_FILE,
                            {"keyframes": int, "parts": int})
    if entry is None:
        return None
    path = root / VOCABULARY_SAMPLES_FILE
    try:
        with np.load(path, allow_pickle=False) as data:
            parts = [data[f"part{j}"] for j in range(entry["parts"])]
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise MapError(f"{path} is not a valid table of vocabulary samples: {exc}") from exc
    if entry["keyframes"] != manifest["count"] or any(len(part) != entry["keyframes"] for part in parts):
        raise MapError(f"{path} does not hold one sample per keyframe, as {root / MANIFEST_FILE} says it must")
    return [tuple(part[i] for part in parts) for i in range(entry["keyframes"])]
