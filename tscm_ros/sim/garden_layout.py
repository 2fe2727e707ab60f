"""What stands where in the simulated garden, and the meshes of each thing.

The lap is cut into zones of 30-70 m, each a kind of garden (``ZONES``): a formal garden of hedges,
flowerbeds and topiary, woodland, an open lawn with benches and follies, a walled court. Within a zone,
things by the path and on the lawn behind it are drawn every 3-6 m from the zone's chances, so places in
one zone look alike and zones look different, as in a real park. A belt of tall trees stands outside
the loop. Everything here depends only on the route and the seed.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tscm_ros.sim.meshes import Mesh, box, load_obj, sphere
from tscm_ros.sim.route import Route

Surface = str | tuple[float, float, float]  # a texture's name or a flat RGB colour


@dataclass(frozen=True)
class Zone:
    """A kind of garden: the chance, per side of the path and step along it, of each thing bordering the
    path (``edge``) and standing on the lawn behind it (``lawn``; at most one of each), and the tree
    species that grow there."""

    edge: dict[str, float]
    lawn: dict[str, float]
    trees: tuple[str, ...]


ZONES = {
    "formal": Zone({"flowerbed": 0.45, "bench": 0.15, "lamp": 0.1}, {"hedge": 0.45, "topiary": 0.3, "sculpture": 0.1},
                   ("oak", "copper")),
    "woodland": Zone({"fence": 0.25, "rock": 0.15}, {"tree": 0.85, "rock": 0.1}, ("oak", "birch", "conifer", "copper")),
    "lawn": Zone({"bench": 0.2, "lamp": 0.12},
                 {"tree": 0.15, "pavilion": 0.07, "chess": 0.06, "duck": 0.04, "rock": 0.06}, ("oak", "birch")),
    "court": Zone({"wall": 0.85, "lamp": 0.1}, {"sculpture": 0.2, "pavilion": 0.1, "topiary": 0.25}, ("conifer",)),
}
ZONE_M = (30.0, 70.0)
SPECIES = {"oak": "foliage", "birch": "birch", "copper": "copper", "conifer": "conifer"}  # tree: its crown's texture
FLOWERS = ("roses", "lavender", "marigolds")  # the textures of flowerbeds
INSIDE_REACH_M = 13.5  # how far from the centre line things inside the loop reach, crowns included


@dataclass(frozen=True)
class Feature:
    """One thing in the garden: ``kind`` placed ``s`` metres along the route and ``distance`` to its ``side``
    (-1 right, 1 left, the inside of the loop), turned by ``turn`` from the route's heading; ``size`` in
    metres (its meaning depends on ``kind``), ``variant`` (which random mesh or shape) and ``style`` (a tree's
    species, a flowerbed's flowers, a topiary's shape) as drawn from the seed."""

    kind: str
    s: float
    side: int
    distance: float
    turn: float
    size: tuple[float, float, float]
    variant: int
    style: str = ""


def data_path() -> Path:
    """pybullet_data's folder of models and textures."""
    import pybullet_data

    return Path(pybullet_data.getDataPath())


def zones(route: Route, seed: int) -> tuple[list[float], list[str]]:
    """Where each zone starts along the lap and its kind (a key of ``ZONES``, never the same twice running)."""
    rng = np.random.default_rng([seed, 13])
    starts, kinds, s = [], [], 0.0
    while s < route.length_m:
        starts.append(s)
        kinds.append(str(rng.choice([k for k in ZONES if not kinds or k != kinds[-1]])))
        s += rng.uniform(*ZONE_M)
    return starts, kinds


