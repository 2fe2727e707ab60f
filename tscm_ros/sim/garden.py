"""The simulated garden in pybullet: a second world, unlike the town, for benchmarks held out from
everything tuned in the town.

A gravel path loops over a mown lawn through the zones of a park (formal garden, woodland, open lawn,
walled court: tscm_ros/sim/garden_layout.py); inside the loop, where the route is long enough,
stands a temple (pybullet_data's samurai monastery, its largest faces). Surfaces are pictures from
pybullet_data (photographs of stadium grass, wood and weathered metal; a terrain map as leaves and
flowers), lit by a low warm sun (the condition's light, turned and lowered), under clouds that are the
same on every traversal of a seed. The layout by the path comes in the town's 20 m blocks, so
``aliasing`` copies blocks the same way (the temple and the lawn are not copied). Clutter is irregular
small objects in random colours, placed anew on each traversal; the "clutter" condition adds picnic
tables and crates by the path; "season" gives the lawn the condition's grass colour and recolours every
other texture as it recolours the town.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import cv2
import numpy as np

from tscm_ros.sim.appearance import GRASS
from tscm_ros.sim.garden_layout import INSIDE_REACH_M, blob, combined, data_path, layout, moved, parts
from tscm_ros.sim.meshes import box, load_obj, strip, turned
from tscm_ros.sim.route import Route
from tscm_ros.sim.world import FOV_DEG, Scene, copied_blocks, copy_blocks

if TYPE_CHECKING:
    from tscm_ros.sim.appearance import Appearance

PATH_HALF_WIDTH_M = 3.0  # a drive 1-2 m off the centre line, with its weave, stays on the gravel

SUN_TURN_RAD, SUN_ELEVATION_SCALE = 2.4, 0.45  # the garden's sun: from another side than the town's, lower
SUN_COLOUR = (1.0, 0.9, 0.76)  # a warm afternoon light, multiplying the condition's light colour
AMBIENT_DROP = 0.12  # deeper shade than in the town
CLOUD_HEIGHT_M, CLOUD_TILE_M = 600.0, 1500.0


class Source(NamedTuple):
    """Where a texture comes from: a pybullet_data ``file``, cropped to ``crop`` (top, bottom, left, right as
    fractions), resized to ``size`` pixels square, made ``grey`` or not, scaled by the RGB ``gain`` and
    ``mirrored`` into a seamless tile or not (for photographs that do not repeat seamlessly by themselves)."""

    file: str
    crop: tuple[float, float, float, float] = (0, 1, 0, 1)
    size: int = 128
    gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    mirrored: bool = False
    grey: bool = False


GRASS_PHOTO = "roboschool/models_outdoor/stadium/stadium_grass.jpg"
LEAVES, LEAF_CROP = "heightmaps/gimp_overlay_out.png", (0, 0.3, 0, 0.3)  # a terrain map that looks like leaves
SOURCES = {
    "grass": Source(GRASS_PHOTO, size=256),
    "gravel": Source(GRASS_PHOTO, (0, 0.5, 0, 0.5), gain=(2.4, 2.1, 1.65), mirrored=True, grey=True),
    "foliage": Source(LEAVES, LEAF_CROP, gain=(0.55, 0.75, 0.45), mirrored=True),
    "birch": Source(LEAVES, LEAF_CROP, gain=(0.85, 1.05, 0.45), mirrored=True),
    "copper": Source(LEAVES, LEAF_CROP, gain=(0.75, 0.42, 0.45), mirrored=True),
    "conifer": Source(LEAVES, LEAF_CROP, gain=(0.3, 0.55, 0.45), mirrored=True),
    "roses": Source(LEAVES, LEAF_CROP, gain=(1.6, 0.35, 0.45), mirrored=True),
    "lavender": Source(LEAVES, LEAF_CROP, gain=(0.95, 0.6, 1.5), mirrored=True),
    "marigolds": Source(LEAVES, LEAF_CROP, gain=(1.7, 1.1, 0.2), mirrored=True),
    "stone": Source("tray/tray.jpg", (0.1, 0.8, 0, 0.16), gain=(0.95, 0.93, 0.88), mirrored=True),
    "metal": Source("tray/tray.jpg", (0.3, 0.7, 0.3, 0.7), gain=(0.8, 0.85, 0.9), mirrored=True),
    "bark": Source("tray/tray.jpg", (0.82, 1, 0.1, 0.9), 64, (0.75, 0.55, 0.4), mirrored=True),
    "wood": Source("table/table.png", gain=(0.9, 0.75, 0.6)),
    "planks": Source("jenga/jenga.png", (0.55, 1, 0, 1)),
    "checker": Source("checker_grid.jpg", gain=(0.9, 0.88, 0.82)),
    "duck": Source("duckCM.png"),
}


def photo(name: str) -> np.ndarray:
    """The texture ``name`` of ``SOURCES``: RGB in [0, 1], cropped, resized and colour-balanced."""
    source = SOURCES[name]
    image = cv2.imread(str(data_path() / source.file), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"pybullet_data has no {source.file}")
    rows, cols = image.shape[:2]
    top, bottom, left, right = source.crop
    image = image[int(top * rows):int(bottom * rows), int(left * cols):int(right * cols), ::-1]
    if source.grey:
        image = np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2)
    if source.mirrored:
        image = _mirrored(cv2.resize(image, (source.size // 2, source.size // 2), interpolation=cv2.INTER_AREA))
    else:
        image = cv2.resize(image, (source.size, source.size), interpolation=cv2.INTER_AREA)
    return np.clip(image / 255.0 * np.array(source.gain), 0, 1)


def _mirrored(image: np.ndarray) -> np.ndarray:
    """Twice the size: ``image`` beside and below its mirror images, a tile that repeats without seams."""
    return np.vstack([np.hstack([image, image[:, ::-1]]), np.hstack([image[::-1], image[::-1, ::-1]])])


class Garden(Scene):
    """The garden world (see the module's description): the layout from ``seed`` and ``aliasing``, colours,
    light and clutter from the traversal's ``Appearance``.

    ``copies`` maps each copied block to the block it copies, as in the town; ``features`` is the layout as
    built (``Feature`` values, blocks copied).
    """

    summary = ("a gravel path through a park (hedges, stone walls, fences, benches, trees, rocks, sculptures, "
               "a temple inside the loop) in photographic textures from pybullet_data, a low warm sun, clouds")

    def _build(self, route: Route, seed: int, traversal: int, look: Appearance, aliasing: float) -> None:
        grass = photo("grass")
        if tuple(look.grass) != GRASS:  # another season: the lawn takes the condition's colour
            grass = np.clip(grass / grass.mean(axis=(0, 1)) * np.array(look.grass), 0, 1)
        textures = {"grass": grass, **{name: look.recolour(photo(name)) for name in SOURCES if name != "grass"}}
        self._textures = {name: self._texture(np.rint(image * 255).astype(np.uint8), name)
                          for name, image in textures.items()}
        long_side, short_side, radius = route.sides
        half = (long_side / 2 + radius + 80, short_side / 2 + radius + 80)
        lawn = strip(np.array([[-half[0], -half[1]], [-half[0], half[1]]]), np.array([[half[0], -half[1]], half]),
                     np.array([0.0, 2 * half[1]]), 2 * half[0], 8.0)
        self._mesh(lawn, [0, 0, 0], 0.0, [1, 1, 1, 1], self._textures["grass"])
        along = np.arange(0.0, route.length_m + 0.5, 1.0)
        edges = {side: np.array([route.beside(s, side * PATH_HALF_WIDTH_M)[0] for s in along]) for side in (-1, 1)}
        self._mesh(strip(edges[1], edges[-1], along, 2 * PATH_HALF_WIDTH_M, 3.0, 0.01), [0, 0, 0], 0.0,
                   [1, 1, 1, 1], self._textures["gravel"])
        self._temple(route)
        self.copies = copied_blocks(route.length_m, seed, aliasing)
        self.features = copy_blocks(layout(route, seed), self.copies, route.length_m)
        for feature in self.features:
            xy, heading = route.beside(feature.s, feature.side * feature.distance)
            for mesh, surface in parts(feature):
                if isinstance(surface, str):
                    self._mesh(turned(mesh, heading + feature.turn), [*xy, 0.0], 0.0, [1, 1, 1, 1],
                               self._textures[surface])
                else:
                    self._mesh(turned(mesh, heading + feature.turn), [*xy, 0.0], 0.0, [*look.recolour(surface), 1])
        self._clutter(route, seed, traversal, look)
        clouds = _mirrored(cv2.imread(str(data_path() / "heightmaps" / "wm_height_out.png"), cv2.IMREAD_GRAYSCALE))
        shift = np.random.default_rng([seed, 11]).integers(clouds.shape[0], size=2)
        self._clouds = np.float32(np.roll(clouds[8:-8, 8:-8] / 255.0, tuple(shift), axis=(0, 1)))

    def _temple(self, route: Route) -> None:
        """The monastery in the middle of the loop, scaled to leave a lawn between it and the path; none on
        routes too short for it."""
        long_side, short_side, radius = route.sides
        temple = load_obj(data_path() / "samurai_monastry.obj", y_up=True).largest_faces(4000).standing()
        scale = min(0.6, (short_side / 2 + radius - INSIDE_REACH_M - 1.0) / (temple.extent[1] / 2))
        if scale < 0.1:
            return
        self._mesh(temple.scaled(scale).projected(1.5), [0, 0, -0.05], 0.0, [1, 1, 1, 1], self._textures["stone"])

    def _clutter(self, route: Route, seed: int, traversal: int, look: Appearance) -> None:
        """Small irregular objects in random colours, placed anew on every traversal, and with the "clutter"
        condition picnic tables and crates by the path."""
        rng = np.random.default_rng([seed, traversal, 1])
        near, far = look.clutter_lateral_m
        for _ in range(int(route.length_m / 10 * look.clutter_per_10m)):
            s, side, distance = rng.uniform(0, route.length_m), rng.choice([-1, 1]), rng.uniform(near, far)
            xy, heading = route.beside(s, side * distance)
            mesh = blob(int(rng.integers(1000))).scaled(rng.uniform(0.3, 1.0, 3))
            self._mesh(mesh, [*xy, 0.0], rng.uniform(0, 2 * math.pi), [*rng.uniform(0, 1, 3), 1])
        parked = np.random.default_rng([seed, traversal, 8])
        for _ in range(int(route.length_m / 10 * look.parked_per_10m)):
            s, side = parked.uniform(0, route.length_m), parked.choice([-1, 1])
            xy, heading = route.beside(s, side * (PATH_HALF_WIDTH_M + parked.uniform(0.8, 1.4)))  # clear of the drive
            if parked.random() < 0.6:  # a picnic table
                top = moved(box((0.9, 0.4, 0.04), 0.6), 0, 0, 0.74)
                legs = [moved(box((0.04, 0.35, 0.37), 0.6), x, 0, 0.37) for x in (-0.7, 0.7)]
                benches = [moved(box((0.9, 0.14, 0.03), 0.6), 0, y, 0.45) for y in (-0.65, 0.65)]
                mesh, texture = combined(top, *legs, *benches), "wood"
            else:  # a crate
                size = parked.uniform(0.25, 0.45)
                mesh, texture = moved(box((size, size, size), 0.5), 0, 0, size), "planks"
            self._mesh(turned(mesh, heading + parked.uniform(-0.5, 0.5)), [*xy, 0.0], 0.0, [1, 1, 1, 1],
                       self._textures[texture])

    def render(self, eye, target, width: int, height: int, light_direction, light_color,
               ambient) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As the town renders, but under the garden's sun: turned, lower, warmer, with deeper shade."""
        x, y, z = light_direction
        c, s = math.cos(SUN_TURN_RAD), math.sin(SUN_TURN_RAD)
        sun = [c * x - s * y, s * x + c * y, SUN_ELEVATION_SCALE * z]
        colour = [v * w for v, w in zip(light_color, SUN_COLOUR)]
        return super().render(eye, target, width, height, sun, colour, max(0.05, ambient - AMBIENT_DROP))

    def clouds(self, eye, target, width: int, height: int) -> np.ndarray:
        """Cloud cover where each pixel's ray meets a layer of cloud ``CLOUD_HEIGHT_M`` up, thinning to the
        horizon (seen by the camera of ``render``)."""
        eye, target = np.asarray(eye, float), np.asarray(target, float)
        forward = (target - eye) / np.linalg.norm(target - eye)
        right = np.cross(forward, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        up = np.cross(right, forward)
        tan_half = math.tan(math.radians(FOV_DEG / 2))
        u = ((np.arange(width) + 0.5) / width * 2 - 1) * tan_half * width / height
        v = (1 - (np.arange(height) + 0.5) / height * 2) * tan_half
        rays = forward + u[None, :, None] * right + v[:, None, None] * up  # (H, W, 3)
        rise = np.maximum(rays[..., 2], 1e-3)
        reach = (CLOUD_HEIGHT_M - eye[2]) / rise
        size = self._clouds.shape[0]
        map_x = np.float32((eye[0] + reach * rays[..., 0]) / CLOUD_TILE_M * size % size)
        map_y = np.float32((eye[1] + reach * rays[..., 1]) / CLOUD_TILE_M * size % size)
        density = cv2.remap(self._clouds, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
        cover = np.clip((density - 0.45) / 0.3, 0, 1)
        return cover * np.clip((rays[..., 2] / np.linalg.norm(rays, axis=2) - 0.02) / 0.15, 0, 1)
