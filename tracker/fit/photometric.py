"""The photometric stage (entry point `run_photometric_stage`): after landmark tracking, refine the shared
identity and every frame's pose and expression with a photometric term added to the landmark, prior and
temporal terms. The landmarks keep anchoring the fit at a reduced weight (`photometric.landmark_weight`):
detectors and FLAME's landmark embedding disagree by a few pixels even at the true parameters, and at full
weight that bias outweighs what the images say.

The stage compares a square crop around the face (`StageCrop`), with a camera and landmarks in crop pixels.
1. Appearance, an albedo (texture in FLAME's UV layout, or vertex colours) and SH lighting in camera
   coordinates shared by all frames (a fixed camera and light, the head moving under them), is fitted on
   keyframes with their landmark poses held fixed: the visible pixels' faces, barycentric weights and normals
   are computed once, and each step only samples the albedo and shades.
2. Identity: the shared shape is re-estimated jointly with the keyframes' poses and expressions, alternating
   with the appearance (`refine_identity`). The landmark stage's identity is what its biased landmarks give;
   no per-frame refinement can undo it.
3. Every frame, in order, starts from its landmark fit under the new identity and is refined coarse to fine
   (`fit_photometric`): at each pyramid level, surface points seen at the level's pixels are fixed and a few
   Levenberg-Marquardt iterations move them onto the colours they should see (energy.photometric_samples):
   Gauss-Newton steps reach in a few iterations what first-order steps need hundreds for.
4. The guard (fit.guard) keeps the landmark fit of frames the refinement carried away from their landmarks.
5. The appearance is refined on more frames with their refined poses (`refine_appearance`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tracker.camera import Camera, to_camera
from tracker.config import PhotometricStageConfig, TrackerConfig
from tracker.energy.base import Observations, reweighted
from tracker.energy.contour import POINTS_KEY as CONTOUR_POINTS
from tracker.energy.head_size import HOLD_WEIGHT, HeadSizeEnergy
from tracker.energy.photometric import (
    Appearance,
    PhotometricConfig,
    RegionMesh,
    inlier_mask,
    masked_photometric_residuals,
    neutral_sh,
    region_mesh,
    render_appearance,
    screen_vertices,
)
from tracker.energy.photometric_samples import SampledPhotometricEnergy, SurfaceSamples, head_rotation, triangle_normals
from tracker.errors import TrackerError
from tracker.fit.guard import guard_error_growth
from tracker.fit.sequence import TrackResult, choose_keyframes, landmark_error_px, predict_next
from tracker.fit.solver import FRAME_FIELDS, LANDMARK_FIELDS, Problem, adam_minimise, fit_lm, torch_threads
from tracker.flame.assets import FlameBundle
from tracker.flame.landmarks import yaw_degrees
from tracker.flame.model import FlameModel, FlameParams
from tracker.render.albedo_model import AlbedoModel, load_albedo_model
from tracker.render.backends import get_rasterizer
from tracker.render.barycentric import face_corner_values
from tracker.render.interpolate import interpolate_covered
from tracker.render.rasterize import Fragments, RasterSettings
from tracker.render.shading import normalize_channels, sh_basis, vertex_normals
from tracker.render.texture import load_obj, sample_texture_points, symmetry_loss, total_variation

UV_OBJ_NAME = "head_template.obj"
"""FLAME's UV layout ships as this mesh in the FLAME assets folder."""


