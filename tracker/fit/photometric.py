"""The photometric stage: after landmark tracking, estimate the sequence's appearance (albedo texture or vertex
colours, and SH lighting) on keyframes, then refine every frame's pose and expression with the photometric
term added to the landmark, prior and temporal terms (the landmarks keep anchoring the fit), coarse to fine.

Appearance fitting holds the keyframes' geometry fixed, so the visible pixels' faces, barycentric weights and
normals are computed once and each optimiser step only samples the albedo and shades. Lighting is in camera
coordinates and shared by all frames (a fixed light and camera, the head moving under it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tracker.camera import Camera, to_camera
from tracker.config import PhotometricStageConfig, TrackerConfig
from tracker.energy.base import Observations
from tracker.energy.photometric import (
    Appearance,
    PhotometricConfig,
    PhotometricEnergy,
    RegionMesh,
    masked_photometric_residuals,
    neutral_sh,
    region_mesh,
    render_appearance,
    screen_vertices,
)
from tracker.errors import TrackerError
from tracker.fit.refine import refine_sequence
from tracker.fit.sequence import TrackResult, choose_keyframes
from tracker.fit.solver import FRAME_FIELDS, LANDMARK_FIELDS, Problem, adam_minimise
from tracker.flame.assets import FlameBundle
from tracker.flame.model import FlameParams
from tracker.render.backends import get_rasterizer
from tracker.render.barycentric import face_corner_values
from tracker.render.interpolate import interpolate_covered
from tracker.render.rasterize import Fragments, RasterSettings
from tracker.render.shading import normalize_channels, sh_irradiance, vertex_normals
from tracker.render.texture import load_obj, sample_texture_points, symmetry_loss, total_variation

UV_OBJ_NAME = "head_template.obj"
"""FLAME's UV layout ships as this mesh in the FLAME assets folder."""


def stage_image_size(height: int, width: int, resolution: int) -> tuple[int, int, float]:
    """(h, w, scale) of the stage images: the longer side at most `resolution`, scale = stage px per video px."""
    scale = min(1.0, resolution / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale)), scale


def make_rasterizer(backend: str, image_size: tuple[int, int]) -> Callable[[Tensor, Tensor], Fragments]:
    """The Problem's rasterizer callable for one image size."""
    rasterize = get_rasterizer(backend)
    settings = RasterSettings(image_size=image_size)
    return lambda verts_screen, faces: rasterize(verts_screen, faces, settings)


def load_corner_uvs(stage: PhotometricStageConfig, bundle: FlameBundle, device: torch.device) -> Tensor:
    """(F, 3, 2) UVs per face corner from `photometric.uv_obj` or the FLAME assets' head_template.obj."""
    path = Path(stage.uv_obj) if stage.uv_obj else bundle.assets_dir / UV_OBJ_NAME
    mesh = load_obj(path)
    if not torch.equal(mesh.faces, bundle.model.faces.cpu()):
        raise TrackerError(f"{path} does not have FLAME's triangles: give FLAME's head_template.obj "
                           "(photometric.uv_obj) or use photometric.albedo: vertex")
    return mesh.corner_uvs().to(device)


def initial_appearance(stage: PhotometricStageConfig, bundle: FlameBundle, color: Tensor) -> Appearance:
    """Uniform albedo of `color` (3,) under neutral white light, as a texture or as vertex colours."""
    device = color.device
    if stage.albedo == "texture":
        size = stage.texture_size
        return Appearance(neutral_sh(device), texture=color.view(3, 1, 1).expand(3, size, size).clone(),
                          corner_uvs=load_corner_uvs(stage, bundle, device))
    return Appearance(neutral_sh(device), vertex_colors=color.expand(bundle.model.n_vertices, 3).clone())


@dataclass(frozen=True)
class PixelGeometry:
    """What fixed geometry gives the P covered pixels of B frames, for appearance fitting.

    face, image: (P,) FLAME face (full mesh index) and frame of each pixel; bary: (3, P) perspective-correct
    barycentric weights; normals: (3, P) unit normals in camera coordinates; target: (3, P) observed colours.
    """

    face: Tensor
    image: Tensor
    bary: Tensor
    normals: Tensor
    target: Tensor
    batch: int


@torch.no_grad()
def pixel_geometry(mesh: RegionMesh, camera: Camera, params: FlameParams, images: Tensor, image_scale: float,
                   backend: str) -> PixelGeometry:
    """Rasterise the region mesh in frames `params` at the size of images (B, H, W, 3), keep the pixels."""
    batch = params.batch_size
    verts_screen, verts_camera = screen_vertices(mesh, camera, params, image_scale)
    faces = mesh.model.faces
    fragments = make_rasterizer(backend, tuple(images.shape[1:3]))(verts_screen, faces)
    normals = face_corner_values(vertex_normals(verts_camera, faces), faces)  # (3, 3, B, F)
    # Corner k's barycentric weight is the interpolation of the indicator of corner k.
    identity = torch.eye(3, device=faces.device).view(3, 3, 1, 1).expand(3, 3, batch, faces.shape[0])
    values = interpolate_covered(fragments, verts_screen, faces, torch.cat([normals, identity], dim=1))
    pixels = fragments.covered
    return PixelGeometry(
        face=mesh.face_ids[pixels.face], image=pixels.image, bary=values[3:], normals=normalize_channels(values[:3]),
        target=images.reshape(-1, 3).index_select(0, pixels.pixel).t(), batch=batch,
    )


