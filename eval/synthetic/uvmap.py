"""Texture atlas of a UV-mapped mesh: which surface point each texel shows, and unwrapping images onto it.

Texel (row i, column j) of an S x S texture sits at UV ((j + 0.5) / S, 1 - (i + 0.5) / S): v up, first row on
top, as in tracker.render.texture. Rasterising the mesh once in UV space gives every covered texel a face and
barycentric weights, so on any posed mesh the texel's 3D point is a fixed blend of three vertices. Unwrapping
an image projects those points into it and keeps the texels that the camera sees (depth test, facing angle).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tracker.camera import Camera, to_camera
from tracker.render import RasterSettings, rasterize, vertex_normals
from tracker.render.texture import ObjMesh


@dataclass(frozen=True)
class UvAtlas:
    """Covered texels of an S x S texture, N of them, as flat lists."""

    size: int
    texel: Tensor
    """(N,) flat index into the (S, S) texture."""
    face: Tensor
    """(N,) long mesh face each texel lies on."""
    bary: Tensor
    """(N, 3) barycentric weights of the texel's point on that face."""
    faces: Tensor
    """(F, 3) long mesh faces (vertex indices)."""
    corner_uvs: Tensor
    """(F, 3, 2) UV of each face corner, for rendering the texture."""

    def texel_values(self, vertex_values: Tensor) -> Tensor:
        """Per-vertex values (V, C) -> (N, C) at the texels' surface points."""
        corners = vertex_values[self.faces[self.face]]  # (N, 3, C)
        return (corners * self.bary[..., None]).sum(1)

    def to_image(self, texel_values: Tensor, fill: float = 0.0) -> Tensor:
        """(N, C) texel values -> (S, S, C) texture, `fill` outside the islands."""
        image = texel_values.new_full((self.size * self.size, texel_values.shape[1]), fill)
        image[self.texel] = texel_values
        return image.view(self.size, self.size, -1)


def uv_atlas(mesh: ObjMesh, size: int) -> UvAtlas:
    """Rasterise the mesh's UV layout into an S x S atlas (texel centres, orthographic, both windings)."""
    uv = mesh.verts_uvs.float()
    flat = torch.stack([uv[:, 0] * size, (1.0 - uv[:, 1]) * size, torch.ones_like(uv[:, 0])], dim=-1)[None]
    settings = RasterSettings((size, size), cull_backfaces=False, perspective_correct=False)
    fragments = rasterize(flat, mesh.faces_uvs, settings)
    covered = fragments.covered
    bary = fragments.bary.view(-1, 3)[covered.pixel]
    return UvAtlas(size, covered.pixel, covered.face, bary / bary.sum(-1, keepdim=True), mesh.faces.long(),
                   mesh.corner_uvs())


def scaled_camera(camera: Camera, scale: float) -> Camera:
    """The same camera seeing an image resized by `scale` (focal, principal point and size scale alike)."""
    return Camera(camera.focal * scale, camera.center * scale, round(camera.height * scale),
                  round(camera.width * scale))


def depth_buffer(vertices: Tensor, faces: Tensor, camera: Camera) -> Tensor:
    """(H, W) depth of the nearest front-facing surface (0 where empty). vertices: (V, 3) world."""
    pixels, depth = camera.project(vertices)
    screen = torch.cat([pixels, depth[:, None]], dim=-1)[None]
    fragments = rasterize(screen, faces, RasterSettings((camera.height, camera.width)))
    return fragments.depth[0]


def sample_image(image: Tensor, pixels: Tensor) -> Tensor:
    """Bilinear colours of an (H, W, C) image at (N, 2) pixel positions (pixel centres at +0.5) -> (N, C)."""
    height, width = image.shape[:2]
    grid = torch.stack([pixels[:, 0] / width * 2 - 1, pixels[:, 1] / height * 2 - 1], dim=-1)
    sampled = F.grid_sample(image.permute(2, 0, 1)[None], grid[None, None], mode="bilinear",
                            padding_mode="border", align_corners=False)
    return sampled[0, :, 0].t()


@dataclass(frozen=True)
class UnwrapOptions:
    """depth_tolerance_m: how far behind the depth buffer a texel may lie and still count as seen.
    min_facing: smallest cosine between the surface normal and the ray to the camera (grazing texels smear)."""

    depth_tolerance_m: float = 0.004
    min_facing: float = 0.3


@torch.no_grad()
def unwrap_image(atlas: UvAtlas, vertices: Tensor, camera: Camera, image: Tensor,
                 options: UnwrapOptions = UnwrapOptions()) -> tuple[Tensor, Tensor]:
    """Colours the camera sees at each texel, and how reliable they are.

    vertices: (V, 3) world positions of the mesh in this image; image: (H, W, C) float.
    Returns colours (N, C) and weights (N,): the facing cosine where the texel is visible, else 0.
    """
    points = atlas.texel_values(vertices)
    pixels, depth = camera.project(points)
    normals = atlas.texel_values(vertex_normals(to_camera(vertices)[None], atlas.faces)[0])
    rays = F.normalize(to_camera(points), dim=-1)
    facing = -(F.normalize(normals, dim=-1) * rays).sum(-1)
    zbuffer = depth_buffer(vertices, atlas.faces, camera)
    height, width = zbuffer.shape
    col, row = pixels[:, 0].floor().long(), pixels[:, 1].floor().long()
    inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
    seen_depth = zbuffer[row.clamp(0, height - 1), col.clamp(0, width - 1)]
    visible = inside & (seen_depth > 0) & (depth <= seen_depth + options.depth_tolerance_m)
    weight = torch.where(visible & (facing >= options.min_facing), facing, torch.zeros_like(facing))
    return sample_image(image, pixels), weight


def push_pull_fill(texture: np.ndarray, weight: np.ndarray, levels: int = 12) -> np.ndarray:
    """Fill texels of weight 0 from their surroundings by a weighted image pyramid (push-pull).

    texture: (S, S, C) float; weight: (S, S) >= 0. Texels with weight keep their value; the others get the
    weighted mean of ever coarser neighbourhoods, which blends smoothly across large holes.
    """
    values = torch.from_numpy(np.ascontiguousarray(texture * weight[..., None])).permute(2, 0, 1)[None].double()
    weights = torch.from_numpy(np.ascontiguousarray(weight))[None, None].double()
    pyramid = [(values, weights)]
    for _ in range(levels):
        if min(pyramid[-1][1].shape[-2:]) < 2:
            break
        pyramid.append(tuple(F.avg_pool2d(t, 2, ceil_mode=True) for t in pyramid[-1]))
    filled = pyramid[-1][0] / pyramid[-1][1].clamp(min=1e-12)
    for level, (level_values, level_weights) in reversed(list(enumerate(pyramid[:-1]))):
        coarse = F.interpolate(filled, size=level_values.shape[-2:], mode="bilinear", align_corners=False)
        # Observed texels stay exact; coarser levels blend by how much of each cell was observed.
        alpha = (level_weights > 0).double() if level == 0 else level_weights.clamp(max=1.0)
        filled = alpha * level_values / level_weights.clamp(min=1e-12) + (1 - alpha) * coarse
    return filled[0].permute(1, 2, 0).numpy().astype(texture.dtype)
