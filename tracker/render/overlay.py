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

    Only the mesh's bounding box is rasterised, shaded and blended (the vertices shifted by its whole-pixel
    corner, which moves no pixel centre): a head in an HD frame covers a few percent of it.
    """
    out = frame.copy()
    box = mesh_box(verts_screen, frame.shape[0], frame.shape[1])
    if box is None:
        return out
    x0, y0, x1, y1 = box
    with torch.no_grad():
        verts = verts_screen.detach().float().unsqueeze(0)
        verts = verts - torch.tensor([x0, y0, 0.0], device=verts.device)
        fragments = rasterize(verts, faces, RasterSettings(image_size=(y1 - y0, x1 - x0)))
        normals, mask = interpolate(fragments, verts, faces, vertex_normals.detach().float().unsqueeze(0))
        normals = torch.nn.functional.normalize(normals, dim=-1, eps=1e-8)
        if sh_coefficients is None:
            shade = lambert_headlight(normals).unsqueeze(-1)
        else:
            shade = sh_shading(normals, sh_coefficients.detach().float().unsqueeze(0))
        base = torch.tensor(color, dtype=torch.float32, device=shade.device)
        mesh_rgb = (shade * base).clamp(0.0, 255.0)[0]
        weight = (mask[0] * alpha).cpu().numpy()
    region = out[y0:y1, x0:x1]
    out[y0:y1, x0:x1] = np.rint(region.astype(np.float32) * (1.0 - weight) + mesh_rgb.cpu().numpy() * weight)
    return out


def mesh_box(verts_screen: Tensor, height: int, width: int, z_near: float = RasterSettings.z_near
             ) -> tuple[int, int, int, int] | None:
    """Whole-pixel box (x0, y0, x1, y1), ends exclusive, holding every pixel a mesh can cover in an (H, W) frame:
    the extent of its vertices in front of the camera (only triangles wholly in front are drawn), clipped to
    the frame; None when nothing of it lies in the frame."""
    xyz = verts_screen.detach().float().reshape(-1, 3)
    xy = xyz[(xyz[:, 2] > z_near) & torch.isfinite(xyz).all(dim=1), :2]
    if not len(xy):
        return None
    low, high = xy.amin(dim=0).floor().cpu().numpy(), xy.amax(dim=0).ceil().cpu().numpy()
    x0, y0 = max(int(low[0]), 0), max(int(low[1]), 0)
    x1, y1 = min(int(high[0]) + 1, width), min(int(high[1]) + 1, height)
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


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
