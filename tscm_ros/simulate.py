"""Rendered test routes: a camera driving a closed loop through a textured town, written as a rosbag2.

The world (grass, an asphalt road, pavements in blocks of colour, road-side buildings with procedural
facades, poles) depends only on ``seed`` and ``aliasing``; ``traversal`` 0 is the reference drive, and
each later traversal revisits the same places under changed appearance. With ``condition`` "auto" (the
default) that is a new sun direction and, scaled by ``appearance_change`` in [0, 1], light colour, a
dusk sky, tint, exposure, sensor noise, more clutter objects placed anew, and a different drive (a
lateral offset with a slow weave, a small heading wobble, camera height, images taken at other points
along the route). The other conditions (``CONDITIONS``) are hard changes for benchmarks: "day" keeps
the reference light, "night", "haze", "season" and "clutter" change light, air, surface colours or the
objects along the street; with every one of them traversals >= 1 drive 1-2 m off the centre line with
a weave, a heading wobble of 3-5 degrees, the camera up to 0.3 m higher or lower and images at other
points along the route. A condition on traversal 0 gives a reference under that condition (driven on
the centre line).

``aliasing`` in [0, 1] is the fraction of 20 m street blocks whose buildings, poles and pavement
colours are an exact copy of an earlier block's (placed the same way relative to the route), so that
distinct places look alike; ``skip_arc`` leaves out the images of a stretch of the lap (a reference
that never mapped it). Rendering is pybullet's CPU TinyRenderer (offscreen), so the same arguments
give byte-identical images.

Topics: ``/camera/image_raw`` (sensor_msgs/Image, rgb8, frame ``camera``), optionally
``/camera/image_raw/compressed`` (JPEG), and ``/odom`` (nav_msgs/Odometry, the exact pose of
``base_link`` in ``odom``, at least three times per image and 10 Hz, between the image stamps). All
traversals of a seed share one metric frame, so positions compare across bags. The camera sits on
``base_link``, looking along its heading.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore
from tqdm import tqdm

from tscm_ros.atomic import atomic_directory
from tscm_ros.errors import ConfigError

IMAGE_TOPIC = "/camera/image_raw"
COMPRESSED_TOPIC = "/camera/image_raw/compressed"
ODOM_TOPIC = "/odom"
SPEED_M_S = 5.0
ROAD_WIDTH_M = 7.0
ROAD_SEGMENT_M = 4.0
PAVEMENT_WIDTH_M = 2.0
MIN_ODOM_PER_IMAGE = 3
MAX_ODOM_PERIOD_NS = 100_000_000  # odometry at 10 Hz or faster, so sparse images still get poses
START_SEC = 1_700_000_000
CAMERA_HEIGHT_M = 1.6
NEAR_M, FAR_M = 0.1, 150.0  # camera clipping planes
BLOCK_M = 20.0  # the street blocks that aliasing copies; a multiple of ROAD_SEGMENT_M
STORAGES = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}
CONDITIONS = {
    "auto": "traversal 0 the reference, later traversals a random change scaled by the appearance change",
    "day": "the reference light and surfaces (only the drive changes)",
    "night": "low light: a dark bluish sky, dim warm light, a third of the exposure, heavy sensor noise",
    "haze": "fog thickening with distance (1 - exp(-d / 15..25 m)), the sky fully fogged",
    "season": "brown or snowy grass; pavements, buildings and facades hue-shifted and paler; another sun",
    "clutter": "many more and larger objects along the street: cars parked at the kerb, bins, boxes",
}


@dataclass(frozen=True)
class Route:
    """A rounded rectangle of the given perimeter, driven counter-clockwise; ``at(s)`` gives position and
    heading after ``s`` metres."""

    length_m: float

    @property
    def _sides(self) -> tuple[float, float, float]:
        radius = 0.06 * self.length_m
        straight = self.length_m - 2 * math.pi * radius
        return 0.6 * straight / 2, 0.4 * straight / 2, radius  # long side, short side, corner radius

    def at(self, s: float) -> tuple[np.ndarray, float]:
        long_side, short_side, radius = self._sides
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


def _textures(rng: np.random.Generator, directory: Path, count: int, recolour) -> list[Path]:
    """Distinct procedural facades: windows grids, stripes, checks and blotches in random colours,
    painted by ``recolour`` (``Appearance.recolour``)."""
    paths = []
    for i in range(count):
        base = rng.integers(40, 230, size=3)
        accent = rng.integers(0, 256, size=3)
        image = np.empty((64, 64, 3), np.uint8)
        image[:] = base
        kind = i % 4
        if kind == 0:  # windows
            size, gap = rng.integers(5, 10), rng.integers(3, 7)
            for r in range(gap, 64, size + gap):
                for c in range(gap, 64, size + gap):
                    image[r:r + size, c:c + size] = accent
        elif kind == 1:  # stripes
            width = int(rng.integers(3, 12))
            for c in range(0, 64, 2 * width):
                image[:, c:c + width] = accent
        elif kind == 2:  # checks
            cell = int(rng.integers(4, 16))
            yy, xx = np.mgrid[:64, :64]
            image[((yy // cell + xx // cell) % 2).astype(bool)] = accent
        else:  # blotches
            for _ in range(12):
                cv2.circle(image, tuple(int(v) for v in rng.integers(0, 64, 2)), int(rng.integers(3, 12)),
                           tuple(int(v) for v in rng.integers(0, 256, 3)), -1)
        image = np.rint(recolour(image / 255.0) * 255).astype(np.uint8)
        path = directory / f"texture_{i:03d}.png"
        cv2.imwrite(str(path), image[:, :, ::-1])
        paths.append(path)
    return paths


@dataclass(frozen=True)
class _Piece:
    """A road-side building or pole, placed ``s`` metres along the route and ``distance`` to its ``side``
    (-1 right, 1 left), turned by ``turn`` from the route's heading (None: square to the world axes)."""

    s: float
    side: int
    distance: float
    half_extents: tuple[float, float, float]
    turn: float | None
    colour: tuple[float, float, float]
    texture: int | None


