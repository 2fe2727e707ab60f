"""The route every simulated world is driven along: a closed loop of a given length."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Route:
    """A rounded rectangle of the given perimeter, driven counter-clockwise; ``at(s)`` gives position and
    heading after ``s`` metres."""

    length_m: float

    @property
    def sides(self) -> tuple[float, float, float]:
        radius = 0.06 * self.length_m
        straight = self.length_m - 2 * math.pi * radius
        return 0.6 * straight / 2, 0.4 * straight / 2, radius  # long side, short side, corner radius

    def at(self, s: float) -> tuple[np.ndarray, float]:
        long_side, short_side, radius = self.sides
        segments = []
        x, y, heading = -long_side / 2, -short_side / 2 - radius, 0.0
        for side in (long_side, short_side, long_side, short_side):
            segments.append(("line", side))
            segments.append(("arc", math.pi / 2 * radius))
        s = s % self.length_m
        for kind, length in segments:
            step = min(s, length)
            if kind == "line":
                x += step * math.cos(heading)
                y += step * math.sin(heading)
            else:
                angle = step / radius
                cx, cy = x - radius * math.sin(heading), y + radius * math.cos(heading)
                heading += angle
                x, y = cx + radius * math.sin(heading), cy - radius * math.cos(heading)
            s -= step
            if s <= 0:
                break
        return np.array([x, y]), heading

    def beside(self, s: float, offset_m: float) -> tuple[np.ndarray, float]:
        """The point ``offset_m`` to the left of the centre line (negative: to the right) after ``s`` metres,
        and the route's heading there."""
        centre, heading = self.at(s)
        return centre + offset_m * np.array([-math.sin(heading), math.cos(heading)]), heading
