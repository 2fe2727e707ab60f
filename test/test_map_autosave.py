"""The map saver of mapping mode: autosaves by keyframe count or time, only when the map changed, in order."""

from __future__ import annotations

import threading
import time

import numpy as np

from tscm_ros.map.autosave import MapSaver
from tscm_ros.map.keyframe_map import KeyframeMap, KeyframeMeta


def _wait_for(condition, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


class GrowingMap:
    def __init__(self) -> None:
        self.map = KeyframeMap(8, "f" * 16, {"height": 8, "width": 8})
        self.lock = threading.Lock()
        self.rng = np.random.default_rng(0)

    def add(self, saver: MapSaver) -> None:
        with self.lock:
            vector = self.rng.normal(size=(1, 8)).astype(np.float32)
            self.map.add(vector / np.linalg.norm(vector), [KeyframeMeta(stamp_ns=len(self.map), pose=None, bag="b")])
            count = len(self.map)
        saver.keyframes_added(count)

    def snapshot(self):
        with self.lock:
            return self.map.snapshot(), len(self.map)


def test_autosave_every_n_keyframes_and_only_when_the_map_changed(tmp_path):
    growing = GrowingMap()
    saver = MapSaver(growing.snapshot, tmp_path / "map", every_keyframes=3)
    saver.start(0)
    try:
        for expected_saves in (1, 2):
            for _ in range(3):
                growing.add(saver)
            assert _wait_for(lambda: saver.saves == expected_saves and saver.unsaved == 0)
            assert len(KeyframeMap.load(tmp_path / "map")) == 3 * expected_saves
        growing.add(saver)  # one new keyframe: under the count, no period: not saved
        assert saver.unsaved == 1 and saver.saves == 2
        assert saver.status()["autosave"] == "every 3 keyframes" and saver.status()["keyframes unsaved"] == 1
    finally:
        saver.stop()
    assert saver.save() == 7 and len(KeyframeMap.load(tmp_path / "map")) == 7  # the final save on shutdown


def test_autosave_after_a_period_and_not_again_without_change(tmp_path):
    growing = GrowingMap()
    saver = MapSaver(growing.snapshot, tmp_path / "map", period_s=0.2)
    saver.start(0)
    try:
        time.sleep(0.5)
        assert saver.saves == 0  # an empty map that did not change is not written
        growing.add(saver)
        assert _wait_for(lambda: saver.saves == 1)
        time.sleep(0.6)  # three periods without a change
        assert saver.saves == 1 and saver.status()["last map save"] != "never"
    finally:
        saver.stop()
