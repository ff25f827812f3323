"""Photometric appearance model and colour residuals: the FLAME mesh with a sequence's albedo (a texture in
FLAME's UV layout, or per-vertex colours) under spherical-harmonics lighting, compared with the frame inside
chosen FLAME regions.

Only the faces of the chosen regions are rendered (`RegionMesh`): that is the region mask, and most of the
speed. Per compared pixel the colour difference rendered - observed (3,) goes through the robust loss
(`robust_residuals`, scale `robust_scale` in colour units) and is dropped when it exceeds `outlier_k` times
the frame's median residual (hands, hair, glasses: what the model cannot explain must not pull the fit).
Each frame's residuals are divided by the square root of its inlier count, so the energy is a mean over
pixels and its weight is on the landmark term's scale (`masked_photometric_residuals`, used to fit the
appearance). The term the stage's solver uses, on surface samples, is energy.photometric_samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tracker.camera import Camera, to_camera
from tracker.energy.base import robust_ratio
from tracker.errors import TrackerError
from tracker.flame.model import FlameModel, FlameParams
from tracker.render.albedo_model import AlbedoModel
from tracker.render.rasterize import Fragments
from tracker.render.renderer import Albedo, RenderOutput, TextureAlbedo, VertexAlbedo, shade_sh
from tracker.render.shading import SH_DC_FACTOR, vertex_normals


@dataclass
class PhotometricConfig:
    weight: float = 1.0
    """Weight of the photometric term relative to the landmark term (used by the photometric stage)."""
    robust: str = "huber"
    """Robust loss on colour residuals: l1 | huber."""
    regions: list[str] = field(default_factory=lambda: ["face", "forehead", "nose"])
    """FLAME_masks regions compared."""
    robust_scale: float = 0.1
    """Colour residual (image values in [0, 1]) at which the robust loss turns from quadratic to linear."""
    outlier_k: float = 3.0
    """A pixel whose residual exceeds this times the frame's median residual is dropped as an outlier."""
    outlier_floor: float = 0.1
    """Residuals below this (colour units) are never outliers, however well the rest of the frame fits."""


SH_UNIT_DC = 1.0 / SH_DC_FACTOR
"""DC coefficient giving a shading of 1: the lighting convention fixes it so that the albedo carries colour
and brightness (albedo x lighting has an exact per-channel scale ambiguity)."""


def neutral_sh(device: torch.device | str = "cpu") -> Tensor:
    """(9, 3) SH coefficients of uniform white light with shading 1."""
    sh = torch.zeros(9, 3, device=device)
    sh[0] = SH_UNIT_DC
    return sh


@dataclass
class Appearance:
    """Albedo and lighting of a sequence, shared by its frames (texture or vertex colours, not both)."""

    sh: Tensor
    """(9, 3) SH lighting in camera coordinates (render.shading's basis), DC fixed to SH_UNIT_DC (free under an
    albedo model, which fixes the albedo's scale)."""
    texture: Tensor | None = None
    """(3, Ht, Wt) albedo in FLAME's UV layout, row 0 at v = 1, values nominally in [0, 1]."""
    corner_uvs: Tensor | None = None
    """(F, 3, 2) UV of each face corner (from head_template.obj), needed with a texture."""
    vertex_colors: Tensor | None = None
    """(V, 3) per-vertex albedo when no texture is used."""
    coverage: Tensor | None = None
    """(Ht, Wt) or (V,) how many pixels' worth of the fitted frames each texel (vertex) was seen by; None when
    unknown. Albedo that no frame showed is a guess: the stage does not compare it."""
    albedo_model: AlbedoModel | None = None
    """The statistical albedo model the texture comes from (texture = its albedo(albedo_code)); None: a free
    per-texel texture."""
    albedo_code: Tensor | None = None
    """(K,) the albedo model's coefficients."""

    def albedo(self) -> Albedo:
        if self.texture is not None:
            return TextureAlbedo(self.texture.unsqueeze(0), self.corner_uvs)
        return VertexAlbedo(self.vertex_colors)

    def on_region(self, mesh: RegionMesh) -> Appearance:
        """The appearance of a region mesh's faces (UVs) or vertices (colours); differentiable."""
        if self.texture is not None:
            return replace(self, corner_uvs=self.corner_uvs.index_select(0, mesh.face_ids))
        return replace(self, vertex_colors=self.vertex_colors.index_select(0, mesh.vertex_ids))

    def detach(self) -> Appearance:
        return replace(self, **{name: getattr(self, name).detach().clone() for name in
                                ("sh", "texture", "corner_uvs", "vertex_colors", "coverage", "albedo_code")
                                if getattr(self, name) is not None})

    def blurred(self, factor: int) -> Appearance:
        """The texture (and its coverage) box-filtered by `factor` (a mip level), to render images `factor`
        times smaller without aliasing; vertex colours are returned as they are."""
        if self.texture is None or factor <= 1:
            return self
        pool = lambda t: F.avg_pool2d(t.unsqueeze(0), factor, ceil_mode=True)[0]
        return replace(self, texture=pool(self.texture),
                       coverage=None if self.coverage is None else pool(self.coverage[None])[0])


