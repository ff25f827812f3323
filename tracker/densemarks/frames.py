"""One frame's DenseMarks evidence: matched correspondences, their gates, how well a pose agrees with them, and a
rigid pose from them alone.

Each candidate vertex (K of them) is matched once per frame to the map position whose uvw is nearest to its
canonical coordinate (sub-pixel, `match_uvw`); matches do not depend on the pose. What depends on the pose is
which matches count (the gates: the vertex is visible, not grazing, and its match lies near its projection), so
gates are refreshed as a fit moves. Visibility needs a rasterisation; it is reused while the mesh has moved less
than a fraction of a pixel since the last one.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from scipy.spatial import cKDTree

from tracker.camera import Camera, to_camera
from tracker.densemarks.canonical import crop_affine, resize_uvw, vertex_visibility
from tracker.densemarks.predict import UvwPrediction
from tracker.energy.dense import (
    CORR_TARGET,
    CORR_WEIGHT,
    CROP_PX,
    TO_CROP,
    UVW,
    VALID,
    DenseCorrespondenceConfig,
    DenseRenderConfig,
    correspondence_weights,
    match_uvw,
    prediction_validity,
)
from tracker.flame.lbs import batch_rodrigues, matrix_to_axis_angle
from tracker.flame.model import FlameModel, FlameParams

DEPTH_TOLERANCE_M = 0.001
"""Depth mismatch allowed between a vertex and the surface seen around it (visibility), beyond the slope."""
REUSE_RASTER_PX = 0.5
"""Visibility is re-rasterised once some vertex has moved this many fitting-crop pixels since the last time."""
AGREEMENT_RADIUS = 0.03
"""A match agrees with a pose when it lies within this fraction of the crop side of the vertex's projection
(weight 1 - (d / radius)^2): tight enough to tell a good pose from one a few degrees off."""


@dataclass
class Visibility:
    """The last rasterisation of a frame's mesh: where the vertices were and which candidates it showed."""

    pixels: torch.Tensor
    """(V, 2) projected vertices (fitting-crop pixels) when rasterised."""
    visible: torch.Tensor
    """(K,) bool: candidate visible."""
    facing: torch.Tensor
    """(K,) cosine between candidate normal and the ray to the camera."""


@dataclass
class DenseFrame:
    """One frame's dense observations: the extras the terms read, and what refreshing the gates needs."""

    extras: dict[str, torch.Tensor]
    """Term inputs with a leading frame axis of 1 (keys in tracker.energy.dense)."""
    match_distance: torch.Tensor
    """(K,) cube distance of each candidate vertex's match."""
    visibility: Visibility | None = None
    """The last rasterisation (reused while the pose barely moves)."""
    rasterisations: int = 0
    """How many times visibility was rasterised (reported: the reuse saves most of them)."""

    @property
    def crop_px(self) -> float:
        """Crop side in video pixels."""
        return float(self.extras[CROP_PX][0])