def pixel_albedo(appearance: Appearance, faces: Tensor, face: Tensor, bary: Tensor) -> Tensor:
    """Albedo (3, P) at pixels given by face (P,) and perspective-correct barycentric weights (3, P)."""
    weights = bary.t().unsqueeze(-1)  # (P, 3 corners, 1)
    if appearance.texture is not None:
        uv = (appearance.corner_uvs.index_select(0, face) * weights).sum(dim=1)
        return sample_texture_points(appearance.texture.unsqueeze(0), uv)
    return (appearance.vertex_colors[faces[face]] * weights).sum(dim=1).t()


def mesh_edges(faces: Tensor) -> Tensor:
    """(E, 2) unique undirected edges of a triangle mesh (F, 3)."""
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(dim=1).values
    return torch.unique(edges, dim=0)


def edge_smoothness(vertex_colors: Tensor, edges: Tensor) -> Tensor:
    """Mean absolute colour difference across mesh edges: the vertex-colour analogue of total variation."""
    return (vertex_colors[edges[:, 0]] - vertex_colors[edges[:, 1]]).abs().mean()


def appearance_regulariser(appearance: Appearance, stage: PhotometricStageConfig, edges: Tensor) -> Tensor:
    """Smoothness (and, for textures, left-right symmetry) of the albedo."""
    if appearance.texture is None:
        return stage.albedo_smoothness * edge_smoothness(appearance.vertex_colors, edges)
    texture = appearance.texture.unsqueeze(0)
    return stage.albedo_smoothness * total_variation(texture) + stage.albedo_symmetry * symmetry_loss(texture)


def fit_appearance(geometry: PixelGeometry, init: Appearance, faces: Tensor, term: PhotometricConfig,
                   stage: PhotometricStageConfig, fit_lighting: bool = True) -> Appearance:
    """Albedo (and SH lighting beyond its fixed DC term) that best explain the pixels of fixed geometry.

    The first half of the steps use the robust loss only, the second half also drops outlier pixels: with
    the uniform initial albedo every distinctive feature (brows, lips) would look like an outlier.
    """
    albedo = (init.texture if init.texture is not None else init.vertex_colors).detach().clone().requires_grad_(True)
    sh_rest = init.sh[1:].detach().clone().requires_grad_(fit_lighting)
    edges = mesh_edges(faces) if init.texture is None else faces.new_zeros(0, 2)

    def current() -> Appearance:
        sh = torch.cat([init.sh[:1], sh_rest])
        return replace(init, sh=sh, **({"texture": albedo} if init.texture is not None else {"vertex_colors": albedo}))

    def loss_with(cfg: PhotometricConfig) -> Callable[[], Tensor]:
        def loss() -> Tensor:
            appearance = current()
            color = pixel_albedo(appearance, faces, geometry.face, geometry.bary) * \
                sh_irradiance(geometry.normals, appearance.sh)
            residual = masked_photometric_residuals(color, geometry.target, geometry.image, geometry.batch, cfg)
            return residual.pow(2).sum() / geometry.batch + appearance_regulariser(appearance, stage, edges)
        return loss

    tensors = {"albedo": albedo, **({"sh": sh_rest} if fit_lighting else {})}
    unit = replace(term, weight=1.0)  # the regulariser weights are relative to a unit data term
    warmup = stage.texture_keyframe_iters // 2
    adam_minimise(loss_with(replace(unit, outlier_k=float("inf"))), tensors, warmup, stage.appearance_lr)
    adam_minimise(loss_with(unit), tensors, stage.texture_keyframe_iters - warmup, stage.appearance_lr)
    return current().detach()


def frame_images(images: np.ndarray, t: int, factor: int, device: torch.device) -> Tensor:
    """Frame t of (T, h, w, 3) uint8 images as (1, h // factor, w // factor, 3) floats in [0, 1].

    Box filtering by an integer factor (dropping the last rows/columns when they do not divide) keeps pixel
    coordinates exactly proportional: pixel i of the result covers pixels [i f, (i + 1) f) of the input.
    """
    image = torch.from_numpy(np.ascontiguousarray(images[t])).to(device).permute(2, 0, 1).unsqueeze(0).float() / 255
    if factor > 1:
        image = F.avg_pool2d(image, factor)
    return image.permute(0, 2, 3, 1).contiguous()


def with_images(obs: Observations, images: Tensor, image_scale: float) -> Observations:
    return replace(obs, images=images, image_scale=image_scale)


