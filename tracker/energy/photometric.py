"""Photometric render-and-compare energy: the FLAME mesh rendered with a sequence's albedo (a texture in
FLAME's UV layout, or per-vertex colours) under spherical-harmonics lighting, compared with the frame inside
chosen FLAME regions.

Per covered pixel the colour difference rendered - observed (3,) goes through the robust loss
(`robust_residuals`, scale `robust_scale` in colour units), is weighted by the pixel's region weight, and is
dropped when it exceeds `outlier_k` times the frame's median residual (hands, hair, glasses: whatever the
model cannot explain must not pull the fit). Each frame's residuals are divided by the square root of its
inlier count, so the energy is a mean over pixels and its weight is on the landmark term's scale. The term
returns the full masked residual image (B, H * W * 3), zeros where nothing is compared, so its length is
fixed for a given image size.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tracker.camera import to_camera
from tracker.energy.base import Evaluation, robust_residuals
from tracker.errors import TrackerError
from tracker.render.interpolate import pixels_to_image
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
    """(9, 3) SH lighting in camera coordinates (render.shading's basis), DC fixed to SH_UNIT_DC."""
    texture: Tensor | None = None
    """(3, Ht, Wt) albedo in FLAME's UV layout, row 0 at v = 1, values nominally in [0, 1]."""
    corner_uvs: Tensor | None = None
    """(F, 3, 2) UV of each face corner (from head_template.obj), needed with a texture."""
    vertex_colors: Tensor | None = None
    """(V, 3) per-vertex albedo when no texture is used."""

    def albedo(self) -> Albedo:
        if self.texture is not None:
            return TextureAlbedo(self.texture.unsqueeze(0), self.corner_uvs)
        return VertexAlbedo(self.vertex_colors)

    def detach(self) -> "Appearance":
        return Appearance(*(None if t is None else t.detach().clone()
                            for t in (self.sh, self.texture, self.corner_uvs, self.vertex_colors)))

    def blurred(self, factor: int) -> "Appearance":
        """The texture box-filtered by `factor` (a mip level), to render images `factor` times smaller
        without aliasing; vertex colours are returned as they are."""
        if self.texture is None or factor <= 1:
            return self
        return replace(self, texture=F.avg_pool2d(self.texture.unsqueeze(0), factor, ceil_mode=True)[0])


def region_vertex_weights(masks: dict[str, np.ndarray], regions: Sequence[str], n_vertices: int,
                          device: torch.device | str = "cpu") -> Tensor:
    """(V,) 1 on the vertices of the named FLAME_masks regions, 0 elsewhere."""
    unknown = [name for name in regions if name not in masks]
    if unknown or not regions:
        raise TrackerError(f"unknown photometric region(s) {unknown or regions}: choose from {', '.join(sorted(masks))}")
    weights = torch.zeros(n_vertices, device=device)
    for name in regions:
        weights[torch.as_tensor(masks[name], device=device)] = 1.0
    return weights


def face_region_weights(vertex_weights: Tensor, faces: Tensor) -> Tensor:
    """Per-vertex weights (V,) -> per-face weights (F,), the mean over each face's corners.

    The region mask is a weight, not something to optimise, so it is rendered flat per face (a lookup by
    triangle id) instead of being interpolated with gradients.
    """
    return vertex_weights[faces].mean(dim=1)


def inlier_mask(residual_norm: Tensor, region: Tensor, image: Tensor, batch: int, k: float,
                floor: float) -> Tensor:
    """(P,) 1 for compared pixels whose residual is at most max(k x the frame's median, floor), else 0.

    residual_norm: (P,) colour residual lengths; region: (P,) region weights (> 0 = compared);
    image: (P,) frame index of each pixel, in [0, batch).
    """
    inside = region > 0
    limit = residual_norm.new_full((batch,), floor)
    for b in range(batch):
        frame = residual_norm[inside & (image == b)]
        if frame.numel():
            limit[b] = torch.clamp(k * frame.median(), min=floor)
    return (inside & (residual_norm <= limit[image])).to(residual_norm.dtype)


def masked_photometric_residuals(color: Tensor, target: Tensor, region: Tensor, image: Tensor, batch: int,
                                 cfg: PhotometricConfig) -> Tensor:
    """Weighted residuals (3, P) at covered pixels: robust, region-weighted, outliers dropped, mean-normalised.

    color, target: (3, P) rendered and observed colours; region: (P,) region weights; image: (P,) frame
    index of each pixel. The sum of squares over one frame's pixels is weight x mean over its inlier pixels
    of rho(|r|^2 / robust_scale^2).
    """
    residual = color - target
    keep = inlier_mask(residual.detach().norm(dim=0), region, image, batch, cfg.outlier_k, cfg.outlier_floor)
    weight = region * keep
    count = torch.zeros(batch, device=weight.device).index_add_(0, image, keep).clamp(min=1.0)
    scale = torch.sqrt(cfg.weight * weight / count[image])
    return robust_residuals(residual.t(), cfg.robust_scale, cfg.robust).t() * scale


def render_appearance(appearance: Appearance, fragments: Fragments, verts_screen: Tensor, verts_camera: Tensor,
                      faces: Tensor) -> RenderOutput:
    """Shade rasterised frames with the appearance.

    verts_screen: (B, V, 3) pixel x, y and depth as rasterised; verts_camera: (B, V, 3) OpenCV camera
    coordinates (for the normals the SH lighting is expressed in).
    """
    batch = verts_screen.shape[0]
    normals = vertex_normals(verts_camera, faces)
    sh = appearance.sh.unsqueeze(0).expand(batch, -1, -1)
    return shade_sh(fragments, verts_screen, faces, normals, sh, appearance.albedo())


class PhotometricEnergy:
    """Render-and-compare term; `appearance` is fixed while poses are fitted (its tensors may be leaves that
    an optimiser updates alongside, see fit_adam's `extra`)."""

    name = "photometric"

    def __init__(self, cfg: PhotometricConfig, appearance: Appearance, face_weights: Tensor):
        if cfg.robust not in ("l1", "huber"):
            raise TrackerError(f"energy.photometric.robust must be l1 or huber, got {cfg.robust!r}")
        self.cfg = cfg
        self.appearance = appearance
        self.face_weights = face_weights
        """(F,) region weight of each face, see `face_region_weights`."""

    def __call__(self, ev: Evaluation) -> Tensor:
        if ev.obs.images is None:
            raise RuntimeError("the photometric term needs Observations.images")
        fragments = ev.fragments
        faces = ev.model.faces
        rendered = render_appearance(self.appearance, fragments, ev.screen_vertices, to_camera(ev.vertices), faces)
        pixels = fragments.covered
        batch = ev.screen_vertices.shape[0]
        target = ev.obs.images.reshape(-1, 3).index_select(0, pixels.pixel).t()
        residual = masked_photometric_residuals(rendered.pixel_color, target, self.face_weights[pixels.face],
                                                pixels.image, batch, self.cfg)
        return pixels_to_image(fragments, residual).reshape(batch, -1)
