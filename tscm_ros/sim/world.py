"""The simulated town in pybullet: the street (road, pavements, buildings, poles, clutter), and
what every world shares: the ``Scene`` base class with its offscreen rendering, and the street blocks that
aliasing copies.

The street depends only on ``seed`` and ``aliasing``; surface colours and clutter come from the
traversal's ``Appearance``. Rendering is pybullet's CPU TinyRenderer, so the same arguments give
byte-identical images.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from tscm_ros.sim.meshes import Mesh
from tscm_ros.sim.route import Route

if TYPE_CHECKING:
    from tscm_ros.sim.appearance import Appearance

ROAD_WIDTH_M = 7.0
ROAD_SEGMENT_M = 4.0
PAVEMENT_WIDTH_M = 2.0
NEAR_M, FAR_M = 0.1, 150.0  # camera clipping planes
FOV_DEG = 70.0  # the camera's vertical field of view
BLOCK_M = 20.0  # the street blocks that aliasing copies; a multiple of ROAD_SEGMENT_M


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


def copied_blocks(length_m: float, seed: int, aliasing: float) -> dict[int, int]:
    """Perceptual aliasing: which street blocks (``BLOCK_M`` long, numbered from the start of the lap)
    copy which earlier original block; ``aliasing`` of all blocks (rounded), chosen from ``seed``."""
    blocks = math.ceil(length_m / BLOCK_M)
    rng = np.random.default_rng([seed, 6])
    copies = rng.choice(np.arange(1, blocks), size=min(blocks - 1, round(aliasing * blocks)), replace=False)
    originals = [block for block in range(blocks) if block not in copies]
    return {int(block): int(rng.choice([b for b in originals if b < block])) for block in sorted(copies)}


def copy_blocks(pieces: list, copies: dict[int, int], length_m: float) -> list:
    """The layout along a lap of ``length_m`` with aliasing: each street block keeps its own ``pieces``
    (dataclasses placed ``s`` metres along the route) or takes those of the block it copies, shifted."""
    placed = []
    for block in range(math.ceil(length_m / BLOCK_M)):
        source = copies.get(block, block)
        shift = BLOCK_M * (block - source)
        placed += [replace(piece, s=piece.s + shift) for piece in pieces
                   if piece.s // BLOCK_M == source and piece.s + shift < length_m]
    return placed


class Scene:
    """A pybullet scene built from a route, ``seed``, the traversal's ``Appearance`` and ``aliasing``, rendered
    offscreen. Subclasses build their content in ``_build``; textures they write go to a temporary folder
    that ``close`` removes."""

    summary = ""  # what the world is, in a line (the command line's --help)

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

    def _build(self, route: Route, seed: int, traversal: int, look: Appearance, aliasing: float) -> None:
        raise NotImplementedError

    def _box(self, position, half_extents, yaw, rgba, texture=None) -> None:
        p, c = self.p, self.client
        visual = p.createVisualShape(p.GEOM_BOX, halfExtents=half_extents, rgbaColor=rgba, physicsClientId=c)
        body = p.createMultiBody(0, -1, visual, basePosition=position,
                                 baseOrientation=p.getQuaternionFromEuler([0, 0, yaw]), physicsClientId=c)
        if texture is not None:
            p.changeVisualShape(body, -1, textureUniqueId=texture, rgbaColor=[1, 1, 1, 1], physicsClientId=c)

    def _mesh(self, mesh: Mesh, position, yaw: float, rgba, texture: int | None = None) -> None:
        """A body of ``mesh`` at ``position`` turned by ``yaw``; textured (then ``rgba`` is ignored) or flat."""
        p, c = self.p, self.client
        visual = p.createVisualShape(p.GEOM_MESH, vertices=mesh.vertices.tolist(), indices=mesh.faces.ravel().tolist(),
                                     uvs=mesh.uvs.tolist(), normals=mesh.normals.tolist(),
                                     rgbaColor=[1, 1, 1, 1] if texture is not None else rgba, physicsClientId=c)
        body = p.createMultiBody(0, -1, visual, basePosition=position,
                                 baseOrientation=p.getQuaternionFromEuler([0, 0, yaw]), physicsClientId=c)
        if texture is not None:
            p.changeVisualShape(body, -1, textureUniqueId=texture, rgbaColor=[1, 1, 1, 1], physicsClientId=c)

    def _texture(self, image: np.ndarray, name: str) -> int:
        """An RGB uint8 image loaded as a pybullet texture."""
        path = self._texture_dir / f"{name}.png"
        cv2.imwrite(str(path), image[:, :, ::-1])
        return self.p.loadTexture(str(path), physicsClientId=self.client)

    def render(self, eye, target, width: int, height: int, light_direction, light_color,
               ambient) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """RGB (H, W, 3) uint8, the sky mask (H, W) bool (pixels that hit no object) and the depth (H, W)
        float32 in metres along the viewing axis."""
        p = self.p
        view = p.computeViewMatrix(eye, target, [0, 0, 1], physicsClientId=self.client)
        projection = p.computeProjectionMatrixFOV(FOV_DEG, width / height, NEAR_M, FAR_M, physicsClientId=self.client)
        _, _, rgba, depth_buffer, segmentation = p.getCameraImage(
            width, height, view, projection, renderer=p.ER_TINY_RENDERER, lightDirection=light_direction,
            lightColor=light_color, lightAmbientCoeff=ambient, lightDiffuseCoeff=0.6, lightSpecularCoeff=0.05,
            shadow=0, physicsClientId=self.client)
        rgb = np.asarray(rgba, dtype=np.uint8).reshape(height, width, 4)[:, :, :3]
        depth_buffer = np.asarray(depth_buffer, dtype=np.float32).reshape(height, width)
        depth_m = FAR_M * NEAR_M / (FAR_M - (FAR_M - NEAR_M) * depth_buffer)  # the OpenGL depth buffer, linearised
        return rgb, np.asarray(segmentation).reshape(height, width) < 0, depth_m

    def clouds(self, eye, target, width: int, height: int) -> np.ndarray | None:
        """Cloud cover (H, W) in [0, 1] over the sky of a view, for ``Appearance.grade``; None: a clear sky."""
        return None

    def close(self) -> None:
        self.p.disconnect(physicsClientId=self.client)
        shutil.rmtree(self._texture_dir, ignore_errors=True)


class World(Scene):
    """The town: ground, road-side buildings and poles from ``seed`` and ``aliasing``; surface colours and
    clutter from the traversal's ``Appearance``.

    ``copies`` maps each copied street block to the block it copies; ``pieces`` (buildings and poles) and
    ``paint`` (the right and left pavement colours of each road segment) are the layout as built.
    """

    summary = ("a street of flat-shaded buildings with procedural facades, poles and pavements in blocks of "
               "colour on an asphalt road")

    def _build(self, route: Route, seed: int, traversal: int, look: Appearance, aliasing: float) -> None:
        p, c = self.p, self.client
        long_side, short_side, radius = route.sides
        self._box([0.0, 0.0, -0.05], [long_side / 2 + radius + 60, short_side / 2 + radius + 60, 0.05], 0.0,
                  [*look.grass, 1])  # grass
        self.copies = copied_blocks(route.length_m, seed, aliasing)
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
        self.pieces = copy_blocks(pieces, self.copies, route.length_m)
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
