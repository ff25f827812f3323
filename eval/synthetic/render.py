"""Rendering a textured, lit FLAME head through the tracker's camera with the pure-torch renderer.

Both windings are rasterised so that the mouth opening shows the inside of the head; surfaces seen from
behind are painted a dark cavity colour. Supersampling (rendering at k times the size, then averaging k x k
blocks) gives antialiased silhouettes and a fractional coverage mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tracker.camera import Camera, to_camera
from tracker.render import MeshRenderer, RasterSettings, TextureAlbedo, vertex_normals
from tracker.render.barycentric import signed_area2
from tracker.render.shading import SH_DC_FACTOR, sh_basis

CAVITY_RGB = (0.10, 0.04, 0.04)
"""Colour of back-facing surfaces (the inside of the mouth)."""
FIRST_BAND = float(sh_basis(torch.tensor([[1.0], [0.0], [0.0]]))[1, 0])
"""The renderer's basis value of the x band at n = (1, 0, 0): shading = FIRST_BAND * c_x * n_x."""


def unlit_sh(batch: int = 1, device: torch.device | str = "cpu") -> Tensor:
    """(B, 9, 3) SH coefficients whose shading is 1 everywhere: the rendered colour is the albedo."""
    sh = torch.zeros(batch, 9, 3, device=device)
    sh[:, 0] = 1.0 / SH_DC_FACTOR
    return sh


def sh_from_light(ambient: float, strength: float, direction: Tensor, tint: Tensor) -> Tensor:
    """(9, 3) SH coefficients of shading = tint * (ambient + strength * n . l), l = unit `direction`.

    direction: (3,) towards the light in camera coordinates (OpenCV: (0, 0, -1) is a light at the camera).
    A linear light in n: exact in the first SH band (the renderer's basis, tracker.render.shading).
    """
    light = F.normalize(direction.float(), dim=0)
    sh = torch.zeros(9, 3)
    sh[0] = ambient / SH_DC_FACTOR
    sh[1:4] = strength * light[:, None] / FIRST_BAND
    return sh * tint.float()[None]


@dataclass(frozen=True)
class TexturedHead:
    """What is drawn: (V, 3) world vertices per frame share faces (F, 3) and corner UVs (F, 3, 2)."""

    faces: Tensor
    corner_uvs: Tensor
    texture: Tensor
    """(3, S, S) albedo in [0, 1], first row at the top (v = 1)."""


@dataclass(frozen=True)
class Rendering:
    """image: (H, W, 3) in [0, 1] on a black background; coverage: (H, W) fraction of each pixel covered;
    triangle_id: (H, W) long face at each pixel centre of the full-resolution grid (-1 on background)."""

    image: Tensor
    coverage: Tensor
    triangle_id: Tensor


def screen_vertices(vertices: Tensor, camera: Camera, scale: float = 1.0) -> Tensor:
    """(V, 3) world -> (1, V, 3) pixel x, y (times `scale`) and depth."""
    pixels, depth = camera.project(vertices)
    return torch.cat([pixels * scale, depth[:, None]], dim=-1)[None]


def render_head(head: TexturedHead, vertices: Tensor, camera: Camera, sh: Tensor, supersample: int = 2) -> Rendering:
    """Render one frame. vertices: (V, 3) world; sh: (9, 3) lighting in camera coordinates."""
    k = int(supersample)
    height, width = camera.height, camera.width
    screen = screen_vertices(vertices, camera, k)
    normals = vertex_normals(to_camera(vertices)[None], head.faces)
    renderer = MeshRenderer(RasterSettings((height * k, width * k), cull_backfaces=False))
    albedo = TextureAlbedo(head.texture[None].to(vertices), head.corner_uvs.to(vertices))
    out = renderer(screen, head.faces, normals, sh[None].to(vertices), albedo)
    triangle_id = out.fragments.triangle_id[0]
    # Faces wound clockwise on the image are seen from behind (see tracker.render.rasterize).
    back = signed_area2(screen[0, head.faces][..., :2]) > 0
    seen_from_behind = (triangle_id >= 0) & back[triangle_id.clamp(min=0)]
    cavity = torch.tensor(CAVITY_RGB, device=vertices.device)
    image = torch.where(seen_from_behind[..., None], cavity, out.image[0].clamp(0.0, 1.0))
    coverage = out.fragments.mask[0].to(image.dtype)
    if k > 1:
        image = F.avg_pool2d(image.permute(2, 0, 1)[None], k)[0].permute(1, 2, 0)
        coverage = F.avg_pool2d(coverage[None, None], k)[0, 0]
        triangle_id = triangle_id[k // 2::k, k // 2::k]
    # Premultiplied by coverage; straight colour is image / coverage.
    return Rendering(image, coverage, triangle_id)


def region_mask(triangle_id: Tensor, region_faces: Tensor) -> Tensor:
    """(H, W) bool: pixels whose face is in the region. region_faces: (F,) bool per face."""
    return (triangle_id >= 0) & region_faces.to(triangle_id.device)[triangle_id.clamp(min=0)]


def faces_in_region(faces: Tensor, vertex_ids: Tensor | list[int]) -> Tensor:
    """(F,) bool: faces whose three vertices all belong to the region's vertex ids."""
    member = torch.zeros(int(faces.max()) + 1, dtype=torch.bool, device=faces.device)
    member[torch.as_tensor(vertex_ids, device=faces.device, dtype=torch.long)] = True
    return member[faces].all(dim=1)

