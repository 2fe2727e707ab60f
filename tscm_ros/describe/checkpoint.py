"""Versioned model checkpoints, model config files, and TorchScript and ONNX export (export_model).

A checkpoint is a ``torch.save`` dict of plain values only (read back with ``weights_only=True``)::

    format: "tscm_ros.checkpoint", version: 1, kind: "student" | "teacher" | "baseline",
    model_config: JSON text, preprocess: JSON text, extra: JSON text,
    fingerprint: hex text, state_dict: {name: tensor}

The fingerprint is a hash of the kind, the model config, the preprocessing and every tensor of the
state dict; maps record it and refuse descriptors from any other model.

Model config files (config/model_*.yaml) hold one model per top-level key naming its kind
(``student:``, ``teacher:`` or ``baseline:``), each with the network options and a ``preprocess:`` section.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickle
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from tscm_ros.atomic import atomic_file
from tscm_ros.describe.models.nets import MODEL_KINDS, build_model
from tscm_ros.describe.preprocess import PreprocessConfig
from tscm_ros.errors import CheckpointError, ConfigError

CHECKPOINT_FORMAT = "tscm_ros.checkpoint"
CHECKPOINT_VERSION = 1
TORCHSCRIPT_METADATA = "tscm_ros.json"


@dataclass
class LoadedCheckpoint:
    """A checkpoint read back: the rebuilt model (CPU, eval mode) and everything recorded with it."""

    kind: str
    model: nn.Module
    model_config: dict[str, Any]
    preprocess: PreprocessConfig
    fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)
    path: str = ""


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def model_fingerprint(
    model_config: dict[str, Any], preprocess: PreprocessConfig, state_dict: dict[str, torch.Tensor]
) -> str:
    """Hash (16 hex digits) of the model config, the preprocessing and every tensor of ``state_dict``."""
    digest = hashlib.sha256()
    digest.update(_canonical_json({"model_config": model_config, "preprocess": preprocess.to_dict()}).encode())
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _check_state_matches(model_config: dict[str, Any], state_dict: dict[str, torch.Tensor], where: str) -> nn.Module:
    """Build the config's network (no pretrained weights) and load ``state_dict`` into it strictly."""
    model = build_model(model_config, load_pretrained=False)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [k for k in expected if k in state_dict and expected[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} missing tensors (e.g. {missing[:3]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        if wrong:
            key = wrong[0]
            details.append(
                f"{key} has shape {tuple(state_dict[key].shape)}, the config needs {tuple(expected[key].shape)}"
            )
        raise CheckpointError(f"{where}: the weights do not match the model config: {'; '.join(details)}")
    model.load_state_dict(state_dict, strict=True)
    return model


def torch_load_problem(exc: Exception) -> str:
    """What is wrong with a file ``torch.load(..., weights_only=True)`` refused, in a few words on one line
    (PyTorch's own text spans lines and suggests loading the file unsafely)."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError):
        refused = re.search(r"GLOBAL ([\w.]+)", text)
        if refused:
            return (f"it holds a Python object ({refused.group(1)}) besides tensors and plain values: refused "
                    "without loading it (tscm_ros never unpickles objects)")
        return "not a PyTorch file of tensors and plain values (corrupt, or not made by tscm_ros)"
    if "zip archive" in text or "central directory" in text:
        return "corrupt or truncated (not a readable PyTorch zip archive)"
    first_line = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return first_line[:200]


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_file(path) as temp:
        torch.save(obj, temp)


def save_checkpoint(
    path: str | Path, model: nn.Module, model_config: dict[str, Any], preprocess: PreprocessConfig,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write ``model`` with its config and preprocessing to ``path`` atomically; return the fingerprint.

    ``extra`` is any JSON-serialisable dict (epoch, recall, ...). Raises CheckpointError when the weights
    do not match ``model_config`` or ``extra`` is not JSON.
    """
    path = Path(path)
    kind = model_config.get("kind") if isinstance(model_config, dict) else None
    if kind not in MODEL_KINDS:
        raise CheckpointError(
            f"cannot save {path}: model config 'kind' must be one of {sorted(MODEL_KINDS)}, got {kind!r}"
        )
    try:
        config_json = json.dumps(model_config, sort_keys=True)
        extra_json = json.dumps(extra or {}, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot save {path}: model config and extra must be JSON-serialisable ({exc})") from exc
    state_dict = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    _check_state_matches(json.loads(config_json), state_dict, f"cannot save {path}")
    fingerprint = model_fingerprint(json.loads(config_json), preprocess, state_dict)
    _atomic_torch_save(
        {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "kind": kind,
            "model_config": config_json,
            "preprocess": json.dumps(preprocess.to_dict(), sort_keys=True),
            "extra": extra_json,
            "fingerprint": fingerprint,
            "state_dict": state_dict,
        },
        path,
    )
    return fingerprint


def load_checkpoint(path: str | Path, expected_kind: str | None = None) -> LoadedCheckpoint:
    """Read a checkpoint (``weights_only=True``), rebuild its model on CPU in eval mode and verify it.

    Raises CheckpointError naming ``path`` when the file is missing, corrupt, of a newer version, of
    another kind than ``expected_kind``, when its weights do not match its config, or when the recomputed
    fingerprint differs from the stored one.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, random bytes: torch raises several types
        raise CheckpointError(f"cannot read checkpoint {path}: {torch_load_problem(exc)}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a tscm_ros checkpoint (no '{CHECKPOINT_FORMAT}' format marker)")
    version = payload.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} is checkpoint version {version!r}; this tscm_ros reads versions up to {CHECKPOINT_VERSION}"
        )
    try:
        kind = payload["kind"]
        model_config = json.loads(payload["model_config"])
        preprocess = PreprocessConfig.from_dict(json.loads(payload["preprocess"]))
        extra = json.loads(payload["extra"])
        stored_fingerprint = str(payload["fingerprint"])
        state_dict = payload["state_dict"]
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{path} is damaged: missing or invalid field ({exc})") from exc
    if expected_kind is not None and kind != expected_kind:
        raise CheckpointError(f"{path} holds a {kind} model, but a {expected_kind} is needed here")
    if model_config.get("kind") != kind:
        raise CheckpointError(
            f"{path} is damaged: kind {kind!r} but its model config says {model_config.get('kind')!r}"
        )
    try:
        model = _check_state_matches(model_config, state_dict, str(path))
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its model config is invalid: {exc}") from exc
    fingerprint = model_fingerprint(model_config, preprocess, state_dict)
    if fingerprint != stored_fingerprint:
        raise CheckpointError(
            f"{path}: fingerprint mismatch (stored {stored_fingerprint}, computed {fingerprint}); "
            "the file is corrupt or was edited"
        )
    return LoadedCheckpoint(kind, model.eval(), model_config, preprocess, fingerprint, extra, str(path))


def config_search_dirs() -> list[Path]:
    """Where model config files are looked up, in order: $TSCM_CONFIG_DIR, the source checkout's config/,
    then share/tscm_ros/config under this Python prefix and every AMENT_PREFIX_PATH entry."""
    dirs = []
    if os.environ.get("TSCM_CONFIG_DIR"):
        dirs.append(Path(os.environ["TSCM_CONFIG_DIR"]))
    dirs.append(Path(__file__).resolve().parents[2] / "config")
    prefixes = [sys.prefix] + [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    dirs += [Path(prefix) / "share" / "tscm_ros" / "config" for prefix in prefixes]
    return dirs


def find_config_file(name: str) -> Path:
    """Locate a model config by preset name ('student_offline'), file name or path; ConfigError if absent."""
    candidate = Path(name)
    if candidate.is_file():
        return candidate
    if len(candidate.parts) > 1:
        raise ConfigError(f"model config {candidate} does not exist")
    file_name = name if name.endswith((".yaml", ".yml")) else f"model_{name}.yaml"
    searched = config_search_dirs()
    for directory in searched:
        if (directory / file_name).is_file():
            return directory / file_name
    raise ConfigError(f"model config {file_name} not found in {', '.join(str(d) for d in searched)}")


def load_model_config(source: str | Path, kind: str | None = None) -> tuple[dict[str, Any], PreprocessConfig]:
    """Read a model config file (path or preset name such as 'student_offline').

    Returns ``(model_config, preprocess)``; ``model_config['kind']`` is set from the file's top-level key.
    ``kind`` picks the model in a file holding several (config/model_tiny.yaml holds a student and a teacher).
    """
    path = find_config_file(str(source))
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read model config {path}: {exc}") from exc
    if not isinstance(document, dict) or not document or not set(document) <= set(MODEL_KINDS):
        raise ConfigError(f"model config {path}: top-level keys must be model kinds {sorted(MODEL_KINDS)}")
    if kind is None:
        if len(document) != 1:
            raise ConfigError(f"model config {path} holds {sorted(document)}; say which kind to use")
        kind = next(iter(document))
    if kind not in document:
        raise ConfigError(f"model config {path} has no {kind!r} model (it has {sorted(document)})")
    section = dict(document[kind] or {})
    if "preprocess" not in section:
        raise ConfigError(f"model config {path}: the {kind} model lacks a 'preprocess' section")
    preprocess = PreprocessConfig.from_dict(section.pop("preprocess"))
    section["kind"] = kind
    return section, preprocess


def export_torchscript(model: nn.Module, preprocess: PreprocessConfig, path: str | Path, fingerprint: str) -> None:
    """Trace ``model`` (CPU, eval) at the preprocessing's input size and save it as TorchScript, atomically.

    The archive carries the fingerprint, preprocessing, descriptor dim and kind in an extra file, so a
    deployment can check it against a map without this package's model code.
    """
    path = Path(path)
    model = copy.deepcopy(model).eval().cpu()
    example = torch.zeros(2, 3, preprocess.height, preprocess.width)
    metadata = {
        "fingerprint": fingerprint,
        "preprocess": preprocess.to_dict(),
        "dim": int(model.dim),
        "kind": getattr(model, "kind", ""),
        "name": getattr(model, "name", ""),
    }
    with atomic_file(path) as temp, torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated in torch 2.x but still the format libtorch (C++) deployments load.
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(temp), _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)})


def onnx_model_bytes(model: nn.Module, preprocess: PreprocessConfig, metadata: dict[str, Any] | None = None,
                     outputs: tuple[str, ...] = ("descriptors",), extra_inputs: dict[str, torch.Tensor] | None = None
                     ) -> bytes:
    """``model`` (CPU, eval) exported to ONNX with a dynamic batch axis: input ``images`` (N, 3, H, W) at
    the preprocessing's size (then ``extra_inputs``, name: example tensor, without a batch axis), outputs named
    ``outputs`` (by default ``descriptors`` (N, dim)). ``metadata`` goes into the model's metadata_props.
    Needs the ``onnx`` package."""
    import onnx

    model = copy.deepcopy(model).eval().cpu()
    extra_inputs = extra_inputs or {}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant-folding notes from the exporter
        torch.onnx.export(
            model, (torch.zeros(1, 3, preprocess.height, preprocess.width), *extra_inputs.values()), buffer,
            dynamo=False, input_names=["images", *extra_inputs], output_names=list(outputs),
            dynamic_axes={"images": {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
        )
    if not metadata:
        return buffer.getvalue()
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    return proto.SerializeToString()


def export_onnx(model: nn.Module, preprocess: PreprocessConfig, path: str | Path, fingerprint: str) -> None:
    """Write ``model`` as an ONNX file, atomically, with fingerprint, preprocessing, dim and kind in its
    metadata_props (JSON values), for ONNX Runtime deployments."""
    path = Path(path)
    metadata = {"fingerprint": fingerprint, "preprocess": preprocess.to_dict(), "dim": int(model.dim),
                "kind": getattr(model, "kind", ""), "name": getattr(model, "name", "")}
    data = onnx_model_bytes(model, preprocess, metadata)
    with atomic_file(path) as temp:
        temp.write_bytes(data)


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load an exported TorchScript model on CPU and its metadata dict; CheckpointError if unreadable."""
    path = Path(path)
    files = {TORCHSCRIPT_METADATA: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
        metadata = json.loads(files[TORCHSCRIPT_METADATA])
    except Exception as exc:
        raise CheckpointError(f"cannot read TorchScript model {path}: {torch_load_problem(exc)}") from exc
    return module.eval(), metadata