@dataclass(frozen=True)
class StageCrop:
    """The square of the video frames the stage compares: video pixels [x0, x0 + side) x [y0, y0 + side)
    resampled to size x size stage pixels, so stage pixel = (video pixel - (x0, y0)) * size / side."""

    x0: int
    y0: int
    side: int
    size: int

    @property
    def scale(self) -> float:
        """Stage pixels per video pixel."""
        return self.size / self.side

    def image(self, rgb: np.ndarray) -> np.ndarray:
        """A video frame (H, W, 3) uint8 -> its (size, size, 3) stage image."""
        box = rgb[self.y0:self.y0 + self.side, self.x0:self.x0 + self.side]
        shrink = self.size < self.side
        return cv2.resize(box, (self.size, self.size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

    def camera(self, camera: Camera) -> Camera:
        """The camera whose pixels are the stage image's."""
        origin = camera.center.new_tensor([self.x0, self.y0])
        return Camera(camera.focal * self.scale, (camera.center - origin) * self.scale, self.size, self.size)

    def observations(self, obs: Observations) -> Observations:
        """Landmark (and face-outline) observations in stage pixels."""
        origin = obs.landmarks.new_tensor([self.x0, self.y0])
        extras = dict(obs.extras)
        if CONTOUR_POINTS in extras:
            extras[CONTOUR_POINTS] = (extras[CONTOUR_POINTS] - origin) * self.scale
        return replace(obs, landmarks=(obs.landmarks - origin) * self.scale, face_size=obs.face_size * self.scale,
                       extras=extras)


def stage_crop(obs: Observations, valid: np.ndarray, frame_size: tuple[int, int], resolution: int,
               margin: float) -> StageCrop:
    """The square around every valid frame's detected landmarks, grown by `margin` x its side on each side
    (the landmarks stop at the brows; the forehead is compared too) and kept inside the frame."""
    height, width = frame_size
    points = obs.landmarks[torch.as_tensor(valid, device=obs.landmarks.device)]
    seen = obs.landmark_weights[torch.as_tensor(valid, device=obs.landmarks.device)] > 0
    if not bool(seen.any()):
        raise TrackerError("photometric stage: no detected landmarks to place the face crop")
    points = points[seen]
    low, high = points.min(dim=0).values, points.max(dim=0).values
    centre = (low + high) / 2
    side = min(int(np.ceil(float((high - low).max()) * (1 + 2 * margin))), height, width)
    x0 = int(np.clip(round(float(centre[0]) - side / 2), 0, width - side))
    y0 = int(np.clip(round(float(centre[1]) - side / 2), 0, height - side))
    return StageCrop(x0, y0, side, resolution)


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


def initial_appearance(stage: PhotometricStageConfig, bundle: FlameBundle, color: Tensor,
                       model: AlbedoModel | None = None) -> Appearance:
    """Uniform albedo of `color` (3,) under neutral white light, as a texture or as vertex colours; with an
    albedo model, its mean albedo under light that makes it `color` on average."""
    device = color.device
    if model is not None:
        mean = model.mean.to(device)
        sh = neutral_sh(device) * (color / mean.mean(dim=(1, 2)).clamp(min=1e-3))  # per channel: white balance
        return Appearance(sh, texture=mean.clone(), corner_uvs=load_corner_uvs(stage, bundle, device),
                          albedo_model=model.to(device), albedo_code=torch.zeros(model.components, device=device))
    if stage.albedo == "texture":
        size = stage.texture_size
        return Appearance(neutral_sh(device), texture=color.view(3, 1, 1).expand(3, size, size).clone(),
                          corner_uvs=load_corner_uvs(stage, bundle, device))
    return Appearance(neutral_sh(device), vertex_colors=color.expand(bundle.model.n_vertices, 3).clone())


@dataclass(frozen=True)
class PixelGeometry:
    """What fixed geometry gives the P covered pixels of B frames, for appearance fitting.

    face, image: (P,) FLAME face (full mesh index) and frame of each pixel; region_face: (P,) the face's index
    in the region mesh; bary: (3, P) perspective-correct barycentric weights; normals: (3, P) unit normals in
    camera coordinates; target: (3, P) observed colours.
    """

    face: Tensor
    region_face: Tensor
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
        face=mesh.face_ids[pixels.face], region_face=pixels.face, image=pixels.image, bary=values[3:], normals=normalize_channels(values[:3]),
        target=images.reshape(-1, 3).index_select(0, pixels.pixel).t(), batch=batch,
    )


def pixel_albedo_sampler(appearance: Appearance, faces: Tensor, geometry: PixelGeometry) -> Callable[[Tensor], Tensor]:
    """albedo(texture (3, Ht, Wt) or vertex colours (V, 3)) -> (3, P) albedo at the pixels of fixed geometry
    (what does not depend on the albedo is computed once)."""
    bary = geometry.bary.unsqueeze(-1)  # (3 corners, P, 1)
    if appearance.texture is not None:
        corners = appearance.corner_uvs.index_select(0, geometry.face).movedim(1, 0)  # (3 corners, P, 2)
        uv = bary[0] * corners[0] + bary[1] * corners[1] + bary[2] * corners[2]
        return lambda texture: sample_texture_points(texture.unsqueeze(0), uv)
    corner_vertices = faces.index_select(0, geometry.face).t()  # (3 corners, P)
    weights = geometry.bary.unsqueeze(1)  # (3 corners, 1, P)
    return lambda colors: sum(colors.index_select(0, corner_vertices[k]).t() * weights[k] for k in range(3))


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
    loss = stage.albedo_smoothness * total_variation(texture)
    return loss + stage.albedo_symmetry * symmetry_loss(texture) if stage.albedo_symmetry > 0 else loss


def seen_weight(sampler: Callable[[Tensor], Tensor], albedo: Tensor) -> Tensor:
    """(Ht, Wt) or (V,) total sampling weight each texel (vertex) of an albedo shaped like `albedo` gets from
    the pixels of `sampler` (pixel_albedo_sampler): how many pixels' worth of them saw it."""
    probe = torch.zeros_like(albedo, requires_grad=True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(sampler(probe).sum(), probe)
    return grad[0] if albedo.dim() == 3 else grad[:, 0]


def fit_appearance(geometry: PixelGeometry, init: Appearance, faces: Tensor, term: PhotometricConfig,
                   stage: PhotometricStageConfig, iters: int | None = None, warmup: int | None = None) -> Appearance:
    """Albedo and SH lighting that best explain the pixels of fixed geometry.

    With photometric.frame_lighting each frame has its own lighting (lights change; the first frame's DC term
    is the fixed convention, the others' may differ: brightness changes), and the appearance's lighting is their
    mean; otherwise one lighting beyond its fixed DC term. With an albedo model (init.albedo_model) its
    coefficients are fitted instead of texels, and no DC term is fixed: the model fixes the albedo's scale.
    iters: Adam steps (default photometric.texture_keyframe_iters). The first `warmup` of them (default half)
    use the robust loss only, the rest also drop outlier pixels: with the uniform initial albedo every
    distinctive feature (brows, lips) would look like an outlier; from a fitted albedo no warm-up is needed.
    """
    iters = stage.texture_keyframe_iters if iters is None else iters
    warmup = iters // 2 if warmup is None else min(warmup, iters)
    model = init.albedo_model
    free = (init.albedo_code if model is not None else init.texture if init.texture is not None
            else init.vertex_colors).detach().clone().requires_grad_(True)
    lights = geometry.batch if stage.frame_lighting else 1
    sh_free = init.sh.detach().expand(lights, -1, -1).clone().requires_grad_(True)  # row 0 of frame 0: fixed
    fixed_dc = torch.zeros(lights, 9, 1, device=free.device)
    fixed_dc[0, 0] = 1.0 if model is None else 0.0
    pixel_frame = geometry.image if lights > 1 else torch.zeros_like(geometry.image)
    basis = sh_basis(geometry.normals)  # (9, P)
    edges = mesh_edges(faces) if init.texture is None else faces.new_zeros(0, 2)

    albedo_at_pixels = pixel_albedo_sampler(init, faces, geometry)
    shaped = init.texture if init.texture is not None else init.vertex_colors
    coverage = seen_weight(albedo_at_pixels, shaped)
    if init.coverage is not None:  # refitting from a fitted appearance: what it saw stays seen
        coverage = torch.maximum(coverage, init.coverage)

    def albedo() -> Tensor:
        return model.albedo(free) if model is not None else free

    def frame_sh() -> Tensor:
        return fixed_dc * init.sh + (1 - fixed_dc) * sh_free  # (lights, 9, 3)

    def current() -> Appearance:
        if model is not None:
            return replace(init, sh=frame_sh().mean(dim=0), coverage=coverage, texture=albedo(), albedo_code=free)
        return replace(init, sh=frame_sh().mean(dim=0), coverage=coverage,
                       **({"texture": free} if init.texture is not None else {"vertex_colors": free}))

    def regulariser() -> Tensor:
        if model is not None:  # the model is the albedo's prior
            return stage.albedo_prior * free.pow(2).sum()
        return appearance_regulariser(current(), stage, edges)

    def loss_with(cfg: PhotometricConfig) -> Callable[[], Tensor]:
        def loss() -> Tensor:
            shading = torch.einsum("kp,pkc->cp", basis, frame_sh()[pixel_frame])
            color = albedo_at_pixels(albedo()) * shading
            residual = masked_photometric_residuals(color, geometry.target, geometry.image, geometry.batch, cfg)
            return residual.pow(2).sum() / geometry.batch + regulariser()
        return loss

    tensors = {"albedo": free, "sh": sh_free}
    unit = replace(term, weight=1.0)  # the regulariser weights are relative to a unit data term
    if warmup > 0:
        adam_minimise(loss_with(replace(unit, outlier_k=float("inf"))), tensors, warmup, stage.appearance_lr)
    if iters > warmup:
        adam_minimise(loss_with(unit), tensors, iters - warmup, stage.appearance_lr)
    return current().detach()


def frame_images(images: np.ndarray, t: int, device: torch.device) -> Tensor:
    """Frame t of (T, h, w, 3) uint8 images as (1, h, w, 3) floats in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images[t])).to(device).unsqueeze(0).float() / 255


def frames_geometry(mesh: RegionMesh, camera: Camera, params: FlameParams, images: np.ndarray, frames: np.ndarray,
                    backend: str) -> PixelGeometry:
    """`pixel_geometry` of the chosen frames of a track (params: all T frames; images: (T, h, w, 3) uint8)."""
    device = mesh.vertex_ids.device
    batch = torch.cat([frame_images(images, int(t), device) for t in frames])
    return pixel_geometry(mesh, camera, params.frames(torch.as_tensor(frames, device=device)), batch, 1.0, backend)


def estimate_appearance(mesh: RegionMesh, camera: Camera, params: FlameParams, images: np.ndarray,
                        bundle: FlameBundle, cfg: TrackerConfig, keyframes: np.ndarray,
                        model: AlbedoModel | None = None) -> Appearance:
    """Appearance from the keyframes' images (camera: theirs) with their poses held fixed (with `model`, its
    albedo)."""
    geometry = frames_geometry(mesh, camera, params, images, keyframes, cfg.photometric.renderer)
    if geometry.face.numel() == 0:
        raise TrackerError("photometric stage: the compared regions are not visible in any keyframe")
    init = initial_appearance(cfg.photometric, bundle, geometry.target.mean(dim=1), model)
    return fit_appearance(geometry, init, bundle.model.faces.to(init.sh.device), cfg.energy.photometric,
                          cfg.photometric)


def refine_appearance(appearance: Appearance, mesh: RegionMesh, camera: Camera, result: TrackResult,
                      images: np.ndarray, bundle: FlameBundle, cfg: TrackerConfig) -> Appearance:
    """The keyframe appearance refined after the per-frame pass: refitted, from itself, on
    photometric.appearance_refine_frames frames spread over the sequence, with their refined poses held fixed.
    The keyframe fit saw few views under landmark poses; the refined poses align texels better, and more
    views fill in the sides of the face."""
    stage = cfg.photometric
    if stage.appearance_refine_frames < 1 or stage.appearance_refine_iters < 1:
        return appearance
    frames = choose_keyframes(result.valid, stage.appearance_refine_frames)
    geometry = frames_geometry(mesh, camera, result.params, images, frames, stage.renderer)
    if geometry.face.numel() == 0:
        return appearance
    return fit_appearance(geometry, appearance, bundle.model.faces.to(appearance.sh.device), cfg.energy.photometric,
                          stage, iters=stage.appearance_refine_iters, warmup=0)


def downsample(images: Tensor, factor: int) -> Tensor:
    """(B, H, W, C) images box-filtered by an integer factor -> (B, H // factor, W // factor, C).

    Dropping the last rows/columns when they do not divide keeps pixel coordinates exactly proportional:
    pixel i of the result covers pixels [i f, (i + 1) f) of the input.
    """
    if factor == 1:
        return images
    return F.avg_pool2d(images.permute(0, 3, 1, 2), factor).permute(0, 2, 3, 1).contiguous()


def pyramid_factors(levels: int) -> list[int]:
    """Downsampling factor of each pyramid level, coarse to fine: 4, 2, 1 for three levels."""
    return [2 ** level for level in reversed(range(levels))]


MIN_COVERAGE = 0.5
"""Surface points whose albedo the appearance fit saw with less than this many pixels' worth are not compared."""
LIGHTING_RIDGE = 1e-2
"""Pull of a frame's own lighting towards the sequence's, per unit of sample weight (weak: light changes)."""


def frame_lighting(albedo: Tensor, normals: Tensor, target: Tensor, image: Tensor, batch: int, sh: Tensor,
                   term: PhotometricConfig) -> Tensor:
    """(B, 9, 3) SH lighting of each of B frames that best explains its pixels' colours (3, P) given their
    albedo (3, P) and camera-frame normals (3, P) (image: (P,) frame of each pixel), by weighted least squares
    (pixels that are outliers under the sequence lighting `sh` (9, 3) left out), pulled weakly towards `sh`."""
    basis = sh_basis(normals)  # (9, P)
    residual = albedo * (sh.t() @ basis) - target
    keep = inlier_mask(residual.norm(dim=0), image, batch, term.outlier_k, term.outlier_floor)
    lights = []
    for b in range(batch):
        rows = image == b
        weight = keep[rows]
        ridge = LIGHTING_RIDGE * float(weight.sum().clamp(min=1.0)) * torch.eye(9, device=sh.device)
        channels = []
        for c in range(3):
            design = (albedo[c, rows] * basis[:, rows]).t()  # (P_b, 9)
            normal = design.t() @ (design * weight[:, None]) + ridge
            channels.append(torch.linalg.solve(normal, design.t() @ (weight * target[c, rows]) + ridge @ sh[:, c]))
        lights.append(torch.stack(channels, dim=1))
    return torch.stack(lights)


@torch.no_grad()
def surface_samples(mesh: RegionMesh, appearance: Appearance, faces: Tensor, camera: Camera, params: FlameParams,
                    images: Tensor, image_scale: float, term: PhotometricConfig, max_samples: int,
                    backend: str, own_lighting: bool = False) -> SurfaceSamples:
    """The surface points of the region mesh seen at the pixels of images (B, H, W, 3) in frames `params`, at
    most max_samples per frame (every k-th covered pixel), with their albedo, normal offsets and each frame's
    lighting (own_lighting: fitted to the frame, `frame_lighting`; else the appearance's). Points on albedo the
    appearance fit did not see (`Appearance.coverage`) are left out. faces: FLAME's (F, 3) triangles (for
    vertex-colour albedo).
    """
    batch = params.batch_size
    geometry = pixel_geometry(mesh, camera, params, images, image_scale, backend)
    sampler = pixel_albedo_sampler(appearance, faces, geometry)
    textured = appearance.texture is not None
    albedo = sampler(appearance.texture if textured else appearance.vertex_colors)
    seen = torch.ones_like(geometry.image, dtype=torch.bool)
    if appearance.coverage is not None:
        seen = sampler(appearance.coverage[None] if textured else appearance.coverage[:, None])[0] >= MIN_COVERAGE
    sh = appearance.sh.expand(batch, -1, -1)
    if own_lighting:
        sh = frame_lighting(albedo[:, seen], geometry.normals[:, seen], geometry.target[:, seen],
                            geometry.image[seen], batch, appearance.sh, term)
    counts = torch.bincount(geometry.image, minlength=batch)
    rank = torch.arange(len(geometry.image), device=counts.device) - (torch.cumsum(counts, 0) - counts)[geometry.image]
    stride = torch.clamp(torch.div(counts + max_samples - 1, max_samples, rounding_mode="floor"), min=1)[geometry.image]
    chosen = torch.nonzero(rank % stride == 0).squeeze(1)
    frame, slot = geometry.image[chosen], torch.div(rank[chosen], stride[chosen], rounding_mode="floor")

    triangles = mesh.model.faces[geometry.region_face[chosen]]  # (P, 3) region-mesh vertices
    used, corners = torch.unique(triangles, return_inverse=True)
    corner_points = mesh.model(params).vertices[frame.unsqueeze(1), triangles]
    offset = to_camera(geometry.normals[:, chosen].t()) - triangle_normals(corner_points)  # world frame
    offset = (offset.unsqueeze(1) @ head_rotation(params)[frame]).squeeze(1)  # head frame: R^T offset

    width = int(slot.max()) + 1 if len(slot) else 1

    def padded(values: Tensor) -> Tensor:
        out = values.new_zeros(batch, width, *values.shape[1:])
        out[frame, slot] = values
        return out

    return SurfaceSamples(mesh.model.restricted(used), padded(corners), padded(geometry.bary[:, chosen].t()),
                          padded(albedo[:, chosen].t()), padded(offset), padded(seen[chosen]), sh.contiguous())


def stage_problem(problem: Problem, crop: StageCrop, landmark_weight: float, prior_weight: float = 1.0) -> Problem:
    """The landmark stage's problem in stage pixels, its landmark and face-outline terms (detector evidence)
    weighted by `landmark_weight`, its priors by `prior_weight`."""
    terms = reweighted(problem.terms, {"landmarks": landmark_weight, "contour": landmark_weight,
                                       "priors": prior_weight})
    return Problem(problem.model, problem.landmarks, crop.camera(problem.camera), terms, jacobian=problem.jacobian)


def fit_photometric(problem: Problem, mesh: RegionMesh, appearance: Appearance, params: FlameParams,
                    obs: Observations, images: Tensor, cfg: TrackerConfig, free: Sequence[str], iters: int,
                    reference: FlameParams | None = None, free_shape: bool = False) -> FlameParams:
    """Coarse-to-fine Levenberg-Marquardt of B frames with the photometric term on surface samples.

    problem: in stage pixels (the frames' landmarks in obs are too); images: (B, H, W, 3) the frames at stage
    size in [0, 1]. At each pyramid level (photometric.pyramid_levels), samples are taken at the level's pixels
    from the current fit, then `iters` iterations move the `free` fields (and the shared identity when
    free_shape). Returns detached parameters.
    """
    stage, term = cfg.photometric, cfg.energy.photometric
    for factor in pyramid_factors(stage.pyramid_levels):
        level_images, level_appearance = downsample(images, factor), appearance.blurred(factor)
        samples = surface_samples(mesh, level_appearance, problem.model.faces, problem.camera, params, level_images,
                                  1.0 / factor, term, stage.samples, stage.renderer, stage.frame_lighting)
        photometric = SampledPhotometricEnergy(term, samples, level_images, 1.0 / factor)
        params, _ = fit_lm(problem.with_terms([*problem.terms, photometric]), params, obs, free, iters, reference,
                           free_shape=free_shape)
    return params


def stacked_images(images: np.ndarray, frames: Sequence[int], device: torch.device) -> Tensor:
    """(B, h, w, 3) floats in [0, 1] of the chosen frames of (T, h, w, 3) uint8 images."""
    return torch.cat([frame_images(images, int(t), device) for t in frames])


KEYFRAME_MAX_YAW = 45.0
"""Keyframes (appearance, identity) are chosen among frames turned less than this (degrees): the landmark fits
of profile views are the least reliable, and a texture unwrapped under a wrong pose spoils every frame."""


def appearance_keyframes(result: TrackResult, count: int) -> np.ndarray:
    """Up to `count` frames spread over the sequence among the valid frames whose landmark fit is trustworthy
    (|yaw| < KEYFRAME_MAX_YAW, landmark error at most twice the median); all valid frames when too few are."""
    with torch.no_grad():
        yaw = yaw_degrees(head_rotation(result.params)).abs().cpu().numpy()
    errors = np.where(result.valid, result.lmk_error_px, np.inf)
    trusted = result.valid & (yaw < KEYFRAME_MAX_YAW) & (errors <= 2 * np.nanmedian(result.lmk_error_px[result.valid]))
    return choose_keyframes(trusted if trusted.sum() >= min(count, result.valid.sum()) else result.valid, count)


def refine_identity(problem: Problem, mesh: RegionMesh, appearance: Appearance, result: TrackResult,
                    obs: Observations, images: np.ndarray, keyframes: np.ndarray, bundle: FlameBundle,
                    cfg: TrackerConfig, refit_appearance: bool = True) -> tuple[Tensor, Appearance]:
    """The shared identity (1, n_shape) re-estimated on keyframes, and the appearance refitted along.

    Each of photometric.identity_rounds rounds runs `fit_photometric` on the keyframes with the shape free
    (their poses and expressions free too, no temporal term: keyframes are not neighbours), then refits the
    appearance under the new geometry (photometric.identity_appearance_iters steps from the current one;
    not with refit_appearance off: a known appearance).
    A single camera sees the head's size only together with its distance: the compared regions of the neutral
    head keep their size under the landmark identity (`HeadSizeEnergy` on the region mesh), the images choose
    their shape. Under an albedo model the size is held only as firmly as photometric.albedo_model_size_weight
    says (default: free): its albedo cannot follow a wrong head, and the images then tell the size better than
    the landmarks did (README: with a free texture, freeing the size made fits worse; with a model, better).
    """
    stage = cfg.photometric
    device = mesh.vertex_ids.device
    index = torch.as_tensor(keyframes, device=device)
    params = result.params.frames(index).detach()
    key_obs, key_images = obs.frames(index), stacked_images(images, keyframes, device)
    weight = HOLD_WEIGHT if appearance.albedo_model is None else stage.albedo_model_size_weight
    size = [HeadSizeEnergy(mesh.model, result.params.shape, weight)] if weight > 0 else []
    problem = problem.with_terms([term for term in problem.terms if term.name != "temporal"] + size)
    faces = bundle.model.faces.to(device)
    for _ in range(stage.identity_rounds):
        params = fit_photometric(problem, mesh, appearance, params, key_obs, key_images, cfg, LANDMARK_FIELDS,
                                 stage.identity_iters, free_shape=True)
        if not refit_appearance:
            continue
        geometry = pixel_geometry(mesh, problem.camera, params, key_images, 1.0, stage.renderer)
        appearance = fit_appearance(geometry, appearance, faces, cfg.energy.photometric, stage,
                                    iters=stage.identity_appearance_iters, warmup=0)
    return params.shape, appearance


def refine_frames(problem: Problem, mesh: RegionMesh, appearance: Appearance, result: TrackResult, shape: Tensor,
                  obs: Observations, images: np.ndarray, cfg: TrackerConfig, free: Sequence[str],
                  progress: Callable[[], None] | None = None) -> TrackResult:
    """Every valid frame in order, from its landmark fit with the identity `shape`, refined by `fit_photometric`
    with the temporal term referring to the refined previous frames (constant-velocity prediction)."""
    device = mesh.vertex_ids.device
    refined: list[FlameParams] = []
    errors = result.lmk_error_px.copy()
    prev = prev2 = None
    for t in range(len(result.valid)):
        params = replace(result.params.frames(slice(t, t + 1)).detach(), shape=shape)
        if result.valid[t]:
            frame_obs = obs.frames(slice(t, t + 1))
            reference = predict_next(prev, prev2) if prev is not None else None
            params = fit_photometric(problem, mesh, appearance, params, frame_obs, frame_images(images, t, device),
                                     cfg, free, cfg.photometric.frame_iters, reference)
            if bool((frame_obs.landmark_weights > 0).any()):  # bridged frames have none: their error stays
                errors[t] = float(landmark_error_px(problem, params, frame_obs)[0])
            prev2, prev = prev, params
        else:
            prev = prev2 = None
        refined.append(params)
        if progress:
            progress()
    stacked = FlameParams(shape=shape, **{name: torch.cat([getattr(p, name) for p in refined]) for name in FRAME_FIELDS})
    return replace(result, params=stacked, lmk_error_px=np.asarray(errors, np.float32))


def check_stage_inputs(result: TrackResult, images: np.ndarray, crop: StageCrop, stage: PhotometricStageConfig) -> None:
    if images.shape != (len(result.valid), crop.size, crop.size, 3) or images.dtype != np.uint8:
        raise TrackerError(f"photometric stage: images must be ({len(result.valid)}, {crop.size}, {crop.size}, 3) "
                           f"uint8 (the crop of every tracked frame), got {images.shape} {images.dtype}")
    if stage.albedo not in ("texture", "vertex"):
        raise TrackerError(f"photometric.albedo must be texture or vertex, got {stage.albedo!r}")
    if stage.albedo_model and stage.albedo != "texture":
        raise TrackerError("photometric.albedo_model is a texture model: it needs photometric.albedo: texture")
    if stage.pyramid_levels < 1 or stage.keyframes < 1 or stage.texture_size < 8 or stage.frame_iters < 1 \
            or stage.samples < 1:
        raise TrackerError("photometric.pyramid_levels, keyframes, frame_iters and samples must be >= 1, "
                           "texture_size >= 8")
    if crop.size < 2 ** (stage.pyramid_levels - 1) * 16:
        raise TrackerError(f"photometric.pyramid_levels {stage.pyramid_levels} is too many for {crop.size} pixel "
                           "images: lower it or raise photometric.resolution")


def run_photometric_stage(problem: Problem, result: TrackResult, obs: Observations, images: np.ndarray,
                          crop: StageCrop, bundle: FlameBundle, cfg: TrackerConfig,
                          progress: Callable[[], None] | None = None,
                          appearance: Appearance | None = None) -> tuple[TrackResult, Appearance, dict]:
    """Refine a landmark track photometrically (see the module docstring).

    problem: the landmark stage's Problem (landmark, prior and temporal terms; its camera holds the
        estimated focal length); the photometric term is added to its terms.
    result: the landmark stage's TrackResult (T frames); obs: its landmark Observations (video pixels).
    images: (T, size, size, 3) uint8 RGB stage images, crop.image(frame) of every tracked frame;
    crop: from `stage_crop` (obs, result.valid, video size, photometric.resolution, photometric.crop_margin).
    progress: called once per frame.
    appearance: the sequence's albedo and lighting when known (a scan, or a synthetic sequence's truth, to
        measure what estimating it costs): used as is, neither estimated nor refitted.
    Returns the refined TrackResult (landmark errors recomputed, video pixels), the sequence's Appearance and
    a report: the identity's change (RMS vertex displacement of the neutral head, mm) and the guard's report.
    """
    stage, term = cfg.photometric, cfg.energy.photometric
    check_stage_inputs(result, images, crop, stage)
    if not result.valid.any():
        raise TrackerError("photometric stage: no frame has a landmark fit to refine")
    with torch_threads(1):  # small images: per-op overhead dominates, and extra threads only contend
        # Everything below works in stage pixels: a camera and landmarks for the crop.
        crop_problem = stage_problem(problem, crop, stage.landmark_weight, stage.prior_weight)
        crop_obs = crop.observations(obs)
        mesh = region_mesh(problem.model, bundle.masks, term.regions)
        keyframes = appearance_keyframes(result, stage.keyframes)
        known = appearance is not None
        model = None
        if not known and stage.albedo_model:
            model = load_albedo_model(stage.albedo_model, stage.texture_size, stage.albedo_components)
        if not known:
            appearance = estimate_appearance(mesh, crop_problem.camera, result.params, images, bundle, cfg, keyframes,
                                             model)
        shape, appearance = refine_identity(crop_problem, mesh, appearance, result, crop_obs, images, keyframes,
                                            bundle, cfg, refit_appearance=not known)
        # The neck turns the head like the global rotation: free it only when the neck itself is compared.
        free = FRAME_FIELDS if "neck" in term.regions else LANDMARK_FIELDS
        refined = refine_frames(crop_problem, mesh, appearance, result, shape, crop_obs, images, cfg, free, progress)
        refined = replace(refined, lmk_error_px=refined.lmk_error_px / crop.scale)
        refined, guard = guard_error_growth(result, refined, obs.face_size.cpu().numpy(), stage.guard, "photometric")
        refined = with_landmark_errors(problem, refined, obs)
        if not known:
            appearance = refine_appearance(appearance, mesh, crop_problem.camera, refined, images, bundle, cfg)
    report = {"keyframes": len(keyframes), "identity_change_mm": round(shape_change_mm(
        problem.model, result.params.shape, refined.params.shape), 3), "guard": guard,
        "albedo_model": model.source if model is not None else None}
    return refined, appearance, report


def with_landmark_errors(problem: Problem, result: TrackResult, obs: Observations) -> TrackResult:
    """result with the landmark errors (video pixels) of its valid frames that have landmarks recomputed."""
    errors = result.lmk_error_px.copy()
    valid = np.flatnonzero(result.valid & (obs.landmark_weights > 0).any(dim=1).cpu().numpy())
    index = torch.as_tensor(valid, device=obs.landmarks.device)
    errors[valid] = landmark_error_px(problem, result.params.frames(index), obs.frames(index)).cpu().numpy()
    return replace(result, lmk_error_px=errors)


@torch.no_grad()
def shape_change_mm(model: FlameModel, before: Tensor, after: Tensor) -> float:
    """RMS displacement (mm) of the neutral head's vertices between two identities (1, n_shape)."""
    neutral = FlameParams.zeros(1, model.n_shape, model.n_expr, before.device)
    first = model(replace(neutral, shape=before)).vertices
    second = model(replace(neutral, shape=after)).vertices
    return float((first - second).square().sum(-1).mean().sqrt()) * 1000


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
