"""Saving a map that grows while a robot drives (the node's mapping mode), so a crash loses little.

``MapSaver`` writes snapshots of the map atomically (tscm_ros/atomic.py), one at a time and in order, so an
older snapshot never replaces a newer one. Its autosave thread saves every ``every_keyframes`` new
keyframes or ``period_s`` seconds after the first unsaved one, whichever comes first, and only when the map
changed. The snapshot is taken under the caller's lock (a copy of the map, quick); the writing, which takes
longer, runs on the saver's thread, off the image-processing path.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from tscm_ros.errors import TscmError
from tscm_ros.map.storage import MapContents, write_map

LOG = logging.getLogger(__name__)
RETRY_S = 10.0  # after a failed autosave


class MapSaver:
    """Saves what ``snapshot()`` returns (the map's contents, copied, and its keyframe count) to ``path``; with
    ``every_keyframes`` or ``period_s`` (0 = off), an autosave thread does it on its own once ``start``ed."""

    def __init__(self, snapshot: Callable[[], tuple[MapContents, int]], path: str | Path, every_keyframes: int = 0,
                 period_s: float = 0.0) -> None:
        self._snapshot = snapshot
        self.path = Path(path)
        self.every_keyframes = int(every_keyframes)
        self.period_s = float(period_s)
        self._save_lock = threading.Lock()  # one save at a time, snapshots in order
        self._state = threading.Condition()
        self._keyframes = 0  # in the map, as last reported
        self._saved_keyframes = 0
        self._unsaved_since: float | None = None  # monotonic time of the first unsaved keyframe
        self.saves = 0
        self.last_save_wall: datetime | None = None
        self.last_error = ""
        self._retry_at = 0.0
        self._running = False
        self._thread: threading.Thread | None = None

    @property
    def autosaving(self) -> bool:
        return self.every_keyframes > 0 or self.period_s > 0

    def start(self, keyframes: int) -> None:
        """Start the autosave thread (when on); ``keyframes`` are in the map already (loaded: saved)."""
        self._keyframes = self._saved_keyframes = int(keyframes)
        if self.autosaving:
            self._running = True
            self._thread = threading.Thread(target=self._autosave, name="tscm_autosave", daemon=True)
            self._thread.start()

    def keyframes_added(self, keyframes: int) -> None:
        """The map now holds ``keyframes``; wakes the autosave thread."""
        with self._state:
            self._keyframes = int(keyframes)
            if self._keyframes != self._saved_keyframes and self._unsaved_since is None:
                self._unsaved_since = time.monotonic()
            self._state.notify()

    @property
    def unsaved(self) -> int:
        """Keyframes added since the last save."""
        with self._state:
            return self._keyframes - self._saved_keyframes

    @property
    def saved_keyframes(self) -> int:
        with self._state:
            return self._saved_keyframes

    def save(self) -> int:
        """Save the map now (TscmError or OSError when it cannot be written); the keyframes saved."""
        with self._save_lock:
            contents, keyframes = self._snapshot()
            write_map(contents, self.path)
            with self._state:
                self._saved_keyframes = keyframes
                if self._keyframes == keyframes:
                    self._unsaved_since = None
                self.saves += 1
                self.last_save_wall = datetime.now().astimezone()
                self.last_error = ""
        return keyframes

    def _due(self) -> bool:
        unsaved = self._keyframes - self._saved_keyframes
        if unsaved == 0 or time.monotonic() < self._retry_at:
            return False
        if self.every_keyframes and unsaved >= self.every_keyframes:
            return True
        since = self._unsaved_since
        return bool(self.period_s) and since is not None and time.monotonic() - since >= self.period_s

    def _autosave(self) -> None:
        while True:
            with self._state:
                while self._running and not self._due():
                    wait = (self.period_s - (time.monotonic() - self._unsaved_since)
                            if self.period_s and self._unsaved_since is not None else math.inf)
                    self._state.wait(timeout=max(0.05, min(wait, 1.0)))
                if not self._running:
                    return
            try:
                count = self.save()
                LOG.info("autosaved %d keyframes to %s", count, self.path)
            except (TscmError, OSError) as exc:  # a full disk must not stop mapping; said on /diagnostics
                with self._state:
                    self.last_error = str(exc)
                    self._retry_at = time.monotonic() + RETRY_S
                LOG.error("autosave to %s failed: %s", self.path, exc)

    def stop(self) -> None:
        """Stop the autosave thread, after the save it may be writing."""
        with self._state:
            self._running = False
            self._state.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def status(self) -> dict:
        """For /diagnostics."""
        every = [f"{self.every_keyframes} keyframes"] if self.every_keyframes else []
        every += [f"{self.period_s:g} s"] if self.period_s else []
        return {"autosave": ("every " + " or ".join(every)) if every else "off",
                "last map save": self.last_save_wall.isoformat(timespec="seconds") if self.last_save_wall else "never",
                "keyframes unsaved": self.unsaved, "map saves": self.saves}
