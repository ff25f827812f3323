"""UV texturing: .obj UV loading, albedo texture sampling, texture regularisers.

UVs follow the OBJ convention: u right, v up, both in [0, 1]. A texture is a (B, 3, Ht, Wt)
image whose first row is the top (v = 1). UVs are stored per face corner (``faces_uvs``) because
a mesh with seams has more UV coordinates than vertices (FLAME: 5023 vertices, 5118 UVs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tracker.errors import MissingAssetError, TrackerError

# Mirror axis of FLAME's UV layout: median of (u + u_mirror) / 2 over the left-right vertex pairs
# of head_template.obj (the layout is not centred on u = 0.5).
FLAME_UV_MIRROR_U = 0.4966


@dataclass(frozen=True)
class ObjMesh:
    """Triangle mesh with UVs read from an .obj file.

    verts: (V, 3) float; faces: (F, 3) long vertex indices;
    verts_uvs: (T, 2) float UV coordinates; faces_uvs: (F, 3) long indices into verts_uvs.
    """

    verts: Tensor
    faces: Tensor
    verts_uvs: Tensor
    faces_uvs: Tensor

    def corner_uvs(self) -> Tensor:
        """(F, 3, 2) UV of each face corner, for `interpolate_face_corners`."""
        return self.verts_uvs[self.faces_uvs]


def load_obj(path: str | Path) -> ObjMesh:
    """Read vertices, triangles and their UV indices from a Wavefront .obj file.

    Every face must be a triangle with a UV index on each corner (``f v/vt`` or ``f v/vt/vn``).
    Raises MissingAssetError if the file is missing, TrackerError if it is not such a mesh.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingAssetError(f"mesh file not found: {path} (check the FLAME assets folder)")
    verts: list[list[float]] = []
    uvs: list[list[float]] = []
    face_corners: list[list[str]] = []
    with path.open() as lines:
        for line in lines:
            if line.startswith("v "):
                verts.append([float(value) for value in line.split()[1:4]])
            elif line.startswith("vt "):
                uvs.append([float(value) for value in line.split()[1:3]])
            elif line.startswith("f "):
                face_corners.append(line.split()[1:])
    if any(len(corners) != 3 for corners in face_corners):
        raise TrackerError(f"{path}: only triangle meshes are supported (triangulate the .obj first)")
    try:
        indices = np.array(
            [[[int(part) for part in corner.split("/")[:2]] for corner in corners] for corners in face_corners],
            dtype=np.int64,
        ).reshape(-1, 3, 2)
    except ValueError as error:
        raise TrackerError(f"{path}: every face corner needs a UV index (f v/vt ...): {error}") from None
    # OBJ indices are 1-based; negative ones count back from the last vertex / UV (read before the faces).
    counts = np.array([len(verts), len(uvs)])
    indices = np.where(indices < 0, indices + counts, indices - 1)
    return ObjMesh(
        verts=torch.tensor(verts, dtype=torch.float32),
        faces=torch.from_numpy(indices[..., 0].copy()),
        verts_uvs=torch.tensor(uvs, dtype=torch.float32),
        faces_uvs=torch.from_numpy(indices[..., 1].copy()),
    )


def uv_to_grid(uv: Tensor) -> Tensor:
    """UVs in [0, 1] (v up) -> grid_sample coordinates in [-1, 1] (y down)."""
    return torch.stack([uv[..., 0] * 2.0 - 1.0, 1.0 - uv[..., 1] * 2.0], dim=-1)


def sample_texture(texture: Tensor, uv_image: Tensor) -> Tensor:
    """Bilinearly sample a texture at per-pixel UVs.

    texture: (B, C, Ht, Wt); uv_image: (B, H, W, 2). Returns (B, H, W, C); differentiable w.r.t.
    both. Mask the result with the rasteriser's coverage mask (background UVs are zero).
    """
    sampled = F.grid_sample(texture, uv_to_grid(uv_image), mode="bilinear", padding_mode="border", align_corners=False)
    return sampled.permute(0, 2, 3, 1)


def sample_texture_points(texture: Tensor, uv: Tensor) -> Tensor:
    """Bilinearly sample one texture (1, C, Ht, Wt) at N points uv (N, 2). Returns (C, N)."""
    grid = uv_to_grid(uv).view(1, 1, -1, 2)
    sampled = F.grid_sample(texture, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return sampled.view(texture.shape[1], -1)


def total_variation(texture: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean absolute difference between neighbouring texels (smoothness prior).

    texture: (B, C, Ht, Wt); mask: optional (1 or B, 1, Ht, Wt) weights, e.g. the UV-island mask,
    applied to both texels of each pair. Returns a scalar.
    """
    dx = (texture[..., :, 1:] - texture[..., :, :-1]).abs()
    dy = (texture[..., 1:, :] - texture[..., :-1, :]).abs()
    if mask is None:
        return dx.mean() + dy.mean()
    mx = mask[..., :, 1:] * mask[..., :, :-1]
    my = mask[..., 1:, :] * mask[..., :-1, :]
    channels = texture.shape[1]
    return (dx * mx).sum() / (mx.sum() * channels).clamp(min=1) + (dy * my).sum() / (my.sum() * channels).clamp(min=1)


def mirror_about_u(texture: Tensor, mirror_u: float) -> Tensor:
    """The texture reflected left-right about the vertical line u = mirror_u (bilinear)."""
    _, _, height, width = texture.shape
    u = (torch.arange(width, device=texture.device, dtype=texture.dtype) + 0.5) / width
    v = 1.0 - (torch.arange(height, device=texture.device, dtype=texture.dtype) + 0.5) / height
    uv = torch.stack(torch.meshgrid(2.0 * mirror_u - u, v, indexing="xy"), dim=-1)
    grid = uv_to_grid(uv).unsqueeze(0).expand(texture.shape[0], -1, -1, -1)
    return F.grid_sample(texture, grid, mode="bilinear", padding_mode="border", align_corners=False)


def symmetry_loss(texture: Tensor, mirror_u: float = FLAME_UV_MIRROR_U, mask: Tensor | None = None) -> Tensor:
    """Mean absolute difference between a texture and its left-right mirror image.

    texture: (B, C, Ht, Wt); mirror_u: the UV layout's mirror axis; mask: optional
    (1 or B, 1, Ht, Wt) weights (e.g. skin region). Returns a scalar.
    """
    difference = (texture - mirror_about_u(texture, mirror_u)).abs()
    if mask is None:
        return difference.mean()
    return (difference * mask).sum() / (mask.sum() * texture.shape[1]).clamp(min=1)
