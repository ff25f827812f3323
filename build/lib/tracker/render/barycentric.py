"""Barycentric coordinates as per-face planes over the image.

Inside a screen-space triangle each affine barycentric weight w_k(x, y) is a plane, and with a
perspective projection so is w_k / z_k. Computing these planes once per face (cheap, plain
autograd, differentiable w.r.t. the vertices) turns per-pixel work into evaluating
``A X + B Y + C``. Pixel coordinates are taken relative to a per-face integer origin (the floored
first corner) so that C stays small and float32 keeps its precision far from the image origin.
"""

from __future__ import annotations

import torch
from torch import Tensor


def signed_area2(tri_xy: Tensor) -> Tensor:
    """Twice the signed area ``(v1 - v0) x (v2 - v0)`` of 2D triangles.

    tri_xy: (..., 3, 2) corners. Returns (...). In y-down image coordinates a negative value means
    the triangle appears counter-clockwise on the image.
    """
    d1 = tri_xy[..., 1, :] - tri_xy[..., 0, :]
    d2 = tri_xy[..., 2, :] - tri_xy[..., 0, :]
    return d1[..., 0] * d2[..., 1] - d1[..., 1] * d2[..., 0]


def face_corner_values(values: Tensor, faces: Tensor) -> Tensor:
    """Per-vertex values (B, V, C) or (V, C) -> (3, C, B, F) or (3, C, F): the value at each face
    corner, channels first so that every (corner, channel) row is contiguous."""
    channels_first = values.movedim(-1, 0).contiguous()  # (C, [B,] V)
    rows = channels_first.view(-1, values.shape[-2])  # 2D: index_select on the last dim is fast
    corners = [rows.index_select(1, faces[:, k]).view(*channels_first.shape[:-1], -1) for k in range(3)]
    return torch.stack(corners)


def barycentric_planes(verts_screen: Tensor, faces: Tensor, perspective_correct: bool) -> tuple[Tensor, Tensor]:
    """Per-face planes of the barycentric weights.

    verts_screen: (B, V, 3) pixel x, y and depth z; faces: (F, 3).
    Returns (planes, origin):
      planes: (3, 3, B*F), planes[:, k] = (A, B, C) of corner k's plane t_k = A X + B Y + C where
        (X, Y) = pixel centre - origin and t_k = w_k / z_k (perspective_correct) or w_k.
      origin: (2, B*F) detached integer origin of each face (its floored first corner).
    Differentiable w.r.t. verts_screen. Degenerate (zero-area) faces, to which the rasteriser never
    assigns pixels, get zero planes: a non-finite 1/area would turn their zero gradients into NaN.
    """
    x, y, z = face_corner_values(verts_screen, faces).flatten(2).unbind(1)  # (3 corners, B*F) each
    origin = torch.floor(torch.stack([x[0], y[0]]).detach())
    x = x - origin[0]
    y = y - origin[1]
    x1, x2 = x.roll(-1, dims=0), x.roll(-2, dims=0)  # corners k+1, k+2
    y1, y2 = y.roll(-1, dims=0), y.roll(-2, dims=0)
    # w_k = twice the area of (point, corner k+1, corner k+2) over twice the face's area.
    a, b, c = y1 - y2, x2 - x1, x1 * y2 - x2 * y1
    area2 = c.sum(dim=0)
    degenerate = area2 == 0
    scale = torch.where(degenerate, 0.0, 1.0 / area2.masked_fill(degenerate, 1.0))
    scale = scale / z if perspective_correct else scale.expand_as(c)
    return torch.stack([a * scale, b * scale, c * scale]), origin


def evaluate_plane(plane: Tensor, face_rows: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """A X + B Y + C at points. plane: (3, N) rows (A, B, C); face_rows, x, y: (P,). Returns (P,)."""
    a, b, c = (plane[i].index_select(0, face_rows) for i in range(3))
    return torch.addcmul(torch.addcmul(c, a, x), b, y)