def _copied_blocks(length_m: float, seed: int, aliasing: float) -> dict[int, int]:
    """Perceptual aliasing: which street blocks (``BLOCK_M`` long, numbered from the start of the lap)
    copy which earlier original block; ``aliasing`` of all blocks (rounded), chosen from ``seed``."""
    blocks = math.ceil(length_m / BLOCK_M)
    rng = np.random.default_rng([seed, 6])
    copies = rng.choice(np.arange(1, blocks), size=min(blocks - 1, round(aliasing * blocks)), replace=False)
    originals = [block for block in range(blocks) if block not in copies]
    return {int(block): int(rng.choice([b for b in originals if b < block])) for block in sorted(copies)}


class _World:
    """The pybullet scene: ground, road-side buildings and poles from ``seed`` and ``aliasing``; surface
    colours and clutter from the traversal's ``Appearance``.

    ``copies`` maps each copied street block to the block it copies; ``pieces`` (buildings and poles) and
    ``paint`` (the right and left pavement colours of each road segment) are the layout as built.
    """

    def __init__(self, route: Route, seed: int, traversal: int, look: Appearance, aliasing: float = 0.0) -> None:
        import pybullet

        self.p = pybullet
        self.client = pybullet.connect(pybullet.DIRECT)
        self._texture_dir = Path(tempfile.mkdtemp(prefix="tscm_textures_"))
        try:
            self._build(route, seed, traversal, look, aliasing)
        except BaseException:
            self.close()
            raise

    def _box(self, position, half_extents, yaw, rgba, texture=None) -> None:
        p, c = self.p, self.client
        visual = p.createVisualShape(p.GEOM_BOX, halfExtents=half_extents, rgbaColor=rgba, physicsClientId=c)
        body = p.createMultiBody(0, -1, visual, basePosition=position,
                                 baseOrientation=p.getQuaternionFromEuler([0, 0, yaw]), physicsClientId=c)
        if texture is not None:
            p.changeVisualShape(body, -1, textureUniqueId=texture, rgbaColor=[1, 1, 1, 1], physicsClientId=c)

    def _build(self, route: Route, seed: int, traversal: int, look: Appearance, aliasing: float) -> None:
        p, c = self.p, self.client
        long_side, short_side, radius = route._sides
        self._box([0.0, 0.0, -0.05], [long_side / 2 + radius + 60, short_side / 2 + radius + 60, 0.05], 0.0,
                  [*look.grass, 1])  # grass
        self.copies = _copied_blocks(route.length_m, seed, aliasing)
        pavement = np.random.default_rng([seed, 5])

        def paving() -> np.ndarray:  # painted, so that blocks of the street differ
            return pavement.uniform(0.3, 0.9, 3)

        colours = {-1: paving(), 1: paving()}
        segments = np.arange(0.0, route.length_m, ROAD_SEGMENT_M)  # asphalt and pavements, in short pieces
        paint = []
        for _ in segments:
            for side in (-1, 1):  # each block of pavement has its own colour
                if pavement.random() < ROAD_SEGMENT_M / 20.0:
                    colours[side] = paving()
            paint.append(dict(colours))
        per_block = round(BLOCK_M / ROAD_SEGMENT_M)
        self.paint = []
        for j in range(len(segments)):  # a copied block takes the colours of its original
            block = j // per_block
            self.paint.append(paint[j - per_block * (block - self.copies.get(block, block))])
        for s, colours in zip(segments, self.paint):
            centre, heading = route.at(s + ROAD_SEGMENT_M / 2)
            normal = np.array([-math.sin(heading), math.cos(heading)])
            self._box([*centre, 0.005], [ROAD_SEGMENT_M / 2 + 0.3, ROAD_WIDTH_M / 2, 0.005], heading,
                      [0.27, 0.27, 0.29, 1])
            for side in (-1, 1):
                xy = centre + side * normal * (ROAD_WIDTH_M / 2 + PAVEMENT_WIDTH_M / 2)
                self._box([*xy, 0.06], [ROAD_SEGMENT_M / 2 + 0.3, PAVEMENT_WIDTH_M / 2, 0.06], heading,
                          [*look.recolour(colours[side]), 1])
        world = np.random.default_rng(seed)
        textures = [p.loadTexture(str(t), physicsClientId=c)
                    for t in _textures(world, self._texture_dir, 24, look.recolour)]
        pieces = []
        s = 0.0
        while s < route.length_m:  # buildings on both sides, every few metres
            for side in (-1, 1):
                if world.random() < 0.15:
                    continue
                offset = world.uniform(6.0, 8.0)  # a street: facades just behind the pavement
                half = (world.uniform(2.0, 5.0), world.uniform(1.5, 4.0), world.uniform(2.0, 9.0))
                texture = int(world.integers(len(textures))) if world.random() < 0.8 else None
                colour = tuple(world.uniform(0.2, 1.0, 3))
                pieces.append(_Piece(s, side, offset + half[1], half, world.uniform(-0.3, 0.3), colour, texture))
            if world.random() < 0.3:  # a pole by the road
                side, distance = int(world.choice([-1, 1])), world.uniform(3.5, 5.0)
                colour = tuple(world.uniform(0.0, 1.0, 3))
                pieces.append(_Piece(s, side, distance, (0.15, 0.15, 2.0), None, colour, None))
            s += world.uniform(3.0, 6.0)
        self.pieces = []
        for block in range(math.ceil(route.length_m / BLOCK_M)):  # each block its own pieces or a copy's
            source = self.copies.get(block, block)
            shift = BLOCK_M * (block - source)
            self.pieces += [replace(piece, s=piece.s + shift) for piece in pieces
                            if piece.s // BLOCK_M == source and piece.s + shift < route.length_m]
        for piece in self.pieces:
            centre, heading = route.at(piece.s)
            normal = np.array([-math.sin(heading), math.cos(heading)])
            xy = centre + piece.side * normal * piece.distance
            self._box([*xy, piece.half_extents[2]], list(piece.half_extents),
                      0.0 if piece.turn is None else heading + piece.turn, [*look.recolour(piece.colour), 1],
                      None if piece.texture is None else textures[piece.texture])
        clutter = np.random.default_rng([seed, traversal, 1])
        near, far = look.clutter_lateral_m
        for _ in range(int(route.length_m / 10 * look.clutter_per_10m)):
            centre, heading = route.at(clutter.uniform(0, route.length_m))
            normal = np.array([-math.sin(heading), math.cos(heading)])
            xy = centre + clutter.choice([-1, 1]) * normal * clutter.uniform(near, far)
            half = clutter.uniform(0.2, 0.7, 3)
            self._box([*xy, half[2]], list(half), clutter.uniform(0, math.pi), [*clutter.uniform(0, 1, 3), 1])
        parked = np.random.default_rng([seed, traversal, 8])
        for _ in range(int(route.length_m / 10 * look.parked_per_10m)):
            centre, heading = route.at(parked.uniform(0, route.length_m))
            normal = np.array([-math.sin(heading), math.cos(heading)])
            side = parked.choice([-1, 1])
            if parked.random() < 0.7:  # a car, parked half on the pavement
                half = [parked.uniform(1.9, 2.4), parked.uniform(0.8, 0.95), parked.uniform(0.65, 0.8)]
                distance, yaw = ROAD_WIDTH_M / 2 + 0.3, heading
            else:  # a wheelie bin on the pavement
                half = [0.3, 0.35, 0.55]
                distance, yaw = ROAD_WIDTH_M / 2 + parked.uniform(0.5, 1.5), heading + parked.uniform(-0.5, 0.5)
            xy = centre + side * normal * distance
            self._box([*xy, half[2]], half, yaw, [*parked.uniform(0, 1, 3), 1])

    def render(self, eye, target, width: int, height: int, light_direction, light_color,
               ambient) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """RGB (H, W, 3) uint8, the sky mask (H, W) bool (pixels that hit no object) and the depth (H, W)
        float32 in metres along the viewing axis."""
        p = self.p
        view = p.computeViewMatrix(eye, target, [0, 0, 1], physicsClientId=self.client)
        projection = p.computeProjectionMatrixFOV(70.0, width / height, NEAR_M, FAR_M, physicsClientId=self.client)
        _, _, rgba, depth_buffer, segmentation = p.getCameraImage(
            width, height, view, projection, renderer=p.ER_TINY_RENDERER, lightDirection=light_direction,
            lightColor=light_color, lightAmbientCoeff=ambient, lightDiffuseCoeff=0.6, lightSpecularCoeff=0.05,
            shadow=0, physicsClientId=self.client)
        rgb = np.asarray(rgba, dtype=np.uint8).reshape(height, width, 4)[:, :, :3]
        depth_buffer = np.asarray(depth_buffer, dtype=np.float32).reshape(height, width)
        depth_m = FAR_M * NEAR_M / (FAR_M - (FAR_M - NEAR_M) * depth_buffer)  # the OpenGL depth buffer, linearised
        return rgb, np.asarray(segmentation).reshape(height, width) < 0, depth_m

    def close(self) -> None:
        self.p.disconnect(physicsClientId=self.client)
        shutil.rmtree(self._texture_dir, ignore_errors=True)


DAY_SKY = ((95.0, 145.0, 215.0), (200.0, 220.0, 240.0))  # zenith, horizon (RGB)
DUSK_SKY = ((60.0, 70.0, 125.0), (240.0, 160.0, 95.0))
NIGHT_SKY = ((10.0, 14.0, 40.0), (35.0, 42.0, 80.0))
OVERCAST_SKY = ((165.0, 170.0, 180.0), (215.0, 218.0, 222.0))
FOG = (215.0, 218.0, 222.0)
GRASS = (0.33, 0.45, 0.28)


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

    def grade(self, rgb: np.ndarray, sky_mask: np.ndarray, depth_m: np.ndarray,
              noise: np.random.Generator) -> np.ndarray:
        """Paint the sky, fog, apply tint, gain and sensor noise: the final uint8 image."""
        image = rgb.astype(np.float32)
        # zenith colour at the top row, horizon colour a little above the image centre and below
        rows = np.clip(np.arange(rgb.shape[0], dtype=np.float32) / (0.45 * rgb.shape[0]), 0, 1)[:, None, None]
        gradient = (1 - rows) * np.float32(self.sky[0]) + rows * np.float32(self.sky[1])
        image = np.where(sky_mask[:, :, None], gradient, image)
        if self.fog_m > 0:  # haze: fading to the fog colour with depth, the sky all fog
            fog = np.where(sky_mask, 1.0, 1.0 - np.exp(-depth_m / self.fog_m))[:, :, None]
            image = (1 - fog) * image + fog * np.float32(FOG)
        image = image * self.tint * self.gain + noise.normal(0, self.noise, rgb.shape)
        return np.clip(image, 0, 255).astype(np.uint8)


def _odometry(typestore, stamp_ns: int, xy: np.ndarray, heading: float):
    T = typestore.types
    stamp = T["builtin_interfaces/msg/Time"](sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
    pose = T["geometry_msgs/msg/Pose"](
        position=T["geometry_msgs/msg/Point"](x=float(xy[0]), y=float(xy[1]), z=0.0),
        orientation=T["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=math.sin(heading / 2), w=math.cos(heading / 2)))
    zero = T["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0)
    twist = T["geometry_msgs/msg/Twist"](linear=T["geometry_msgs/msg/Vector3"](x=SPEED_M_S, y=0.0, z=0.0), angular=zero)
    return T["nav_msgs/msg/Odometry"](
        header=T["std_msgs/msg/Header"](stamp=stamp, frame_id="odom"), child_frame_id="base_link",
        pose=T["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=np.zeros(36)),
        twist=T["geometry_msgs/msg/TwistWithCovariance"](twist=twist, covariance=np.zeros(36)))


def simulate_route(out: str | Path, seed: int = 0, traversal: int = 0, frames: int = 100, width: int = 320,
                   height: int = 240, laps: int = 1, storage: str = "sqlite3", compressed: bool = False,
                   appearance_change: float = 0.6, route_length_m: float = 300.0, force: bool = False,
                   progress: bool = True, condition: str = "auto", aliasing: float = 0.0,
                   skip_arc: tuple[float, float] | None = None) -> Path:
    """Render one traversal into a rosbag2 directory at ``out`` and return its path.

    ``frames`` images per lap, evenly spaced along a closed route of ``route_length_m`` metres driven
    ``laps`` times at 5 m/s; ``/odom`` carries the exact vehicle pose at least three times per image and
    at 10 Hz or more, at stamps between the image stamps. The bag is written into a temp dir next to
    ``out`` and renamed into place; an existing ``out`` is replaced only with ``force``. Raises
    ConfigError on invalid arguments.

    ``condition`` (a key of ``CONDITIONS``) picks the change of appearance: "auto" scales a random one by
    ``appearance_change``; the others are hard changes (``appearance_change`` then only sets how much
    clutter stands along the street) with a changed drive on traversals >= 1. ``aliasing`` in [0, 1]
    makes that fraction of the 20 m street blocks copies of earlier ones (the same for every traversal
    of ``seed``). ``skip_arc=(start, end)``, fractions of the lap with 0 <= start < end <= 1, leaves out
    the images taken where the lap position is in [start, end); odometry goes on through the gap, and
    the other images are the same as without ``skip_arc``.
    """
    out = Path(out)
    if frames < 2 or width < 16 or height < 16 or laps < 1 or route_length_m < 50:
        raise ConfigError("simulate_route: need frames >= 2, width and height >= 16, laps >= 1, route length >= 50 m")
    if storage not in STORAGES:
        raise ConfigError(f"simulate_route: storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    if not 0.0 <= appearance_change <= 1.0:
        raise ConfigError(f"simulate_route: appearance change must be in [0, 1], got {appearance_change}")
    if traversal < 0:
        raise ConfigError(f"simulate_route: traversal must be >= 0, got {traversal}")
    if condition not in CONDITIONS:
        raise ConfigError(f"simulate_route: condition must be one of {', '.join(CONDITIONS)}, got {condition!r}")
    if not 0.0 <= aliasing <= 1.0:
        raise ConfigError(f"simulate_route: aliasing must be in [0, 1], got {aliasing}")
    if skip_arc is not None and not (len(skip_arc) == 2 and 0.0 <= skip_arc[0] < skip_arc[1] <= 1.0):
        raise ConfigError(f"simulate_route: skip_arc must be (start, end) with 0 <= start < end <= 1, got {skip_arc}")
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists (use --force to replace it)")

    route = Route(route_length_m)
    look = Appearance.for_traversal(seed, traversal, appearance_change, condition)
    noise = np.random.default_rng([seed, traversal, 4])
    spacing = route_length_m / frames
    image_period_ns = int(spacing / SPEED_M_S * 1e9)
    odom_per_image = max(MIN_ODOM_PER_IMAGE, math.ceil(image_period_ns / MAX_ODOM_PERIOD_NS))
    start_ns = (START_SEC + 3600 * traversal) * 10**9
    first_s = look.arc_offset * spacing
    total = frames * laps

    def arc_at(stamp_ns: int) -> float:
        return first_s + SPEED_M_S * (stamp_ns - start_ns) / 1e9

    def pose_at(stamp_ns: int) -> tuple[np.ndarray, float]:
        return look.vehicle_pose(route, arc_at(stamp_ns))

    def skipped(i: int) -> bool:
        lap_fraction = arc_at(start_ns + i * image_period_ns) % route_length_m / route_length_m
        return skip_arc is not None and skip_arc[0] <= lap_fraction < skip_arc[1]

    if all(skipped(i) for i in range(total)):
        raise ConfigError(f"simulate_route: skip_arc {skip_arc} leaves no image of the {frames} per lap")

    typestore = get_typestore(Stores.ROS2_HUMBLE)
    T = typestore.types

    world = _World(route, seed, traversal, look, aliasing)
    try:
        with atomic_directory(out) as bag_dir:
            bag_dir.rmdir()  # the rosbag2 writer creates its directory itself
            with Writer(bag_dir, version=9, storage_plugin=STORAGES[storage]) as writer:
                image_conn = writer.add_connection(IMAGE_TOPIC, "sensor_msgs/msg/Image", typestore=typestore)
                odom_conn = writer.add_connection(ODOM_TOPIC, "nav_msgs/msg/Odometry", typestore=typestore)
                jpeg_conn = (writer.add_connection(COMPRESSED_TOPIC, "sensor_msgs/msg/CompressedImage", typestore=typestore)
                             if compressed else None)
                for i in tqdm(range(total), desc=f"rendering {out.name}", unit="frame", disable=not progress):
                    stamp_ns = start_ns + i * image_period_ns
                    # Odometry at even steps, the first half a step before the image: no stamp coincides with
                    # an image stamp, so every image pose is interpolated.
                    for k in range(odom_per_image):
                        t = stamp_ns + (2 * k - 1) * image_period_ns // (2 * odom_per_image)
                        xy, heading = pose_at(t)
                        writer.write(odom_conn, t, typestore.serialize_cdr(_odometry(typestore, t, xy, heading),
                                                                          "nav_msgs/msg/Odometry"))
                    if skipped(i):  # no image, but the noise of later images stays as without skip_arc
                        noise.normal(0, look.noise, (height, width, 3))
                        continue
                    xy, yaw = pose_at(stamp_ns)
                    eye = [xy[0], xy[1], look.height_m]
                    target = [xy[0] + 10 * math.cos(yaw), xy[1] + 10 * math.sin(yaw), look.height_m + 0.5]  # 3 deg up
                    rgb, sky, depth = world.render(eye, target, width, height, look.light_direction, look.light_color,
                                                   look.ambient)
                    rgb = look.grade(rgb, sky, depth, noise)
                    header = T["std_msgs/msg/Header"](
                        stamp=T["builtin_interfaces/msg/Time"](sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9),
                        frame_id="camera")
                    image = T["sensor_msgs/msg/Image"](header=header, height=height, width=width, encoding="rgb8",
                                                       is_bigendian=0, step=width * 3, data=rgb.reshape(-1))
                    writer.write(image_conn, stamp_ns, typestore.serialize_cdr(image, "sensor_msgs/msg/Image"))
                    if jpeg_conn is not None:
                        _, jpeg = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
                        message = T["sensor_msgs/msg/CompressedImage"](header=header, format="jpeg", data=jpeg.reshape(-1))
                        writer.write(jpeg_conn, stamp_ns,
                                     typestore.serialize_cdr(message, "sensor_msgs/msg/CompressedImage"))
    finally:
        world.close()
    return out