def _draw(kind: str, near: bool, zone: Zone, rng: np.random.Generator) -> tuple[float, tuple, float, str]:
    """Distance from the centre line, size, turn and style of a new ``kind`` by the path (``near``) or on the lawn."""
    u = rng.uniform
    if kind == "hedge":  # by the path, or across the lawn
        distance = u(4.0, 4.6) if near else u(6.0, 8.0)
        return distance, (u(1.5, 4.0), 0.45, u(0.4, 0.9)), 0.0, ""
    if kind == "wall":
        return u(4.0, 4.6), (u(2.5, 4.0), 0.3, u(0.4, 1.1)), 0.0, ""
    if kind == "fence":
        return u(3.8, 4.4), (u(2.0, 4.0), 0.05, 0.55), 0.0, ""
    if kind == "bench":
        return 3.7, (0.9, 0.3, 0.45), 0.0, ""
    if kind == "lamp":
        return 3.5, (0.07, 0.07, u(1.6, 2.0)), 0.0, ""
    if kind == "rock":
        low, high = ((0.3, 0.7), (0.2, 0.5)) if near else ((0.5, 1.2), (0.3, 0.8))
        return (u(4.2, 5.0) if near else u(5.5, 10.0)), (u(*low), u(*low), u(*high)), u(0, 2 * math.pi), ""
    if kind == "tree":
        return u(7.0, 11.0), (u(1.2, 2.5), u(1.2, 2.5), u(1.8, 3.5)), u(0, 2 * math.pi), str(rng.choice(zone.trees))
    if kind == "flowerbed":
        return u(4.3, 4.8), (u(1.0, 2.5), u(0.5, 0.9), 0.15), 0.0, str(rng.choice(FLOWERS))
    if kind == "topiary":
        return u(5.5, 8.0), (u(0.5, 0.9), 0.0, u(1.0, 2.2)), 0.0, str(rng.choice(["ball", "cone"]))
    if kind == "sculpture":
        return u(6.0, 9.0), (0.5, 0.5, u(0.8, 1.6)), u(0, 2 * math.pi), ""
    if kind == "pavilion":
        return u(8.0, 10.0), (2.2, 2.2, 2.8), u(-0.3, 0.3), ""
    if kind == "chess":
        return u(6.5, 8.0), (1.6, 1.6, 0.01), u(-0.3, 0.3), ""
    if kind == "duck":
        return u(7.0, 10.0), (1.5, 1.5, 2.5), u(0, 2 * math.pi), ""
    raise ValueError(f"no such feature kind {kind!r}")


def layout(route: Route, seed: int) -> list[Feature]:
    """The garden's features along the lap, from ``seed``."""
    rng = np.random.default_rng([seed, 10])
    starts, kinds = zones(route, seed)
    features = []

    def pick(chances: dict[str, float]) -> str | None:
        roll = rng.random()
        for kind, chance in chances.items():
            if roll < chance:
                return kind
            roll -= chance
        return None

    def add(kind: str, s: float, side: int, near: bool, zone: Zone) -> None:
        distance, size, turn, style = _draw(kind, near, zone, rng)
        features.append(Feature(kind, float(s), side, float(distance), float(turn), tuple(float(v) for v in size),
                                int(rng.integers(1000)), style))

    s = 0.0
    while s < route.length_m:
        zone = ZONES[kinds[bisect.bisect_right(starts, s) - 1]]
        for side in (-1, 1):
            for near, chances in ((True, zone.edge), (False, zone.lawn)):
                kind = pick(chances)
                if kind is not None:
                    add(kind, s, side, near, zone)
            if side == -1 and rng.random() < 0.4:  # a belt of tall trees outside the loop
                features.append(Feature("tree", float(s), -1, float(rng.uniform(18.0, 28.0)),
                                        float(rng.uniform(0, 2 * math.pi)),
                                        (float(rng.uniform(2.5, 4.5)), float(rng.uniform(2.5, 4.5)),
                                         float(rng.uniform(3.0, 6.0))), int(rng.integers(1000)),
                                        str(rng.choice(list(SPECIES)))))
        s += rng.uniform(3.0, 6.0)
    return features


def blob(variant: int) -> Mesh:
    """pybullet_data's random mesh number ``variant`` (0-999), scaled into a unit cube standing on z = 0."""
    mesh = load_obj(data_path() / "random_urdfs" / f"{variant:03d}" / f"{variant:03d}.obj")
    return mesh.scaled(1.0 / mesh.extent).standing()


def _crown(variant: int, cone: bool = False, rough: float = 0.11) -> Mesh:
    """A crown of leaves: a sphere of unit diameter standing on z = 0, bulging and dented by ``rough`` times a
    few waves drawn from ``variant``; a ``cone`` narrows to its top."""
    rng = np.random.default_rng([variant, 12])
    ball = sphere(7, 12)
    waves = rng.normal(0, 2.5, (4, 3))
    bulge = 1 + rough * np.sin(ball.vertices @ waves.T + rng.uniform(0, 2 * math.pi, 4)).sum(axis=1)
    vertices = ball.vertices * bulge[:, None] * 0.5
    if cone:
        vertices[:, :2] *= (0.55 - vertices[:, 2:]) * 1.6
    return Mesh(vertices, ball.faces, ball.uvs, ball.normals).smoothed().standing()


