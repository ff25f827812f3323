"""Visualisation for the overlay video: a shaded grey mesh blended over a frame, landmark dots.

Frames are RGB uint8 (H, W, 3) numpy arrays; colours are RGB tuples. Coordinates follow the
renderer's convention (pixel (i, j) has its centre at x = j + 0.5, y = i + 0.5).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import Tensor

from tracker.render.interpolate import interpolate
from tracker.render.rasterize import RasterSettings, rasterize
from tracker.render.shading import lambert_headlight, sh_shading

_SUBPIXEL_BITS = 4  # cv2 drawing with fixed-point coordinates (1/16 pixel)


def draw_mesh(
    frame: np.ndarray,
    verts_screen: Tensor,
    faces: Tensor,
    vertex_normals: Tensor,
    alpha: float = 0.6,
    color: tuple[int, int, int] = (200, 200, 200),
    sh_coefficients: Tensor | None = None,
) -> np.ndarray:
    """Blend a shaded mesh over a frame.

    frame: (H, W, 3) uint8 RGB; verts_screen: (V, 3) pixel x, y and depth z of the mesh in this
    frame; faces: (F, 3); vertex_normals: (V, 3) unit normals in camera coordinates (OpenCV).
    alpha: opacity of the mesh. Shading is a camera headlight (Lambert) unless sh_coefficients
    (9, 3) are given. Returns a new uint8 frame.
    """
    height, width = frame.shape[:2]
    with torch.no_grad():
        verts = verts_screen.detach().float().unsqueeze(0)
        fragments = rasterize(verts, faces, RasterSettings(image_size=(height, width)))
        normals, mask = interpolate(fragments, verts, faces, vertex_normals.detach().float().unsqueeze(0))
        normals = torch.nn.functional.normalize(normals, dim=-1, eps=1e-8)
        if sh_coefficients is None:
            shade = lambert_headlight(normals).unsqueeze(-1)
        else:
            shade = sh_shading(normals, sh_coefficients.detach().float().unsqueeze(0))
        base = torch.tensor(color, dtype=torch.float32, device=shade.device)
        mesh_rgb = (shade * base).clamp(0.0, 255.0)[0]
        weight = (mask[0] * alpha).cpu().numpy()
    blended = frame.astype(np.float32) * (1.0 - weight) + mesh_rgb.cpu().numpy() * weight
    return np.rint(blended).astype(np.uint8)


def draw_landmarks(
    frame: np.ndarray,
    points: np.ndarray | Tensor,
    color: tuple[int, int, int] = (0, 255, 0),
    radius: int = 2,
) -> np.ndarray:
    """Draw filled dots at (N, 2) pixel coordinates (x, y) on a copy of the frame."""
    if isinstance(points, Tensor):
        points = points.detach().cpu().numpy()
    out = np.ascontiguousarray(frame).copy()
    # cv2 puts integer coordinates at pixel centres, ours are at +0.5.
    scale = 1 << _SUBPIXEL_BITS
    for x, y in np.asarray(points, dtype=np.float64).reshape(-1, 2):
        if np.isfinite(x) and np.isfinite(y):
            centre = (int(round((x - 0.5) * scale)), int(round((y - 0.5) * scale)))
            cv2.circle(out, centre, radius * scale, color, thickness=-1, lineType=cv2.LINE_AA, shift=_SUBPIXEL_BITS)
    return out