def to_video_pixels(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Invert a (2, 3) video -> crop affine on (N, 2) crop points."""
    return (points - affine[:, 2]) @ np.linalg.inv(affine[:, :2]).T


def prepare_frame(prediction: UvwPrediction, canonical_tree: cKDTree, match_coords: np.ndarray,
                  render_cfg: DenseRenderConfig, corr_cfg: DenseCorrespondenceConfig, device: torch.device,
                  render_inputs: bool = True) -> DenseFrame:
    """Term inputs from one prediction: each candidate vertex's (K = len(match_coords)) nearest-uvw position in
    video pixels (gates still closed) and, with render_inputs, the map at the fitting resolution with its
    validity (for the render-and-compare term). The fitting-crop affine is always there (visibility)."""
    side = prediction.uvw.shape[-1]
    search_size = min(corr_cfg.search_resolution, side)
    search = resize_uvw(prediction.uvw, search_size)
    pixels, distance = match_uvw(search, prediction_validity(search, canonical_tree, render_cfg.valid_distance),
                                 match_coords)
    targets = to_video_pixels(crop_affine(prediction.frame_to_crop, search_size / side), pixels)

    def as_tensor(values) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, np.float32), device=device)

    extras = {
        TO_CROP: as_tensor(crop_affine(prediction.frame_to_crop, render_cfg.resolution / side))[None],
        CROP_PX: as_tensor([side / prediction.frame_to_crop[0, 0]]),
        CORR_TARGET: as_tensor(np.nan_to_num(targets))[None],
        CORR_WEIGHT: torch.zeros(1, len(match_coords), device=device),
    }
    if render_inputs:
        uvw = resize_uvw(prediction.uvw, render_cfg.resolution)
        extras[UVW] = as_tensor(uvw)[None]
        extras[VALID] = as_tensor(prediction_validity(uvw, canonical_tree, render_cfg.valid_distance))[None]
    distance = np.where(np.isfinite(targets).all(-1), distance, np.inf)
    return DenseFrame(extras, as_tensor(distance))


@torch.no_grad()
def candidate_state(frame: DenseFrame, model: FlameModel, camera: Camera, params: FlameParams,
                    vertex_ids: torch.Tensor, render_size: int) -> tuple[torch.Tensor, Visibility]:
    """Projected candidates (K, 2) in video pixels at `params`, and visibility, re-rasterised only when some
    vertex moved more than REUSE_RASTER_PX fitting-crop pixels since the frame's last rasterisation."""
    vertices = model(params).vertices[0]
    affine = frame.extras[TO_CROP][0]
    pixels = camera.project(vertices)[0]
    crop = pixels @ affine[:, :2].T + affine[:, 2]
    last = frame.visibility
    if last is None or (crop - last.pixels).norm(dim=-1).max() > REUSE_RASTER_PX:
        visible, facing, _, _ = vertex_visibility(vertices, model.faces, camera, affine, render_size,
                                                  DEPTH_TOLERANCE_M)
        frame.visibility = Visibility(crop, visible[vertex_ids], facing[vertex_ids])
        frame.rasterisations += 1
    return pixels[vertex_ids], frame.visibility


def refresh_gates(frame: DenseFrame, model: FlameModel, camera: Camera, params: FlameParams,
                  vertex_ids: torch.Tensor, corr_cfg: DenseCorrespondenceConfig, render_size: int) -> int:
    """Re-open the correspondence gates for the current pose (visibility, facing, image distance); returns the
    number kept."""
    projected, seen = candidate_state(frame, model, camera, params, vertex_ids, render_size)
    gate = correspondence_weights(frame.extras[CORR_TARGET][0], frame.match_distance, projected, seen.visible,
                                  seen.facing, frame.crop_px, corr_cfg)
    frame.extras[CORR_WEIGHT] = gate[None]
    return int(gate.sum())


def agreement(frame: DenseFrame, model: FlameModel, camera: Camera, params: FlameParams, vertex_ids: torch.Tensor,
              corr_cfg: DenseCorrespondenceConfig, render_size: int) -> float:
    """How many matches agree with a pose: sum over visible, facing candidates whose match is close in the cube
    of max(0, 1 - (d / r)^2), d the image distance between match and projection, r = AGREEMENT_RADIUS x crop.
    Comparable between poses of one frame (higher is better)."""
    projected, seen = candidate_state(frame, model, camera, params, vertex_ids, render_size)
    distance = (frame.extras[CORR_TARGET][0] - projected).norm(dim=-1) / (AGREEMENT_RADIUS * frame.crop_px)
    usable = seen.visible & (seen.facing > corr_cfg.min_facing) & (frame.match_distance < corr_cfg.max_cube_distance)
    return float(((1 - distance.square()).clamp(min=0) * usable).sum())


@torch.no_grad()
def rigid_from_matches(frame: DenseFrame, model: FlameModel, camera: Camera, params: FlameParams,
                       vertex_ids: torch.Tensor, corr_cfg: DenseCorrespondenceConfig,
                       min_points: int = 12) -> FlameParams | None:
    """`params` moved rigidly so the candidates' matches fit best (RANSAC PnP on all matches close in the cube,
    without any prior on the pose); None when too few matches or PnP fails.

    This starts a frame from its own dense evidence: after a detector failure, a fast turn, or a focal change
    that leaves the landmark fit's pose inconsistent with the camera.
    """
    close = (frame.match_distance < corr_cfg.max_cube_distance).cpu().numpy()
    if close.sum() < min_points:
        return None
    output = model(params)
    points = to_camera(output.vertices[0, vertex_ids]).double().cpu().numpy()[close]
    targets = frame.extras[CORR_TARGET][0].double().cpu().numpy()[close]
    focal, centre = float(camera.focal), camera.center.double().cpu().numpy()
    intrinsics = np.array([[focal, 0.0, centre[0]], [0.0, focal, centre[1]], [0.0, 0.0, 1.0]])
    ok, rvec, tvec, inliers = cv2.solvePnPRansac(
        points, targets, intrinsics, None, np.zeros(3), np.zeros(3), useExtrinsicGuess=True, iterationsCount=100,
        reprojectionError=AGREEMENT_RADIUS * frame.crop_px, confidence=0.999, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok or inliers is None or len(inliers) < min_points:
        return None
    # The camera-space motion (R, t) in world axes: to_camera is its own inverse.
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    rotation = flip @ torch.from_numpy(cv2.Rodrigues(rvec)[0]) @ flip
    shift = flip @ torch.from_numpy(tvec.reshape(3))
    root = output.joints[0, 0].double().cpu()
    moved = params.detach()
    global_rotation = rotation @ batch_rodrigues(params.rotation.double().cpu())[0]
    moved.rotation = matrix_to_axis_angle(global_rotation[None]).to(params.rotation)
    rest_root = root - params.translation[0].double().cpu()
    moved.translation = (rotation @ root + shift - rest_root)[None].to(params.translation)
    return moved