def combined(*meshes: Mesh) -> Mesh:
    """One mesh of several."""
    offsets = np.cumsum([0] + [len(m.vertices) for m in meshes[:-1]])
    return Mesh(np.vstack([m.vertices for m in meshes]), np.vstack([m.faces + o for m, o in zip(meshes, offsets)]),
                np.vstack([m.uvs for m in meshes]), np.vstack([m.normals for m in meshes]))


def moved(mesh: Mesh, x: float, y: float, z: float) -> Mesh:
    """``mesh`` moved by (x, y, z)."""
    return Mesh(mesh.vertices + [x, y, z], mesh.faces, mesh.uvs, mesh.normals)


def parts(feature: Feature) -> list[tuple[Mesh, Surface]]:
    """The meshes of ``feature`` in its own frame (x along the path, z up from the ground), each with its
    surface."""
    a, b, c = feature.size
    kind = feature.kind
    if kind in ("hedge", "wall"):
        return [(moved(box((a, b, c), 1.2 if kind == "hedge" else 1.0), 0, 0, c),
                 "foliage" if kind == "hedge" else "stone")]
    if kind == "fence":
        posts = [moved(box((0.05, 0.05, c), 0.6), x, 0, c) for x in np.arange(-a, a + 0.01, 1.2)]
        rails = [moved(box((a, b, 0.06), 0.6), 0, 0, z) for z in (0.3 * c, 0.8 * c)]
        return [(combined(*posts, *rails), "wood")]
    if kind == "bench":
        seat = moved(box((a, b, 0.04), 0.5), 0, 0, c)
        back = moved(box((a, 0.03, 0.2), 0.5), 0, b * feature.side, c + 0.3)  # on the side away from the path
        legs = [moved(box((0.04, b, c / 2), 0.5), x, 0, c / 2) for x in (-0.8 * a, 0.8 * a)]
        return [(combined(seat, back, *legs), "wood")]
    if kind == "lamp":
        return [(moved(box((a, b, c), 1.0), 0, 0, c), (0.12, 0.12, 0.13)),
                (moved(box((0.18, 0.18, 0.22), 1.0), 0, 0, 2 * c + 0.2), (0.95, 0.92, 0.75))]
    if kind == "tree":
        conifer = feature.style == "conifer"
        crown = _crown(feature.variant, conifer).scaled((2 * a, 2 * b, (3.0 if conifer else 1.8) * max(a, b)))
        trunk = moved(box((0.08 * a, 0.08 * a, c / 2), 0.8), 0, 0, c / 2)
        return [(trunk, "bark"), (moved(crown.projected(1.5), 0, 0, (0.4 if conifer else 0.8) * c),
                                  SPECIES[feature.style])]
    if kind == "rock":
        return [(moved(blob(feature.variant).scaled((2 * a, 2 * b, 2 * c)).projected(1.0), 0, 0, -0.1), "stone")]
    if kind == "flowerbed":
        return [(moved(box((a, b, c), 0.6), 0, 0, c), feature.style)]
    if kind == "topiary":  # clipped evergreens
        if feature.style == "cone":
            shape = _crown(feature.variant, cone=True, rough=0.0).scaled((2 * a, 2 * a, c))
        else:
            shape = moved(sphere(7, 12).scaled(a), 0, 0, a)
        return [(shape.projected(0.8), "conifer")]
    if kind == "sculpture":
        figure = moved(blob(feature.variant).scaled((c * 0.8, c * 0.8, c)).projected(0.8), 0, 0, 2 * b)
        return [(moved(box((a, b, b), 0.8), 0, 0, b), "stone"), (figure, "metal")]
    if kind == "pavilion":
        posts = [moved(box((0.1, 0.1, c / 2), 0.6), x, y, c / 2) for x in (-a, a) for y in (-b, b)]
        return [(combined(*posts), "wood"), (moved(box((a + 0.4, b + 0.4, 0.12), 1.0), 0, 0, c), "planks")]
    if kind == "chess":
        return [(moved(box((a, b, c), a / 2), 0, 0, c), "checker")]
    if kind == "duck":
        duck = load_obj(data_path() / "duck.obj", y_up=True)
        duck = duck.scaled(np.array([2 * a, 2 * b, c]) / duck.extent).standing()
        return [(moved(box((0.8 * a, 0.8 * b, 0.2), 1.0), 0, 0, 0.2), "stone"), (moved(duck, 0, 0, 0.4), "duck")]
    raise ValueError(f"no such feature kind {kind!r}")
