"""Triangle meshes for the simulated worlds: Wavefront OBJ files read into arrays, textured boxes, texture
coordinates projected onto meshes that have none, and the largest faces of a heavy mesh.

A ``Mesh`` has one vertex per face corner, so every face can carry its own texture coordinates; the
normals are smooth (averaged over the faces that share a position), so curved shapes shade smoothly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Mesh:
    """Triangles: ``vertices`` (N, 3) in metres, ``faces`` (M, 3) vertex indices, ``uvs`` (N, 2) texture
    coordinates (1 = one texture width; larger values repeat it), ``normals`` (N, 3) unit vectors."""

    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    normals: np.ndarray

    @property
    def extent(self) -> np.ndarray:
        """The size of the bounding box along x, y and z."""
        return self.vertices.max(axis=0) - self.vertices.min(axis=0)

    def scaled(self, scale) -> Mesh:
        """Scaled about the origin by ``scale`` (a number or one per axis); normals follow."""
        scale = np.broadcast_to(np.asarray(scale, float), (3,))
        return Mesh(self.vertices * scale, self.faces, self.uvs, _unit(self.normals / scale))

    def standing(self) -> Mesh:
        """Moved so that it is centred over the origin in x and y and its lowest point is at z = 0."""
        low, high = self.vertices.min(axis=0), self.vertices.max(axis=0)
        return Mesh(self.vertices - [(low[0] + high[0]) / 2, (low[1] + high[1]) / 2, low[2]], self.faces, self.uvs,
                    self.normals)

    def projected(self, tile_m: float) -> Mesh:
        """Texture coordinates projected along each face's main axis, one texture repeat per ``tile_m`` metres."""
        corners = self.vertices[self.faces]  # (M, 3, 3)
        axis = np.abs(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])).argmax(axis=1)
        planes = np.array([[1, 2], [0, 2], [0, 1]])[axis]  # the two coordinates across each face
        uvs = np.take_along_axis(corners, planes[:, None, :], axis=2) / tile_m
        return Mesh(corners.reshape(-1, 3), np.arange(corners.shape[0] * 3).reshape(-1, 3), uvs.reshape(-1, 2),
                    self.normals[self.faces].reshape(-1, 3))

    def smoothed(self) -> Mesh:
        """Normals recomputed from the faces, averaged over the corners at one position."""
        corners = self.vertices[self.faces]
        face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
        _, position = np.unique(np.round(self.vertices, 6), axis=0, return_inverse=True)
        position = position.reshape(-1)
        smooth = np.zeros((position.max() + 1, 3))
        np.add.at(smooth, position[self.faces.reshape(-1)], np.repeat(face_normals, 3, axis=0))
        return Mesh(self.vertices, self.faces, self.uvs, _unit(smooth)[position])

    def largest_faces(self, count: int) -> Mesh:
        """Only the ``count`` faces of largest area (all of them if fewer): a light stand-in for a heavy mesh."""
        corners = self.vertices[self.faces]
        area = np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
        return Mesh(self.vertices, self.faces[np.sort(np.argsort(-area, kind="stable")[:count])], self.uvs,
                    self.normals)


def _unit(vectors: np.ndarray) -> np.ndarray:
    length = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(length > 0, length, 1.0)


@lru_cache(maxsize=64)
def load_obj(path: Path, y_up: bool = False) -> Mesh:
    """The triangles of an OBJ file (polygons fanned into triangles), with its texture coordinates where it has
    them (zeros where not) and smooth normals; ``y_up`` turns a y-up model to z-up. Every face corner must
    name its vertex the same way ("v", "v/vt", "v//vn" or "v/vt/vn"), as in pybullet_data's models."""
    positions, texcoords, triangles = [], [], []
    with open(path) as obj:
        for line in obj:
            kind, _, rest = line.partition(" ")
            if kind == "v":
                positions.append(rest.split()[:3])
            elif kind == "vt":
                texcoords.append(rest.split()[:2])
            elif kind == "f":
                refs = rest.split()
                triangles += [f"{refs[0]} {refs[k]} {refs[k + 1]}" for k in range(1, len(refs) - 1)]  # a fan
    vertices = np.array(positions, float)
    if y_up:
        vertices = vertices[:, [0, 2, 1]] * [1, -1, 1]
    text = " ".join(triangles).replace("//", "/0/")
    fields = text.split(" ", 1)[0].count("/") + 1
    if text.count("/") != 3 * len(triangles) * (fields - 1):
        raise ValueError(f"{path}: face corners name their vertices in more than one way")
    corners = np.fromstring(text.replace("/", " "), dtype=np.int64, sep=" ").reshape(-1, fields)
    position = corners[:, 0] - 1
    position = np.where(position < 0, position + len(vertices) + 1, position)  # negative: counted from the end
    uv_table = np.vstack([np.array(texcoords, float).reshape(-1, 2), np.zeros((1, 2))])  # index -1: zeros
    uv = corners[:, 1] - 1 if fields > 1 else np.full(len(corners), -1)
    uv = np.where(uv < -1, uv + len(texcoords) + 1, uv)
    faces = position.reshape(-1, 3)
    triangle = vertices[faces]
    face_normals = np.cross(triangle[:, 1] - triangle[:, 0], triangle[:, 2] - triangle[:, 0])
    smooth = np.zeros_like(vertices)
    np.add.at(smooth, faces.reshape(-1), np.repeat(face_normals, 3, axis=0))
    return Mesh(vertices[position], np.arange(len(position)).reshape(-1, 3), uv_table[uv], _unit(smooth)[position])


