"""A small numpy rasteriser, independent of the tracker's renderer (tracker.render), for the hold-out benchmark
and for depth tests in the evaluation.

Triangles given in screen space (pixel x, y and camera depth per vertex) are scan-converted at pixel centres
((j + 0.5, i + 0.5) for row i, column j, as the tracker's camera puts them): a pixel belongs to a triangle when
its centre lies inside or on an edge. Depth is interpolated as 1 / z, linear in the image plane, so it is exact
for planar triangles under perspective; barycentric weights are perspective-correct. The nearest fragment wins
(ties: the first fragment generated). All triangles are rasterised in one vectorised pass: triangles are grouped
by the size of their pixel bounding box, every candidate pixel of a group is tested at once, and the z-test is
a sort of all fragments by pixel and depth.

Shading (`shade`) is textured Lambert plus ambient light; surfaces seen from behind (the inside of the mouth)
get a dark cavity colour.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tracker.errors import MissingAssetError, TrackerError

MIN_DEPTH = 1e-4
"""Triangles with a corner nearer to the camera than this (metres) are dropped (no near-plane clipping)."""
CAVITY_RGB = np.array([0.10, 0.04, 0.04])
"""Colour of surfaces seen from behind (the inside of the mouth)."""


@dataclass(frozen=True)
class Fragments:
    """What each pixel of an (H, W) image sees."""

    triangle_id: np.ndarray
    """(H, W) int64 nearest triangle, -1 where none."""
    bary: np.ndarray
    """(H, W, 3) perspective-correct barycentric weights of the pixel centre in that triangle (0 where none)."""
    depth: np.ndarray
    """(H, W) camera depth of the nearest surface, +inf where none."""

    @property
    def mask(self) -> np.ndarray:
        return self.triangle_id >= 0


def _plane_coefficients(corners: np.ndarray) -> np.ndarray:
    """(F, 3, 3) corner x, y, depth -> (F, 3, 3): rows l1, l2 and 1 / depth as a x + b y + c in the image.

    l1, l2 are the screen-space barycentric weights of corners 1 and 2 (l0 = 1 - l1 - l2); 1 / depth is linear
    in the image plane for a planar triangle under perspective."""
    x, y, inv_depth = corners[..., 0], corners[..., 1], 1.0 / corners[..., 2]
    ex1, ey1, ex2, ey2 = x[:, 1] - x[:, 0], y[:, 1] - y[:, 0], x[:, 2] - x[:, 0], y[:, 2] - y[:, 0]
    area = ex1 * ey2 - ey1 * ex2
    # l1 = ((p - a) x (c - a)) / area, l2 = ((b - a) x (p - a)) / area, with p - a = (px - x0, py - y0).
    l1 = np.stack([ey2, -ex2, ex2 * y[:, 0] - ey2 * x[:, 0]], axis=1) / area[:, None]
    l2 = np.stack([-ey1, ex1, ey1 * x[:, 0] - ex1 * y[:, 0]], axis=1) / area[:, None]
    d1, d2 = inv_depth[:, 1] - inv_depth[:, 0], inv_depth[:, 2] - inv_depth[:, 0]
    z = l1 * d1[:, None] + l2 * d2[:, None]
    z[:, 2] += inv_depth[:, 0]
    return np.stack([l1, l2, z], axis=1)


def _group_fragments(planes: np.ndarray, inv_depth: np.ndarray, ids: np.ndarray, i0: np.ndarray, j0: np.ndarray,
                     rows: np.ndarray, cols: np.ndarray, side: int, width: int):
    """Fragments of the triangles `ids`, whose pixel bounding boxes (rows x cols from i0, j0) fit in
    side x side: pixel, depth, triangle, perspective-correct weights. Every triangle's box is tested as one
    (N, side^2) block (no gathers)."""
    di, dj = np.divmod(np.arange(side * side), side)
    px = (j0[:, None] + dj[None]) + 0.5  # (N, side^2)
    py = (i0[:, None] + di[None]) + 0.5
    plane = planes[ids]
    l1 = plane[:, 0, 0, None] * px + plane[:, 0, 1, None] * py + plane[:, 0, 2, None]
    l2 = plane[:, 1, 0, None] * px + plane[:, 1, 1, None] * py + plane[:, 1, 2, None]
    keep = (l1 >= 0) & (l2 >= 0) & (l1 + l2 <= 1) & (di[None] < rows[:, None]) & (dj[None] < cols[:, None])
    tri, slot = np.nonzero(keep)
    l1, l2, px, py = l1[tri, slot], l2[tri, slot], px[tri, slot], py[tri, slot]
    inv_z = plane[tri, 2, 0] * px + plane[tri, 2, 1] * py + plane[tri, 2, 2]
    weights = np.stack([1.0 - l1 - l2, l1, l2], axis=1) * inv_depth[ids[tri]] / inv_z[:, None]
    pixel = (py - 0.5).astype(np.int64) * width + (px - 0.5).astype(np.int64)
    return pixel, 1.0 / inv_z, ids[tri], weights


def rasterize(screen: np.ndarray, faces: np.ndarray, height: int, width: int) -> Fragments:
    """Z-buffer rasterisation.

    Args:
        screen: (V, 3) pixel x, y (image spans [0, W] x [0, H]) and camera depth (> 0 in front) per vertex.
        faces: (F, 3) vertex indices; both windings are drawn.
    """
    screen = np.asarray(screen, np.float64)
    faces = np.asarray(faces, np.int64)
    corners = screen[faces]  # (F, 3, 3)
    xs, ys = corners[..., 0], corners[..., 1]
    j0 = np.maximum(np.ceil(xs.min(1) - 0.5), 0).astype(np.int64)
    j1 = np.minimum(np.floor(xs.max(1) - 0.5), width - 1).astype(np.int64)
    i0 = np.maximum(np.ceil(ys.min(1) - 0.5), 0).astype(np.int64)
    i1 = np.minimum(np.floor(ys.max(1) - 0.5), height - 1).astype(np.int64)
    area = (xs[:, 1] - xs[:, 0]) * (ys[:, 2] - ys[:, 0]) - (ys[:, 1] - ys[:, 0]) * (xs[:, 2] - xs[:, 0])
    drawn = (corners[..., 2].min(1) > MIN_DEPTH) & (j1 >= j0) & (i1 >= i0) & (np.abs(area) > 1e-12)
    ids = np.flatnonzero(drawn)
    planes = np.zeros((len(faces), 3, 3))
    planes[ids] = _plane_coefficients(corners[ids])
    inv_depth = np.zeros((len(faces), 3))
    inv_depth[ids] = 1.0 / corners[ids, :, 2]
    rows, cols = i1[ids] - i0[ids] + 1, j1[ids] - j0[ids] + 1
    side = 1 << np.ceil(np.log2(np.maximum(rows, cols))).astype(np.int64)  # power-of-two box per group
    parts = [_group_fragments(planes, inv_depth, ids[side == s], i0[ids][side == s], j0[ids][side == s],
                              rows[side == s], cols[side == s], int(s), width) for s in np.unique(side)]
    triangle_id = np.full(height * width, -1, np.int64)
    bary = np.zeros((height * width, 3))
    depth = np.full(height * width, np.inf)
    if parts:
        pixel, frag_depth, frag_id, frag_bary = (np.concatenate(p) for p in zip(*parts, strict=True))
        order = np.lexsort((frag_depth, pixel))  # by pixel, then nearest (stable: ties keep generation order)
        first = order[np.r_[True, pixel[order][1:] != pixel[order][:-1]]]
        triangle_id[pixel[first]], depth[pixel[first]] = frag_id[first], frag_depth[first]
        bary[pixel[first]] = frag_bary[first]
    return Fragments(triangle_id.reshape(height, width), bary.reshape(height, width, 3), depth.reshape(height, width))


def interpolate(fragments: Fragments, faces: np.ndarray, vertex_values: np.ndarray) -> np.ndarray:
    """Per-vertex values (V, C) at each pixel -> (H, W, C), 0 where nothing is drawn."""
    corner_values = np.asarray(vertex_values)[np.asarray(faces)]  # (F, 3, C)
    return interpolate_corners(fragments, corner_values)


def interpolate_corners(fragments: Fragments, corner_values: np.ndarray) -> np.ndarray:
    """Per-face-corner values (F, 3, C) at each pixel -> (H, W, C), 0 where nothing is drawn."""
    mask = fragments.mask
    out = np.zeros((*mask.shape, corner_values.shape[-1]))
    out[mask] = np.einsum("nk,nkc->nc", fragments.bary[mask], corner_values[fragments.triangle_id[mask]])
    return out


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(V, 3) unit normals: area-weighted sums of the normals of the faces around each vertex."""
    v = vertices[faces]
    face_normals = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    normals = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(normals, faces[:, k], face_normals)
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)


