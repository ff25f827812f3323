"""Normals and lighting: area-weighted vertex normals, spherical-harmonics and Lambert shading.

Spherical harmonics follow the irradiance form of Ramamoorthi and Hanrahan (2001) with the
basis order and constants used by DECA-style FLAME fitting: for a unit normal n = (x, y, z),
basis = [1, x, y, z, xy, xz, yz, x^2 - y^2, 3z^2 - 1] times the Lambertian-convolved constants
below, and shading = sum_k coefficients[k] * basis[k] per colour channel. The coefficients are
expressed in the frame of the normals (the tracker uses camera coordinates, OpenCV convention:
x right, y down, z forward, so a surface facing the camera has n_z < 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_C0 = 1.0 / math.sqrt(4.0 * math.pi)
_C1 = (2.0 * math.pi / 3.0) * math.sqrt(3.0 / (4.0 * math.pi))
_C2 = (math.pi / 4.0) * 3.0 * math.sqrt(5.0 / (12.0 * math.pi))
_C3 = (math.pi / 4.0) * 1.5 * math.sqrt(5.0 / (12.0 * math.pi))
_C4 = (math.pi / 4.0) * 0.5 * math.sqrt(5.0 / (4.0 * math.pi))
SH_DC_FACTOR = _C0  # shading = SH_DC_FACTOR * coefficients[0] when only the DC term is set


def vertex_normals(verts: Tensor, faces: Tensor, eps: float = 1e-12) -> Tensor:
    """Unit vertex normals, the area-weighted mean of the adjacent face normals.

    verts: (B, V, 3) in a right-handed frame; faces: (F, 3) wound counter-clockwise seen from
    outside (as FLAME's), giving outward normals. Returns (B, V, 3); isolated vertices get 0.
    """
    corners = verts[:, faces]  # (B, F, 3, 3)
    face_normals = torch.linalg.cross(corners[:, :, 1] - corners[:, :, 0], corners[:, :, 2] - corners[:, :, 0])
    normals = torch.zeros_like(verts)
    for k in range(3):
        normals = normals.index_add(1, faces[:, k], face_normals)
    return F.normalize(normals, dim=-1, eps=eps)


def normalize_channels(vectors: Tensor, eps: float = 1e-12) -> Tensor:
    """(3, ...) channels-first vectors scaled to unit length (zero vectors stay zero)."""
    x, y, z = vectors
    return vectors * torch.rsqrt(x * x + y * y + z * z + eps)


def sh_basis(normals: Tensor) -> Tensor:
    """(3, ...) channels-first unit normals -> (9, ...) Lambertian-convolved SH basis values."""
    x, y, z = normals
    return torch.stack(
        [
            torch.full_like(x, _C0),
            _C1 * x,
            _C1 * y,
            _C1 * z,
            _C2 * x * y,
            _C2 * x * z,
            _C2 * y * z,
            _C3 * (x * x - y * y),
            _C4 * (3.0 * z * z - 1.0),
        ]
    )


def sh_irradiance(normals: Tensor, sh_coefficients: Tensor) -> Tensor:
    """Shading of N unit normals under one SH light: normals (3, N), coefficients (9, 3) -> (3, N)."""
    return sh_coefficients.t() @ sh_basis(normals)


def sh_shading(normals: Tensor, sh_coefficients: Tensor) -> Tensor:
    """Shading of unit normals in image layout.

    normals: (B, ..., 3); sh_coefficients: (B, 9, 3), 9 coefficients per colour channel.
    Returns (B, ..., 3).
    """
    batch = normals.shape[0]
    planar = normals.reshape(batch, -1, 3).permute(0, 2, 1)  # (B, 3, N)
    shading = torch.stack([sh_irradiance(planar[b], sh_coefficients[b]) for b in range(batch)])
    return shading.permute(0, 2, 1).reshape(normals.shape[:-1] + (sh_coefficients.shape[-1],))


def lambert_headlight(normals: Tensor, ambient: float = 0.3, diffuse: float = 0.7) -> Tensor:
    """Grey Lambert shading lit from the camera: ambient + diffuse * max(0, -n_z).

    normals: (..., 3) unit normals in OpenCV camera coordinates. Returns (...,).
    """
    return ambient + diffuse * (-normals[..., 2]).clamp(min=0.0)
