"""The photometric stage (entry point `run_photometric_stage`): after landmark tracking, refine every frame's
pose and expression with the photometric term added to the landmark, prior and temporal terms (the landmarks
keep anchoring the fit).

The stage compares a square crop around the face (`StageCrop`), with a camera and landmarks in crop pixels.
1. Appearance, an albedo (texture in FLAME's UV layout, or vertex colours) and SH lighting in camera
   coordinates shared by all frames (a fixed camera and light, the head moving under them), is fitted on
   keyframes with their landmark poses held fixed: the visible pixels' faces, barycentric weights and normals
   are computed once, and each step only samples the albedo and shades.
2. Every frame, in order, starts from its landmark fit and is refined by one Adam run over an image pyramid
   (coarse to fine), the head turning about its own centre (`centre_offset`).
3. The appearance is refined on more frames with their refined poses (`refine_appearance`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tracker.camera import Camera
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
from tracker.fit.sequence import TrackResult, choose_keyframes, landmark_error_px, predict_next
from tracker.fit.solver import FRAME_FIELDS, LANDMARK_FIELDS, Problem, adam_minimise, leaf_params, torch_threads
from tracker.flame.assets import FlameBundle
from tracker.flame.lbs import batch_rodrigues
from tracker.flame.model import FlameModel, FlameParams
from tracker.render.backends import get_rasterizer
from tracker.render.barycentric import face_corner_values
from tracker.render.interpolate import interpolate_covered
from tracker.render.rasterize import Fragments, RasterSettings
from tracker.render.shading import normalize_channels, sh_irradiance, vertex_normals
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
        """Landmark observations in stage pixels."""
        origin = obs.landmarks.new_tensor([self.x0, self.y0])
        return replace(obs, landmarks=(obs.landmarks - origin) * self.scale, face_size=obs.face_size * self.scale)


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


def fit_appearance(geometry: PixelGeometry, init: Appearance, faces: Tensor, term: PhotometricConfig,
                   stage: PhotometricStageConfig, iters: int | None = None, warmup: int | None = None) -> Appearance:
    """Albedo (and SH lighting beyond its fixed DC term) that best explain the pixels of fixed geometry.

    iters: Adam steps (default photometric.texture_keyframe_iters). The first `warmup` of them (default half)
    use the robust loss only, the rest also drop outlier pixels: with the uniform initial albedo every
    distinctive feature (brows, lips) would look like an outlier; from a fitted albedo no warm-up is needed.
    """
    iters = stage.texture_keyframe_iters if iters is None else iters
    warmup = iters // 2 if warmup is None else min(warmup, iters)
    albedo = (init.texture if init.texture is not None else init.vertex_colors).detach().clone().requires_grad_(True)
    sh_rest = init.sh[1:].detach().clone().requires_grad_(True)
    edges = mesh_edges(faces) if init.texture is None else faces.new_zeros(0, 2)

    def current() -> Appearance:
        sh = torch.cat([init.sh[:1], sh_rest])
        return replace(init, sh=sh, **({"texture": albedo} if init.texture is not None else {"vertex_colors": albedo}))

    albedo_at_pixels = pixel_albedo_sampler(init, faces, geometry)

    def loss_with(cfg: PhotometricConfig) -> Callable[[], Tensor]:
        def loss() -> Tensor:
            appearance = current()
            color = albedo_at_pixels(albedo) * sh_irradiance(geometry.normals, appearance.sh)
            residual = masked_photometric_residuals(color, geometry.target, geometry.image, geometry.batch, cfg)
            return residual.pow(2).sum() / geometry.batch + appearance_regulariser(appearance, stage, edges)
        return loss

    tensors = {"albedo": albedo, "sh": sh_rest}
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
                        bundle: FlameBundle, cfg: TrackerConfig, keyframes: np.ndarray) -> Appearance:
    """Appearance from the keyframes' images (camera: theirs) with their poses held fixed."""
    geometry = frames_geometry(mesh, camera, params, images, keyframes, cfg.photometric.renderer)
    if geometry.face.numel() == 0:
        raise TrackerError("photometric stage: the compared regions are not visible in any keyframe")
    init = initial_appearance(cfg.photometric, bundle, geometry.target.mean(dim=1))
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


def with_images(obs: Observations, images: Tensor, image_scale: float) -> Observations:
    return replace(obs, images=images, image_scale=image_scale)


