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
    face_region_weights,
    masked_photometric_residuals,
    neutral_sh,
    region_vertex_weights,
    render_appearance,
)
from tracker.errors import TrackerError
from tracker.fit.refine import refine_sequence
from tracker.fit.sequence import TrackResult, choose_keyframes
from tracker.fit.solver import FRAME_FIELDS, LANDMARK_FIELDS, Problem, adam_minimise
from tracker.flame.assets import FlameBundle
from tracker.flame.model import FlameModel, FlameParams
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

    face, image: (P,) face and frame of each pixel; bary: (3, P) perspective-correct barycentric weights;
    normals: (3, P) unit normals in camera coordinates; target: (3, P) observed colours;
    region: (P,) region weight.
    """

    face: Tensor
    image: Tensor
    bary: Tensor
    normals: Tensor
    target: Tensor
    region: Tensor
    batch: int


@torch.no_grad()
def pixel_geometry(problem: Problem, params: FlameParams, obs: Observations, face_weights: Tensor) -> PixelGeometry:
    """Rasterise the frames of `params` at the size of obs.images and keep the per-pixel geometry."""
    ev = problem.evaluation(params, obs)
    fragments, faces = ev.fragments, problem.model.faces
    batch, num_faces = params.batch_size, faces.shape[0]
    normals = face_corner_values(vertex_normals(to_camera(ev.vertices), faces), faces)  # (3, 3, B, F)
    # Corner k's barycentric weight is the interpolation of the indicator of corner k.
    identity = torch.eye(3, device=faces.device).view(3, 3, 1, 1).expand(3, 3, batch, num_faces)
    values = interpolate_covered(fragments, ev.screen_vertices, faces, torch.cat([normals, identity], dim=1))
    pixels = fragments.covered
    return PixelGeometry(
        face=pixels.face, image=pixels.image, bary=values[3:], normals=normalize_channels(values[:3]),
        target=obs.images.reshape(-1, 3).index_select(0, pixels.pixel).t(), region=face_weights[pixels.face],
        batch=batch,
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
            residual = masked_photometric_residuals(color, geometry.target, geometry.region, geometry.image,
                                                    geometry.batch, cfg)
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


def estimate_appearance(problem: Problem, params: FlameParams, obs: Observations, images: np.ndarray,
                        image_scale: float, bundle: FlameBundle, cfg: TrackerConfig, face_weights: Tensor,
                        keyframes: np.ndarray) -> Appearance:
    """Appearance from the keyframes' images with their poses held fixed (full stage resolution)."""
    device = face_weights.device
    key_index = torch.as_tensor(keyframes, device=device)
    stage_images = torch.cat([frame_images(images, int(t), 1, device) for t in keyframes])
    key_obs = with_images(obs.frames(key_index), stage_images, image_scale)
    rasterizer = make_rasterizer(cfg.photometric.renderer, tuple(stage_images.shape[1:3]))
    geometry = pixel_geometry(problem.with_terms(problem.terms, rasterizer), params.frames(key_index), key_obs,
                              face_weights)
    if not bool((geometry.region > 0).any()):
        raise TrackerError("photometric stage: the compared regions are not visible in any keyframe")
    weights = geometry.region / geometry.region.sum()
    mean_color = (geometry.target * weights).sum(dim=1)
    init = initial_appearance(cfg.photometric, bundle, mean_color)
    return fit_appearance(geometry, init, problem.model.faces, cfg.energy.photometric, cfg.photometric)


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
    model = problem.model
    device = model.faces.device
    vertex_weights = region_vertex_weights(bundle.masks, term.regions, model.n_vertices, device)
    face_weights = face_region_weights(vertex_weights, model.faces)
    keyframes = choose_keyframes(result.valid, stage.keyframes)
    appearance = estimate_appearance(problem, result.params, obs, images, image_scale, bundle, cfg, face_weights,
                                     keyframes)

    # The neck turns the head like the global rotation: free it only when the neck itself is compared.
    free = FRAME_FIELDS if "neck" in term.regions else LANDMARK_FIELDS
    height, width = images.shape[1:3]
    for level in reversed(range(stage.pyramid_levels)):  # coarse to fine
        factor = 2 ** level
        size = (height // factor, width // factor)
        energy = PhotometricEnergy(term, appearance.blurred(factor), face_weights)
        level_problem = problem.with_terms([*problem.terms, energy], make_rasterizer(stage.renderer, size))

        def frame_obs(t: int, factor: int = factor) -> Observations:
            return with_images(obs.frames(slice(t, t + 1)), frame_images(images, t, factor, device),
                               image_scale / factor)

        result = refine_sequence(level_problem, result, frame_obs, free, stage.iters, cfg.fit.lr, progress)
    return result, appearance


@torch.no_grad()
def render_frames(appearance: Appearance, model: FlameModel, camera: Camera, params: FlameParams,
                  image_size: tuple[int, int], image_scale: float, face_weights: Tensor,
                  backend: str = "torch") -> tuple[Tensor, Tensor]:
    """Rendered images (B, H, W, 3) of the frames of `params` and their region masks (B, H, W) bool.

    image_scale: pixels of the rendered images per video pixel (1 for the video's own size).
    """
    verts = model(params).vertices
    pix, depth = camera.project(verts)
    screen = torch.cat([pix * image_scale, depth.unsqueeze(-1)], dim=-1)
    fragments = make_rasterizer(backend, image_size)(screen, model.faces)
    out = render_appearance(appearance, fragments, screen, to_camera(verts), model.faces)
    region = torch.where(fragments.mask, face_weights[fragments.triangle_id.clamp(min=0)], 0.0) > 0.5
    return out.image.clamp(0.0, 1.0), region
