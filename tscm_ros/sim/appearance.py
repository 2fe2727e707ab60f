"""How a simulated traversal looks and is driven: light, sky, fog, colours, noise, clutter and the
vehicle's path, for each condition of ``CONDITIONS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from tscm_ros.sim.route import Route

CAMERA_HEIGHT_M = 1.6
CONDITIONS = {
    "auto": "traversal 0 the reference, later traversals a random change scaled by the appearance change",
    "day": "the reference light and surfaces (only the drive changes)",
    "night": "low light: a dark bluish sky, dim warm light, a third of the exposure, heavy sensor noise",
    "haze": "fog thickening with distance (1 - exp(-d / 15..25 m)), the sky fully fogged",
    "season": "brown or snowy grass; pavements, buildings and facades hue-shifted and paler; another sun",
    "clutter": "many more and larger objects along the street: cars parked at the kerb, bins, boxes",
}

DAY_SKY = ((95.0, 145.0, 215.0), (200.0, 220.0, 240.0))  # zenith, horizon (RGB)
DUSK_SKY = ((60.0, 70.0, 125.0), (240.0, 160.0, 95.0))
NIGHT_SKY = ((10.0, 14.0, 40.0), (35.0, 42.0, 80.0))
OVERCAST_SKY = ((165.0, 170.0, 180.0), (215.0, 218.0, 222.0))
FOG = (215.0, 218.0, 222.0)
GRASS = (0.33, 0.45, 0.28)
CLOUD_WHITENESS = 0.8  # how far a cloud is lit from the horizon colour towards white, in full daylight


@dataclass(frozen=True)
class Appearance:
    """How a traversal looks and how the vehicle drives it. The defaults are the reference (traversal 0).

    The vehicle keeps ``lateral_m`` to the left of the centre line plus a slow weave of ``weave_m``, and
    its heading wobbles by up to ``yaw_wobble_rad``; all of it is part of the published ground truth.
    ``arc_offset`` (a fraction of the image spacing) shifts where along the route images are taken.
    The world's surfaces take ``grass`` and ``recolour`` (hue shift and saturation); ``clutter_per_10m``
    boxes stand at ``clutter_lateral_m`` from the centre line, and ``parked_per_10m`` parked cars and
    bins along the kerbs. ``fog_m`` > 0 is haze: pixels fade to ``FOG`` as 1 - exp(-depth / fog_m).
    """

    light_direction: tuple[float, float, float] = (0.4, 0.3, 1.0)
    light_color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    ambient: float = 0.6
    tint: np.ndarray | tuple[float, float, float] = (1.0, 1.0, 1.0)
    gain: float = 1.0
    noise: float = 1.0
    lateral_m: float = 0.0
    yaw_wobble_rad: float = 0.0
    height_m: float = CAMERA_HEIGHT_M
    sky: tuple[tuple[float, float, float], tuple[float, float, float]] = DAY_SKY
    weave_m: float = 0.0
    weave_period_m: float = 60.0
    weave_phase: float = 0.0
    arc_offset: float = 0.0
    grass: tuple[float, float, float] = GRASS
    hue_shift_deg: float = 0.0
    saturation: float = 1.0
    clutter_per_10m: float = 1.1
    clutter_lateral_m: tuple[float, float] = (2.5, 5.0)
    parked_per_10m: float = 0.0
    fog_m: float = 0.0

    @classmethod
    def for_traversal(cls, seed: int, traversal: int, change: float, condition: str = "auto") -> Appearance:
        """The look of ``traversal`` under ``condition`` (one of ``CONDITIONS``); ``change`` scales "auto"."""
        clutter = 0.5 + change
        if condition == "auto":
            if traversal == 0:
                return cls(clutter_per_10m=clutter)
            rng = np.random.default_rng([seed, traversal, 2])
            azimuth = rng.uniform(0, 2 * math.pi)
            evening = rng.uniform(0.5, 1.0) * change
            return cls(
                light_direction=(math.cos(azimuth), math.sin(azimuth), rng.uniform(0.3, 1.0)),
                light_color=(1.0, 1.0 - 0.3 * evening, 1.0 - 0.5 * evening),
                ambient=0.6 - 0.25 * change * rng.uniform(0.5, 1.0),
                tint=1.0 + change * rng.uniform(-0.15, 0.15, 3),
                gain=1.0 + change * rng.uniform(-0.35, 0.25),
                noise=1.0 + 3.0 * change,
                lateral_m=change * rng.uniform(0.5, 1.2) * rng.choice([-1, 1]),
                yaw_wobble_rad=change * math.radians(4.0),
                height_m=CAMERA_HEIGHT_M + change * rng.uniform(-0.2, 0.2),
                sky=tuple(tuple((1 - evening) * np.array(day) + evening * np.array(dusk))
                          for day, dusk in zip(DAY_SKY, DUSK_SKY)),
                weave_m=change * rng.uniform(0.2, 0.6),
                weave_period_m=rng.uniform(40.0, 90.0),
                weave_phase=rng.uniform(0, 2 * math.pi),
                arc_offset=change * rng.uniform(0.3, 0.7),
                clutter_per_10m=clutter,
            )
        # The hard conditions: the drive depends on seed and traversal only, the same under every condition.
        # Clutter keeps to the pavements, clear of the drive (at most 2.3 m off the centre line).
        look = {"clutter_per_10m": clutter, "clutter_lateral_m": (3.5, 5.5)}
        if traversal > 0:
            rng = np.random.default_rng([seed, traversal, 3])
            look.update(lateral_m=rng.uniform(1.0, 2.0) * rng.choice([-1, 1]), weave_m=rng.uniform(0.15, 0.3),
                        weave_period_m=rng.uniform(40.0, 90.0), weave_phase=rng.uniform(0, 2 * math.pi),
                        yaw_wobble_rad=math.radians(rng.uniform(3.0, 5.0)),
                        height_m=CAMERA_HEIGHT_M + rng.uniform(-0.3, 0.3), arc_offset=rng.uniform(0.3, 0.7))
        rng = np.random.default_rng([seed, traversal, 7])
        azimuth = rng.uniform(0, 2 * math.pi)
        sun = (math.cos(azimuth), math.sin(azimuth), rng.uniform(0.3, 1.0))
        if condition == "night":
            look.update(light_direction=sun, light_color=(0.8, 0.65, 0.45), ambient=rng.uniform(0.25, 0.35),
                        tint=np.array([0.9, 0.95, 1.15]) + rng.uniform(-0.03, 0.03, 3), gain=rng.uniform(0.3, 0.4),
                        noise=rng.uniform(8.0, 12.0), sky=NIGHT_SKY)
        elif condition == "haze":
            look.update(light_direction=sun, ambient=rng.uniform(0.7, 0.8), noise=2.0, fog_m=rng.uniform(15.0, 25.0))
        elif condition == "season":
            snow = rng.random() < 0.5
            ochre = rng.uniform(0, 1)
            look.update(light_direction=(sun[0], sun[1], rng.uniform(0.2, 0.5)),
                        light_color=(0.95, 0.97, 1.0) if snow else (1.0, 0.9, 0.75),
                        grass=(0.9, 0.92, 0.95) if snow else tuple((1 - ochre) * np.array([0.42, 0.3, 0.16])
                                                                   + ochre * np.array([0.65, 0.52, 0.24])),
                        sky=OVERCAST_SKY if snow else DAY_SKY,
                        hue_shift_deg=rng.choice([-1, 1]) * rng.uniform(40.0, 80.0), saturation=rng.uniform(0.35, 0.6))
        elif condition == "clutter":
            look.update(clutter_per_10m=2.5, parked_per_10m=2.0)
        return cls(**look)

    def vehicle_pose(self, route: Route, s: float) -> tuple[np.ndarray, float]:
        """Position (x, y) and heading of ``base_link`` after ``s`` metres of this traversal."""
        centre, heading = route.at(s)
        wave = 2 * math.pi * s / self.weave_period_m + self.weave_phase
        normal = np.array([-math.sin(heading), math.cos(heading)])
        xy = centre + (self.lateral_m + self.weave_m * math.sin(wave)) * normal
        return xy, heading + self.yaw_wobble_rad * math.sin(0.7 * wave + 1.0)

    def recolour(self, rgb):
        """Surface colours (RGB in [0, 1] along the last axis) as this traversal paints them: hue shifted by
        ``hue_shift_deg`` and saturation scaled by ``saturation``; unchanged at the defaults."""
        if self.hue_shift_deg == 0.0 and self.saturation == 1.0:
            return rgb
        hsv = cv2.cvtColor(np.float32(rgb).reshape(-1, 1, 3), cv2.COLOR_RGB2HSV)  # hue in degrees
        hsv[:, :, 0] = (hsv[:, :, 0] + self.hue_shift_deg) % 360
        hsv[:, :, 1] *= self.saturation
        return np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0, 1).reshape(np.shape(rgb))

    def grade(self, rgb: np.ndarray, sky_mask: np.ndarray, depth_m: np.ndarray, noise: np.random.Generator,
              clouds: np.ndarray | None = None) -> np.ndarray:
        """Paint the sky (with ``clouds``, a cover (H, W) in [0, 1], if given), fog, apply tint, gain and
        sensor noise: the final uint8 image."""
        image = rgb.astype(np.float32)
        # zenith colour at the top row, horizon colour a little above the image centre and below
        rows = np.clip(np.arange(rgb.shape[0], dtype=np.float32) / (0.45 * rgb.shape[0]), 0, 1)[:, None, None]
        gradient = (1 - rows) * np.float32(self.sky[0]) + rows * np.float32(self.sky[1])
        if clouds is not None:  # lit like the horizon: white by day, a faint glow at night
            horizon = np.float32(self.sky[1])
            cloud = horizon + CLOUD_WHITENESS * (255 - horizon) * horizon.mean() / 255
            gradient = gradient + np.float32(clouds)[:, :, None] * (cloud - gradient)
        image = np.where(sky_mask[:, :, None], gradient, image)
        if self.fog_m > 0:  # haze: fading to the fog colour with depth, the sky all fog
            fog = np.where(sky_mask, 1.0, 1.0 - np.exp(-depth_m / self.fog_m))[:, :, None]
            image = (1 - fog) * image + fog * np.float32(FOG)
        image = image * self.tint * self.gain + noise.normal(0, self.noise, rgb.shape)
        return np.clip(image, 0, 255).astype(np.uint8)