def pyramid_factors(levels: int) -> list[int]:
    """Downsampling factor of each pyramid level, coarse to fine: 4, 2, 1 for three levels."""
    return [2 ** level for level in reversed(range(levels))]


def level_iters(iters: int, levels: int) -> list[int]:
    """Steps per frame at each pyramid level, coarse to fine: `iters` split evenly, the remainder at full size."""
    share, remainder = divmod(iters, levels)
    return [share] * (levels - 1) + [share + remainder]


def pyramid_problems(problem: Problem, term: PhotometricConfig, appearance: Appearance, mesh: RegionMesh,
                     image_size: tuple[int, int], factors: Sequence[int], backend: str) -> list[Problem]:
    """`problem` plus the photometric term, one per pyramid level (texture mip level and image size)."""
    height, width = image_size
    return [problem.with_terms([*problem.terms, PhotometricEnergy(term, appearance.blurred(factor), mesh)],
                               make_rasterizer(backend, (height // factor, width // factor)))
            for factor in factors]


def pyramid_observations(obs: Observations, images: Tensor, image_scale: float,
                         factors: Sequence[int]) -> list[Observations]:
    """obs with full-size images (B, H, W, 3) at image_scale, downsampled to each pyramid level."""
    return [with_images(obs, downsample(images, factor), image_scale / factor) for factor in factors]


def rotate(rotation: Tensor, vectors: Tensor) -> Tensor:
    """Rotate vectors (B, 3) by axis-angle rotations (B, 3)."""
    return (batch_rodrigues(rotation) @ vectors.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def centre_offset(model: FlameModel, mesh: RegionMesh, params: FlameParams) -> Tensor:
    """(B, 3) vector from FLAME's root joint to the region's centroid with the global rotation at rest.

    World vertices are R (v - J) + J + t with R turning about the root joint J (at the neck); a point at
    offset a from J sits at J + R a + t, so with c = t + R a as the free variable instead of t, the head
    turns about the region's centre. This decouples rotation from translation, which Adam (a per-coordinate
    method) otherwise crawls along as a narrow valley.
    """
    rest = replace(params, rotation=torch.zeros_like(params.rotation),
                   translation=torch.zeros_like(params.translation))
    out = model(rest)
    return out.vertices[:, mesh.vertex_ids].mean(dim=1) - out.joints[:, 0]


def fit_frame(level_problems: Sequence[Problem], level_obs: Sequence[Observations], init: FlameParams,
              free: Sequence[str], level_steps: Sequence[int], lr: float, reference: FlameParams | None,
              mesh: RegionMesh) -> FlameParams:
    """Coarse-to-fine Adam over the `free` fields of frames, like `fit_adam` with two changes.

    One Adam run spans the levels (level_steps[i] steps on level_problems[i] / level_obs[i]): restarting
    it per level would kick a converged fit by ~lr again. The translation is replaced by the position of
    the head centre (see `centre_offset`), so that rotations turn the head about itself.
    Returns detached parameters.
    """
    offset = centre_offset(level_problems[-1].model, mesh, init)
    params = leaf_params(init, [name for name in free if name != "translation"])
    tensors = {name: getattr(params, name) for name in free if name != "translation"}
    centre = (init.translation + rotate(init.rotation, offset)).detach().requires_grad_("translation" in free)
    if "translation" in free:
        tensors["translation"] = centre

    def current() -> FlameParams:
        return replace(params, translation=centre - rotate(params.rotation, offset))

    schedule = iter([level for level, steps in enumerate(level_steps) for _ in range(steps)])

    def loss() -> Tensor:
        level = next(schedule)
        return level_problems[level].energy(current(), level_obs[level], reference).sum()

    adam_minimise(loss, tensors, sum(level_steps), lr)
    return current().detach()


def refine_track(level_problems: Sequence[Problem], result: TrackResult, frame_obs: Callable[[int], list[Observations]],
                 free: Sequence[str], level_steps: Sequence[int], lr: float, mesh: RegionMesh,
                 progress: Callable[[], None] | None = None) -> TrackResult:
    """Refine every valid frame in order with `fit_frame`, starting from its landmark fit, the temporal term
    referring to the refined previous frames (as `refine.refine_sequence`, plus the pyramid and the
    head-centred rotation). frame_obs(t) gives frame t's observations at each level."""
    refined: list[FlameParams] = []
    errors = result.lmk_error_px.copy()
    prev = prev2 = None
    for t in range(len(result.valid)):
        params = result.params.frames(slice(t, t + 1))
        if result.valid[t]:
            level_obs = frame_obs(t)
            reference = predict_next(prev, prev2) if prev is not None else None
            params = fit_frame(level_problems, level_obs, params, free, level_steps, lr, reference, mesh)
            errors[t] = float(landmark_error_px(level_problems[-1], params, level_obs[-1])[0])
            prev2, prev = prev, params
        else:
            prev = prev2 = None
        refined.append(params)
        if progress:
            progress()
    stacked = FlameParams(shape=result.params.shape,
                          **{name: torch.cat([getattr(p, name) for p in refined]) for name in FRAME_FIELDS})
    return replace(result, params=stacked, lmk_error_px=np.asarray(errors, np.float32))


def check_stage_inputs(result: TrackResult, images: np.ndarray, crop: StageCrop, stage: PhotometricStageConfig) -> None:
    if images.shape != (len(result.valid), crop.size, crop.size, 3) or images.dtype != np.uint8:
        raise TrackerError(f"photometric stage: images must be ({len(result.valid)}, {crop.size}, {crop.size}, 3) "
                           f"uint8 (the crop of every tracked frame), got {images.shape} {images.dtype}")
    if stage.albedo not in ("texture", "vertex"):
        raise TrackerError(f"photometric.albedo must be texture or vertex, got {stage.albedo!r}")
    if stage.pyramid_levels < 1 or stage.keyframes < 1 or stage.texture_size < 8 or stage.iters < 1:
        raise TrackerError("photometric.pyramid_levels, keyframes and iters must be >= 1, texture_size >= 8")
    if crop.size < 2 ** (stage.pyramid_levels - 1) * 16:
        raise TrackerError(f"photometric.pyramid_levels {stage.pyramid_levels} is too many for {crop.size} pixel "
                           "images: lower it or raise photometric.resolution")


def run_photometric_stage(problem: Problem, result: TrackResult, obs: Observations, images: np.ndarray,
                          crop: StageCrop, bundle: FlameBundle, cfg: TrackerConfig,
                          progress: Callable[[], None] | None = None) -> tuple[TrackResult, Appearance]:
    """Refine a landmark track photometrically.

    problem: the landmark stage's Problem (landmark, prior and temporal terms; its camera holds the
        estimated focal length); the photometric term is added to its terms.
    result: the landmark stage's TrackResult (T frames); obs: its landmark Observations (video pixels).
    images: (T, size, size, 3) uint8 RGB stage images, crop.image(frame) of every tracked frame;
    crop: from `stage_crop` (obs, result.valid, video size, photometric.resolution, photometric.crop_margin).
    progress: called once per frame.
    Returns the refined TrackResult (landmark errors recomputed, video pixels) and the sequence's Appearance.
    """
    stage, term = cfg.photometric, cfg.energy.photometric
    check_stage_inputs(result, images, crop, stage)
    if not result.valid.any():
        raise TrackerError("photometric stage: no frame has a landmark fit to refine")
    with torch_threads(1):  # small images: per-op overhead dominates, and extra threads only contend
        # Everything below works in stage pixels: a camera and landmarks for the crop.
        problem = Problem(problem.model, problem.landmarks, crop.camera(problem.camera), problem.terms)
        obs = crop.observations(obs)
        mesh = region_mesh(problem.model, bundle.masks, term.regions)
        keyframes = choose_keyframes(result.valid, stage.keyframes)
        appearance = estimate_appearance(mesh, problem.camera, result.params, images, bundle, cfg, keyframes)
        # The neck turns the head like the global rotation: free it only when the neck itself is compared.
        free = FRAME_FIELDS if "neck" in term.regions else LANDMARK_FIELDS
        factors = pyramid_factors(stage.pyramid_levels)
        level_problems = pyramid_problems(problem, term, appearance, mesh, images.shape[1:3], factors,
                                          stage.renderer)

        def frame_obs(t: int) -> list[Observations]:
            return pyramid_observations(obs.frames(slice(t, t + 1)), frame_images(images, t, mesh.vertex_ids.device),
                                        1.0, factors)

        steps = level_iters(stage.iters, len(factors))
        refined = refine_track(level_problems, result, frame_obs, free, steps, stage.lr, mesh, progress)
        appearance = refine_appearance(appearance, mesh, problem.camera, refined, images, bundle, cfg)
    return replace(refined, lmk_error_px=refined.lmk_error_px / crop.scale), appearance


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
