"""A small composable mesh renderer: a rasteriser backend plus a spherical-harmonics shader.

    renderer = MeshRenderer(RasterSettings(image_size=(512, 512)), backend="torch")
    out = renderer(verts_screen, faces, normals, sh_coefficients, VertexAlbedo(colors))
    loss = ((out.image - target) * out.mask).abs().mean()

Shading runs on the covered pixels only (channels-first (C, P) values, see
`interpolate.interpolate_covered`); the (B, H, W, C) images are built on first access. The pieces
are usable on their own: `backends.get_rasterizer`, `interpolate`, `shading.sh_shading`,
`texture.sample_texture`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from tracker.render.backends import get_rasterizer
from tracker.render.barycentric import face_corner_values
from tracker.render.interpolate import interpolate_covered, pixels_to_image
from tracker.render.rasterize import Fragments, RasterSettings
from tracker.render.shading import normalize_channels, sh_irradiance
from tracker.render.texture import sample_texture_points


@dataclass(frozen=True)
class VertexAlbedo:
    """Per-vertex albedo colours, (B, V, 3) or (V, 3)."""

    colors: Tensor


@dataclass(frozen=True)
class TextureAlbedo:
    """Albedo texture (B or 1, 3, Ht, Wt) with UVs per face corner (F, 3, 2), see texture.ObjMesh."""

    texture: Tensor
    corner_uvs: Tensor


Albedo = VertexAlbedo | TextureAlbedo


@dataclass(frozen=True, eq=False)
class RenderOutput:
    """Shaded pixels. The pixel_* fields are (3, P) values at `fragments.covered` pixels; the
    image properties are (B, H, W, 3) with zeros on the background, built on first access.
    colour = albedo * shading."""

    fragments: Fragments
    pixel_color: Tensor
    pixel_albedo: Tensor
    pixel_shading: Tensor
    pixel_normals: Tensor

    @property
    def mask(self) -> Tensor:
        """(B, H, W, 1) coverage in the image dtype."""
        return self.fragments.mask.unsqueeze(-1).to(self.pixel_color.dtype)

    @cached_property
    def image(self) -> Tensor:
        return pixels_to_image(self.fragments, self.pixel_color)

    @cached_property
    def albedo(self) -> Tensor:
        return pixels_to_image(self.fragments, self.pixel_albedo)

    @cached_property
    def shading(self) -> Tensor:
        return pixels_to_image(self.fragments, self.pixel_shading)

    @cached_property
    def normals(self) -> Tensor:
        return pixels_to_image(self.fragments, self.pixel_normals)


def _image_slices(fragments: Fragments) -> list[slice]:
    """Covered pixels are sorted by image: the slice of them that belongs to each image."""
    counts = torch.bincount(fragments.covered.image, minlength=fragments.triangle_id.shape[0]).tolist()
    return [slice(end - count, end) for count, end in zip(counts, itertools.accumulate(counts))]


def shade_sh(
    fragments: Fragments,
    verts_screen: Tensor,
    faces: Tensor,
    vertex_normals: Tensor,
    sh_coefficients: Tensor,
    albedo: Albedo,
) -> RenderOutput:
    """Lambertian SH shading of the rasterised pixels.

    vertex_normals: (B, V, 3) unit normals in the SH frame; sh_coefficients: (B, 9, 3).
    Normals (and vertex albedo) are interpolated together, perspective-correct as rasterised.
    """
    if isinstance(albedo, VertexAlbedo):
        colors = albedo.colors.expand(vertex_normals.shape[0], -1, -1)
        corners = face_corner_values(torch.cat([vertex_normals, colors], dim=-1), faces)
        normals, pixel_albedo = interpolate_covered(fragments, verts_screen, faces, corners).split(3)
    else:
        normals = interpolate_covered(fragments, verts_screen, faces, face_corner_values(vertex_normals, faces))
        uv = interpolate_covered(fragments, verts_screen, faces, albedo.corner_uvs.movedim((1, 2), (0, 1)))
    normals = normalize_channels(normals)
    slices = _image_slices(fragments)
    shading = torch.cat([sh_irradiance(normals[:, s], sh_coefficients[b]) for b, s in enumerate(slices)], dim=1)
    if isinstance(albedo, TextureAlbedo):  # sample each image's texture at its covered pixels only
        textures = albedo.texture.expand(len(slices), -1, -1, -1).split(1)
        samples = [sample_texture_points(textures[b], uv[:, s].t()) for b, s in enumerate(slices)]
        pixel_albedo = torch.cat(samples, dim=1)
    return RenderOutput(
        fragments=fragments,
        pixel_color=pixel_albedo * shading,
        pixel_albedo=pixel_albedo,
        pixel_shading=shading,
        pixel_normals=normals,
    )


class MeshRenderer:
    """Rasteriser backend ('torch', 'pytorch3d' or 'nvdiffrast') followed by `shade_sh`."""

    def __init__(self, settings: RasterSettings, backend: str = "torch") -> None:
        self.settings = settings
        self.backend = backend
        self._rasterize = get_rasterizer(backend)

    def rasterize(self, verts_screen: Tensor, faces: Tensor) -> Fragments:
        """verts_screen: (B, V, 3) pixel x, y, depth z; faces: (F, 3)."""
        return self._rasterize(verts_screen, faces, self.settings)

    def __call__(
        self,
        verts_screen: Tensor,
        faces: Tensor,
        vertex_normals: Tensor,
        sh_coefficients: Tensor,
        albedo: Albedo,
    ) -> RenderOutput:
        fragments = self.rasterize(verts_screen, faces)
        return shade_sh(fragments, verts_screen, faces, vertex_normals, sh_coefficients, albedo)