def check_stage_inputs(result: TrackResult, images: np.ndarray, stage: PhotometricStageConfig) -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise TrackerError(f"photometric stage: images must be (T, h, w, 3) uint8, got {images.shape} {images.dtype}")
    if len(images) != len(result.valid):
        raise TrackerError(f"photometric stage: {len(images)} images for {len(result.valid)} tracked frames")
    if stage.albedo not in ("texture", "vertex"):
        raise TrackerError(f"photometric.albedo must be texture or vertex, got {stage.albedo!r}")
    if stage.pyramid_levels < 1 or stage.keyframes < 1 or stage.texture_size < 8:
        raise TrackerError("photometric.pyramid_levels and keyframes must be >= 1, texture_size >= 8")
    if min(images.shape[1:3]) < 2 ** (stage.pyramid_levels - 1) * 16:
        raise TrackerError(f"photometric.pyramid_levels {stage.pyramid_levels} is too many for "
                           f"{images.shape[2]}x{images.shape[1]} images: lower it or raise photometric.resolution")


def estimate_appearance(mesh: RegionMesh, camera: Camera, params: FlameParams, images: np.ndarray,
                        image_scale: float, bundle: FlameBundle, cfg: TrackerConfig,
                        keyframes: np.ndarray) -> Appearance:
    """Appearance from the keyframes' images with their poses held fixed (full stage resolution)."""
    device = mesh.vertex_ids.device
    key_images = torch.cat([frame_images(images, int(t), 1, device) for t in keyframes])
    key_params = params.frames(torch.as_tensor(keyframes, device=device))
    geometry = pixel_geometry(mesh, camera, key_params, key_images, image_scale, cfg.photometric.renderer)
    if geometry.face.numel() == 0:
        raise TrackerError("photometric stage: the compared regions are not visible in any keyframe")
    init = initial_appearance(cfg.photometric, bundle, geometry.target.mean(dim=1))
    return fit_appearance(geometry, init, bundle.model.faces.to(device), cfg.energy.photometric, cfg.photometric)


def run_photometric_stage(problem: Problem, result: TrackResult, obs: Observations, images: np.ndarray,
                          image_scale: float, bundle: FlameBundle, cfg: TrackerConfig,
                          progress: Callable[[], None] | None = None) -> tuple[TrackResult, Appearance]:
    """Refine a landmark track photometrically.

    problem: the landmark stage's Problem (landmark, prior and temporal terms; its camera holds the
        estimated focal length); the photometric term is added to its terms.
    result: the landmark stage's TrackResult (T frames); obs: its landmark Observations (video pixels).
    images: (T, h, w, 3) uint8 RGB frames at stage resolution (see `stage_image_size`);
    image_scale: stage pixels per video pixel.
    progress: called once per frame at each pyramid level (T x photometric.pyramid_levels calls).
    Returns the refined TrackResult (landmark errors recomputed) and the sequence's Appearance.
    """
    stage, term = cfg.photometric, cfg.energy.photometric
    check_stage_inputs(result, images, stage)
    if not result.valid.any():
        raise TrackerError("photometric stage: no frame has a landmark fit to refine")
    mesh = region_mesh(problem.model, bundle.masks, term.regions)
    keyframes = choose_keyframes(result.valid, stage.keyframes)
    appearance = estimate_appearance(mesh, problem.camera, result.params, images, image_scale, bundle, cfg,
                                     keyframes)

    # The neck turns the head like the global rotation: free it only when the neck itself is compared.
    free = FRAME_FIELDS if "neck" in term.regions else LANDMARK_FIELDS
    height, width = images.shape[1:3]
    device = mesh.vertex_ids.device
    for level in reversed(range(stage.pyramid_levels)):  # coarse to fine
        factor = 2 ** level
        size = (height // factor, width // factor)
        energy = PhotometricEnergy(term, appearance.blurred(factor), mesh)
        level_problem = problem.with_terms([*problem.terms, energy], make_rasterizer(stage.renderer, size))

        def frame_obs(t: int, factor: int = factor) -> Observations:
            return with_images(obs.frames(slice(t, t + 1)), frame_images(images, t, factor, device),
                               image_scale / factor)

        result = refine_sequence(level_problem, result, frame_obs, free, level_iters(stage, level), cfg.fit.lr,
                                 progress)
    return result, appearance


def level_iters(stage: PhotometricStageConfig, level: int) -> int:
    """Steps per frame at a pyramid level: photometric.iters split evenly, the remainder at full size."""
    share, remainder = divmod(stage.iters, stage.pyramid_levels)
    return share + (remainder if level == 0 else 0)


@torch.no_grad()
def render_frames(appearance: Appearance, mesh: RegionMesh, camera: Camera, params: FlameParams,
                  image_size: tuple[int, int], image_scale: float, backend: str = "torch") -> tuple[Tensor, Tensor]:
    """Rendered images (B, H, W, 3) of the mesh in the frames of `params`, and its coverage (B, H, W) bool.

    image_scale: pixels of the rendered images per video pixel (1 for the video's own size).
    """
    verts_screen, verts_camera = screen_vertices(mesh, camera, params, image_scale)
    fragments = make_rasterizer(backend, image_size)(verts_screen, mesh.model.faces)
    out = render_appearance(appearance, mesh, fragments, verts_screen, verts_camera)
    return out.image.clamp(0.0, 1.0), fragments.mask