def sample_texture(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear texture lookup. texture: (S, S, 3) with the first row at v = 1; uv: (H, W, 2) -> (H, W, 3)."""
    size_v, size_u = texture.shape[:2]
    map_x = (uv[..., 0] * size_u - 0.5).astype(np.float32)
    map_y = ((1.0 - uv[..., 1]) * size_v - 0.5).astype(np.float32)
    return cv2.remap(texture.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


@dataclass(frozen=True)
class Light:
    """Lambert plus ambient: colour = albedo * (ambient + diffuse * max(0, n . direction))."""

    direction: np.ndarray
    """(3,) unit vector towards the light, camera coordinates (OpenCV axes: (0, 0, -1) points at the camera)."""
    ambient: float
    diffuse: float


def shade(fragments: Fragments, camera_vertices: np.ndarray, faces: np.ndarray, corner_uvs: np.ndarray,
          texture: np.ndarray, light: Light) -> np.ndarray:
    """(H, W, 3) colour of the drawn pixels (0 elsewhere).

    camera_vertices: (V, 3) camera coordinates; faces: (F, 3); corner_uvs: (F, 3, 2) UV per face corner.
    """
    mask = fragments.mask
    normals = interpolate(fragments, faces, vertex_normals(camera_vertices, faces))
    normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
    albedo = sample_texture(texture, interpolate_corners(fragments, corner_uvs))
    # A face is seen from behind when its normal points away from the camera (at the origin).
    v = camera_vertices[faces]
    face_normals = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    behind = (face_normals * v.mean(1)).sum(1) > 0
    lambert = np.clip((normals * light.direction).sum(-1), 0.0, None)
    image = albedo * (light.ambient + light.diffuse * lambert)[..., None]
    cavity = mask & behind[fragments.triangle_id.clip(min=0)]
    image[cavity] = CAVITY_RGB
    image[~mask] = 0.0
    return image


@dataclass(frozen=True)
class UvMesh:
    """Triangles and per-corner UVs of a Wavefront .obj (FLAME's head_template.obj)."""

    faces: np.ndarray
    """(F, 3) int64 vertex indices."""
    corner_uvs: np.ndarray
    """(F, 3, 2) UV of each face corner (u right, v up)."""


def read_uv_mesh(path: str | Path) -> UvMesh:
    """Faces and UVs of an .obj whose faces are triangles with a UV on every corner (f v/vt or f v/vt/vn)."""
    path = Path(path)
    if not path.is_file():
        raise MissingAssetError(f"mesh file not found: {path} (check the FLAME assets folder)")
    uvs, faces, face_uvs = [], [], []
    for line in path.read_text().splitlines():
        if line.startswith("vt "):
            uvs.append([float(value) for value in line.split()[1:3]])
        elif line.startswith("f "):
            corners = [corner.split("/") for corner in line.split()[1:]]
            if len(corners) != 3 or any(len(c) < 2 or not c[1] for c in corners):
                raise TrackerError(f"{path}: faces must be triangles with UVs (f v/vt), got {line.strip()!r}")
            faces.append([int(c[0]) - 1 for c in corners])
            face_uvs.append([int(c[1]) - 1 for c in corners])
    if not faces or not uvs:
        raise TrackerError(f"{path} holds no UV-mapped triangles")
    return UvMesh(np.array(faces, np.int64), np.array(uvs, np.float64)[np.array(face_uvs, np.int64)])