def box(half_extents, tile_m: float) -> Mesh:
    """A box centred on the origin, its faces textured at one repeat per ``tile_m`` metres."""
    size = np.asarray(half_extents, float)
    vertices, uvs, normals, faces = [], [], [], []
    for axis in range(3):
        u, v = [a for a in range(3) if a != axis]
        for sign in (-1.0, 1.0):
            corners = np.zeros((4, 3))
            corners[:, axis], corners[:, u], corners[:, v] = sign, [-1, 1, 1, -1], [-1, -1, 1, 1]
            normal = np.eye(3)[axis] * sign
            if np.dot(np.cross(corners[1] - corners[0], corners[2] - corners[0]), normal) < 0:
                corners = corners[::-1]  # counter-clockwise seen from outside
            base = len(vertices)
            vertices += list(corners * size)
            uvs += list(corners[:, [u, v]] * size[[u, v]] / tile_m)
            normals += [normal] * 4
            faces += [[base, base + 1, base + 2], [base, base + 2, base + 3]]
    return Mesh(np.array(vertices), np.array(faces), np.array(uvs), np.array(normals))


def sphere(rings: int, segments: int) -> Mesh:
    """A unit sphere of ``rings`` bands from pole to pole and ``segments`` around, with smooth normals."""
    polar = np.linspace(0, math.pi, rings + 1)[:, None]
    azimuth = np.linspace(0, 2 * math.pi, segments + 1)[None, :]
    grid = np.stack(np.broadcast_arrays(np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth),
                                        np.cos(polar)), axis=-1).reshape(-1, 3)
    k = (np.arange(rings)[:, None] * (segments + 1) + np.arange(segments)[None, :]).reshape(-1, 1)
    faces = np.vstack([np.hstack([k, k + segments + 1, k + 1]), np.hstack([k + 1, k + segments + 1, k + segments + 2])])
    corners = grid[faces]
    keep = np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1) > 1e-9
    return Mesh(grid, faces[keep], np.zeros((len(grid), 2)), grid.copy())


def strip(left: np.ndarray, right: np.ndarray, along_m: np.ndarray, width_m: float, tile_m: float,
          height_m: float = 0.0) -> Mesh:
    """A flat ribbon between the points ``left`` and ``right`` (K, 2) at ``height_m``, facing up; texture
    coordinates run ``along_m`` (K,) metres along it and ``width_m`` across, one repeat per ``tile_m``."""
    count = len(left)
    vertices = np.zeros((2 * count, 3))
    vertices[0::2, :2], vertices[1::2, :2], vertices[:, 2] = left, right, height_m
    uvs = np.zeros((2 * count, 2))
    uvs[0::2, 0] = uvs[1::2, 0] = np.asarray(along_m) / tile_m
    uvs[1::2, 1] = width_m / tile_m
    k = np.arange(count - 1)[:, None] * 2
    faces = np.vstack([np.hstack([k + 1, k + 3, k]), np.hstack([k, k + 3, k + 2])])  # counter-clockwise from above
    return Mesh(vertices, faces, uvs, np.tile([0.0, 0.0, 1.0], (2 * count, 1)))


def turned(mesh: Mesh, yaw: float) -> Mesh:
    """``mesh`` turned by ``yaw`` radians about the z axis."""
    c, s = math.cos(yaw), math.sin(yaw)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return Mesh(mesh.vertices @ rotation.T, mesh.faces, mesh.uvs, mesh.normals @ rotation.T)