@dataclass(frozen=True, eq=False)
class RegionMesh:
    """The part of FLAME that is rendered and compared: the faces whose corners all lie in chosen regions.

    Rendering only these faces is exact for visibility as long as nothing outside the regions can occlude
    them, which holds for the face, forehead and nose (eyeballs and the mouth show through holes in the
    region mesh and are left uncovered, so they are never compared).
    """

    model: FlameModel
    """FLAME restricted to `vertex_ids`; its faces index into them."""
    vertex_ids: Tensor
    """(S,) FLAME vertices of the regions."""
    face_ids: Tensor
    """(Fr,) index in FLAME's faces of each face of `model`."""


def region_mesh(model: FlameModel, masks: dict[str, np.ndarray], regions: Sequence[str]) -> RegionMesh:
    """The sub-mesh of the named FLAME_masks regions (all of FLAME for regions == ["all"])."""
    device = model.faces.device
    if list(regions) == ["all"]:
        inside = torch.ones(model.n_vertices, dtype=torch.bool, device=device)
    else:
        unknown = [name for name in regions if name not in masks]
        if unknown or not regions:
            raise TrackerError(f"unknown photometric region(s) {unknown or regions}: "
                               f"choose from {', '.join(sorted(masks))}")
        inside = torch.zeros(model.n_vertices, dtype=torch.bool, device=device)
        for name in regions:
            inside[torch.as_tensor(masks[name], device=device)] = True
    vertex_ids = torch.nonzero(inside).squeeze(1)
    face_ids = torch.nonzero(inside[model.faces].all(dim=1)).squeeze(1)
    return RegionMesh(model.restricted(vertex_ids), vertex_ids, face_ids)


def screen_vertices(mesh: RegionMesh, camera: Camera, params: FlameParams,
                    image_scale: float) -> tuple[Tensor, Tensor]:
    """The region's vertices for the rasteriser, (B, S, 3) pixel x, y (of images `image_scale` times the
    video's size) and depth, and in camera coordinates (B, S, 3)."""
    verts = mesh.model(params).vertices
    pix, depth = camera.project(verts)
    return torch.cat([pix * image_scale, depth.unsqueeze(-1)], dim=-1), to_camera(verts)


def inlier_mask(residual_norm: Tensor, image: Tensor, batch: int, k: float, floor: float) -> Tensor:
    """(P,) 1 for pixels whose residual is at most max(k x their frame's median residual, floor), else 0.

    residual_norm: (P,) colour residual lengths; image: (P,) frame index of each pixel in [0, batch),
    grouped by frame in increasing order (as in `Fragments.covered`).
    """
    counts = torch.bincount(image, minlength=batch)
    medians = [frame.median() if frame.numel() else residual_norm.new_zeros(())
               for frame in residual_norm.split(counts.tolist())]
    limit = torch.clamp(k * torch.stack(medians), min=floor)
    return (residual_norm <= limit[image]).to(residual_norm.dtype)


def masked_photometric_residuals(color: Tensor, target: Tensor, image: Tensor, batch: int,
                                 cfg: PhotometricConfig) -> Tensor:
    """Weighted residuals (3, P) at the covered pixels: robust, outliers dropped, mean-normalised per frame.

    color, target: (3, P) rendered and observed colours; image: (P,) frame index of each pixel. The sum of
    squares over one frame's pixels is weight x the mean over its inlier pixels of rho(|r|^2 / robust_scale^2),
    as `robust_residuals` gives it (written channels-first here: reductions over a leading dim are slow).
    """
    residual = color - target
    red, green, blue = residual.detach()
    squared = red * red + green * green + blue * blue
    keep = inlier_mask(squared.sqrt(), image, batch, cfg.outlier_k, cfg.outlier_floor)
    count = torch.zeros(batch, device=keep.device).index_add_(0, image, keep).clamp(min=1.0)
    robust = torch.sqrt(robust_ratio(squared / cfg.robust_scale ** 2, cfg.robust)) / cfg.robust_scale
    return residual * (robust * torch.sqrt(cfg.weight * keep / count[image]))


def render_appearance(appearance: Appearance, mesh: RegionMesh, fragments: Fragments, verts_screen: Tensor,
                      verts_camera: Tensor) -> RenderOutput:
    """Shade the rasterised region mesh with the appearance.

    verts_screen: (B, S, 3) as rasterised; verts_camera: (B, S, 3) OpenCV camera coordinates (the frame of
    the normals the SH lighting is expressed in).
    """
    faces = mesh.model.faces
    normals = vertex_normals(verts_camera, faces)
    sh = appearance.sh.unsqueeze(0).expand(verts_screen.shape[0], -1, -1)
    return shade_sh(fragments, verts_screen, faces, normals, sh, appearance.on_region(mesh).albedo())
