"""A training run's directory and state: config.yaml, best.pt, last.pt (what ``--resume`` continues
from), the progress carried from epoch to epoch, and the processes of a ``torchrun`` launch."""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import math
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from tscm_ros.atomic import atomic_file
from tscm_ros.describe.checkpoint import save_checkpoint, torch_load_problem
from tscm_ros.errors import CheckpointError, ConfigError
from tscm_ros.train.config import TrainConfig
from tscm_ros.train.validation import MAX_RECALL_KEY

LOG = logging.getLogger(__name__)

STATE_FORMAT = "tscm_ros.train_state"
STATE_VERSION = 1
LOCK_FILE = ".train.lock"
BEST_KEY = (1, MAX_RECALL_KEY, 5, 10)  # the val recalls that decide the best epoch, in order of precedence


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` launch (rank 0 of 1 without one)."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed() -> Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(0, 1, 0)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


@dataclass
class Progress:
    """What the loop carries from epoch to epoch; stored in last.pt as plain values."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_key: list[float] | None = None  # the best epoch's val recall at BEST_KEY (NaN as -1), compared as a list
    best_epoch: int = 0
    stale_epochs: int = 0
    stopped_early: bool = False
    stop_reason: str = ""  # why it stopped early, for the log and the summary

    def record(self, row: dict, recall: dict[int, float], patience: int, learned: bool = True) -> bool:
        """Add an epoch's metrics; returns whether it is the best so far. With ``patience`` > 0 the run stops
        after that many epochs without a better one, or after an epoch that had nothing to learn from."""
        self.epoch = int(row["epoch"])
        self.history.append(row)
        key = [-1.0 if math.isnan(recall[name]) else float(recall[name]) for name in BEST_KEY]
        improved = self.best_key is None or key > self.best_key
        if improved:
            self.best_key, self.best_epoch, self.stale_epochs = key, self.epoch, 0
        else:
            self.stale_epochs += 1
        self.stopped_early = patience > 0 and (self.stale_epochs >= patience or not learned)
        if self.stopped_early:
            self.stop_reason = (f"no better validation in {patience} epoch(s)" if learned
                                else "no triplet came inside the margin in a whole epoch")
        return improved

    @property
    def best_recall(self) -> dict:
        """The best epoch's val recall by name (the keys of BEST_KEY); empty before the first epoch."""
        return {} if self.best_key is None else dict(zip(BEST_KEY, self.best_key))


def _lock_or_holder(fd: int) -> str | None:
    """Take the run lock on the open lock file ``fd``: None when taken, else who holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 200).decode(errors="replace").strip() or "another process"
    return None


def run_lock_holder(run_dir: Path) -> str | None:
    """Who trains in ``run_dir`` now ('train process PID on HOST'), or None when no process holds its lock.
    For tools that would replace a directory under a running ``train``."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDWR)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return _lock_or_holder(fd)  # the lock, when taken here, goes with the descriptor
    finally:
        os.close(fd)


class RunLock:
    """This process's exclusive hold on a run directory while it trains there: an advisory lock (flock) on
    ``.train.lock``, which the kernel drops when the process ends, however it ends."""

    def __init__(self, run_dir: Path) -> None:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        holder = _lock_or_holder(fd)
        if holder is not None:
            os.close(fd)
            raise ConfigError(f"run directory {run_dir} is in use: {holder} is training in it (wait for it to end, "
                              "or stop it, before resuming)")
        os.ftruncate(fd, 0)
        os.write(fd, f"train process {os.getpid()} on {socket.gethostname()}".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def start_run(run_dir: Path, resume: bool, config: TrainConfig, kind: str, teacher_fingerprint: str | None,
              distributed: Distributed) -> tuple[dict | None, RunLock | None]:
    """Prepare and lock the run directory (the main process holds the lock; release it when training ends);
    returns the saved training state when resuming from last.pt, and the lock."""
    if not resume:
        taken = run_dir.exists() and any(run_dir.iterdir())
        distributed.barrier()  # every process looks before the main one creates anything
        if taken:
            raise ConfigError(f"run directory {run_dir} already exists and is not empty (pass --resume to continue it)")
        lock = None
        if distributed.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run_dir)  # two new runs started at once into one directory: the second stops here
            _write_config(run_dir, config)
        distributed.barrier()
        return None, lock
    if not run_dir.is_dir():
        raise ConfigError(f"cannot resume: run directory {run_dir} does not exist")
    lock = RunLock(run_dir) if distributed.is_main else None
    try:
        return _resume(run_dir, config, kind, teacher_fingerprint, distributed), lock
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def abandon_new_run(run_dir: Path, existed: bool) -> bool:
    """After a new run failed before its first checkpoint: leave ``run_dir`` as it was found (removed when the run
    created it, emptied when it was an empty folder), so the same command can simply be run again. A folder
    holding a checkpoint (``*.pt``) is never touched. Whether it was cleaned up."""
    if not run_dir.is_dir() or any(run_dir.rglob("*.pt")):
        return False
    if not existed:
        shutil.rmtree(run_dir, ignore_errors=True)
        return True
    for entry in run_dir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return True


def _resume(run_dir: Path, config: TrainConfig, kind: str, teacher_fingerprint: str | None,
            distributed: Distributed) -> dict | None:
    last = run_dir / "last.pt"
    if distributed.is_main:
        for leftover in run_dir.glob(".*.tmp*"):  # from a process killed while writing
            leftover.unlink()
        _write_config(run_dir, config)
    if not last.is_file():
        LOG.info("resume: %s has no last.pt yet, starting from the first epoch", run_dir)
        return None
    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(f"cannot resume from {last}: {torch_load_problem(exc)}") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"cannot resume from {last}: not a tscm_ros training state")
    if int(state.get("version", -1)) > STATE_VERSION:
        raise CheckpointError(
            f"cannot resume from {last}: training state version {state.get('version')} is newer than supported"
        )
    if state["kind"] != kind:
        raise CheckpointError(f"cannot resume from {last}: it is a {state['kind']} run, not a {kind} run")
    if state.get("teacher_fingerprint") != teacher_fingerprint:
        raise CheckpointError(
            f"cannot resume from {last}: it was distilled from another teacher ({state.get('teacher_fingerprint')})"
        )
    return state


def _write_config(run_dir: Path, config: TrainConfig) -> None:
    with atomic_file(run_dir / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


def save_state(path: Path, run: Progress, model, optimizer, scaler, kind: str, teacher_fingerprint: str | None) -> None:
    """Write everything --resume needs to ``path`` (last.pt), as tensors and plain values (loadable with
    weights_only=True)."""
    state = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "kind": kind,
        "teacher_fingerprint": teacher_fingerprint,
        "epoch": run.epoch,
        "progress": dataclasses.asdict(run),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def restore_state(state: dict, model, optimizer, scaler, path: Path) -> Progress:
    """Load a state from :func:`start_run` into the model, optimiser, scaler and RNG; the progress so far."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        run = Progress(**state["progress"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot resume from {path}: it does not match the configured model ({exc})") from exc
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    LOG.info("resumed %s after epoch %d", path.parent, run.epoch)
    return run


def save_best(path: Path, model, model_config: dict, preprocess_config, epoch: int, recall: dict, label: str,
              kind: str, teacher_fingerprint: str | None) -> None:
    """The model checkpoint of the best epoch so far (atomic itself)."""
    extra = {
        "epoch": epoch,
        "val_recall": {str(n): float(value) for n, value in recall.items()},
        "dataset": label,
        "trained_as": kind,
    }
    if teacher_fingerprint is not None:
        extra["teacher_fingerprint"] = teacher_fingerprint
    save_checkpoint(path, model, model_config, preprocess_config, extra)
