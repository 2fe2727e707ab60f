"""What the node's image input needs besides the pixels: the newest-image mailbox, the malformed images by
kind with a rate-limited summary, and the images lost before they reached the node, told by gaps in the
stamps. No ROS here: the node feeds these from its callbacks."""

from __future__ import annotations

import math
import threading
from collections import deque

import numpy as np

PAUSE_S = 5.0  # a longer step between stamps is a paused stream, not lost images
_STEPS_KEPT = 100


class NewestImage:
    """A one-slot mailbox: putting replaces an unprocessed image (counted as dropped)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._message = None
        self._closed = False
        self.received = 0
        self.dropped = 0

    def put(self, message) -> None:
        with self._condition:
            self.received += 1
            if self._message is not None:
                self.dropped += 1
            self._message = message
            self._condition.notify()

    def take(self, timeout_s: float):
        """The newest message (clearing the slot), or None on timeout or when closed."""
        with self._condition:
            if self._message is None and not self._closed:
                self._condition.wait(timeout_s)
            message, self._message = self._message, None
            return message

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()


class MalformedImages:
    """Malformed images counted by kind; ``add`` and ``due`` return a summary line to log at most once every
    ``period_s`` (the first malformed image at once), naming each kind with its count and one reason."""

    def __init__(self, period_s: float = 5.0) -> None:
        self.period_s = period_s
        self.by_kind: dict[str, int] = {}
        self._pending: dict[str, list] = {}  # kind -> [count since the last summary, latest reason]
        self._last_summary = -math.inf

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def add(self, kind: str, reason: str, now: float) -> str | None:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        entry = self._pending.setdefault(kind, [0, reason])
        entry[0] += 1
        entry[1] = reason
        return self.due(now)

    def due(self, now: float) -> str | None:
        """The summary of the images skipped since the last one, when there are some and it is time."""
        if not self._pending or now - self._last_summary < self.period_s:
            return None
        count = sum(entry[0] for entry in self._pending.values())
        kinds = "; ".join(f"{n} {kind} (e.g. {reason})" for kind, (n, reason) in
                          sorted(self._pending.items(), key=lambda item: -item[1][0]))
        self._pending.clear()
        self._last_summary = now
        return f"skipped {count} malformed image{'s' if count > 1 else ''} ({self.total} in all): {kinds}"


class StampGaps:
    """Images lost on the way, estimated from the input stamps. The publisher's period is the median of the
    recent steps between consecutive stamps that are single periods: those under 1.5 times a low percentile
    (the 10th) of all of them, refined once. So it holds while up to about 90 % of the images are lost, and
    jitter in the stamps does not shrink it as the low percentile alone would. A step of n periods counts
    n - 1 lost images; a late stamp followed by an early one is jitter, not a loss: when a step counted lost
    images, the next one is judged with it (the two steps together, counted in periods, less the two images
    that arrived). Steps back in time (a replayed bag) restart the estimate; steps longer than ``PAUSE_S``
    count as a paused stream."""

    def __init__(self) -> None:
        self._last_ns: int | None = None
        self._steps: deque[int] = deque(maxlen=_STEPS_KEPT)
        self._recent: deque[tuple[int, int]] = deque(maxlen=_STEPS_KEPT)  # (images arrived, lost) per step
        self._previous: tuple[int, int] | None = None  # the last step and the images it counted lost
        self.lost = 0

    def add(self, stamp_ns: int) -> None:
        last, self._last_ns = self._last_ns, stamp_ns
        if last is None or stamp_ns <= last:
            if last is not None and stamp_ns < last:
                self._steps.clear()
            self._previous = None
            return
        step = stamp_ns - last
        if step > PAUSE_S * 1e9:
            self._previous = None
            return
        self._steps.append(step)
        lost = 0
        if len(self._steps) >= 5:
            period = self.period_ns
            lost = max(0, round(step / period) - 1)
            if self._previous is not None and self._previous[1] > 0:  # was the step before jitter?
                before, counted = self._previous
                together = max(0, round((before + step) / period) - 2)
                if together < counted + lost:
                    self.lost -= counted
                    self._recent[-1] = (1, 0)
                    lost = together
        self.lost += lost
        self._recent.append((1, lost))
        self._previous = (step, lost)

    @property
    def period_ns(self) -> float:
        """The publisher's estimated period (NaN until five steps are known)."""
        if len(self._steps) < 5:
            return math.nan
        steps = np.asarray(self._steps, dtype=np.float64)
        period = float(np.percentile(steps, 10))
        for _ in range(4):  # converges in a few rounds, from below
            period = float(np.median(steps[steps < 1.5 * period]))
        return period

    @property
    def rate_hz(self) -> float:
        return 1e9 / self.period_ns

    @property
    def recent_loss(self) -> float:
        """Share of the images lost over the last steps (0 when nothing is known yet)."""
        arrived = sum(a for a, _ in self._recent)
        lost = sum(n for _, n in self._recent)
        return lost / (arrived + lost) if arrived + lost else 0.0
