"""Bridging short detector gaps: frames where the landmark detector found no face (a profile view in a turn, a
hand, motion blur), between fitted frames, get a pose from optical flow instead of a copy of a neighbour.

For a gap of at most `bridge.max_gap` frames next to fitted frames: the face vertices visible in each fitted
neighbour (and facing the camera) are projected into it and followed through the gap by dense optical flow
(OpenCV's DIS), forward from the frame before and backward from the frame after, points whose forward and
backward flow disagree, or whose vertex turns away from the camera, being dropped; each point counts by how near
its anchor frame is. Each gap frame then starts from the neighbours' parameters interpolated (rotation by slerp) and its
rotation and translation are fitted to the tracked points (`PointTrackEnergy`), the prior and temporal terms
keeping the rest as interpolated. Bridged frames become valid and are marked (`bridged`); their landmark error is
the mean distance (pixels) of the tracked points from their vertices' projections, there being no landmarks.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterable

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation, Slerp
from torch import Tensor

from tracker.camera import to_camera
from tracker.config import BridgeConfig
from tracker.energy.base import Observations
from tracker.energy.point_tracks import PointTrackEnergy
from tracker.fit.sequence import TrackResult
from tracker.fit.solver import FRAME_FIELDS, Problem, fit_lm, torch_threads
from tracker.flame.model import FlameModel, FlameParams
from tracker.io.video import Frame
from tracker.render.backends import get_rasterizer
from tracker.render.rasterize import RasterSettings
from tracker.render.shading import vertex_normals

TRACKED_REGIONS = ("face", "forehead", "nose")
"""FLAME_masks regions whose vertices are tracked (the rigid, textured part of the head)."""
UNTRACKED_REGIONS = ("lips", "left_eyeball", "right_eyeball")
"""Parts that move on their own (speech, gaze) and are left out."""


def detector_gaps(valid: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """Half-open runs [start, stop) of invalid frames no longer than max_gap with a valid frame on at least one
    side."""
    gaps, t, T = [], 0, len(valid)
    while t < T:
        if valid[t]:
            t += 1
            continue
        stop = t
        while stop < T and not valid[stop]:
            stop += 1
        if stop - t <= max_gap and (t > 0 or stop < T):
            gaps.append((t, stop))
        t = stop
    return gaps


def tracked_vertex_pool(masks: dict[str, np.ndarray], n_vertices: int) -> np.ndarray:
    """FLAME vertices that may be tracked (TRACKED_REGIONS without UNTRACKED_REGIONS), sorted."""
    keep = np.zeros(n_vertices, bool)
    for name in TRACKED_REGIONS:
        keep[np.asarray(masks[name])] = True
    for name in UNTRACKED_REGIONS:
        if name in masks:
            keep[np.asarray(masks[name])] = False
    return np.flatnonzero(keep)


@torch.no_grad()
def facing(model: FlameModel, params: FlameParams) -> Tensor:
    """(B, V) cosine between each vertex's normal and its direction to the camera (1: facing it)."""
    points = to_camera(model(params).vertices)
    normals = vertex_normals(points, model.faces)
    return -(normals * F.normalize(points, dim=-1)).sum(-1)


@torch.no_grad()
def visible_points(problem: Problem, params: FlameParams, pool: np.ndarray, count: int, scale: float,
                   min_facing: float) -> tuple[np.ndarray, np.ndarray]:
    """Up to `count` vertices of `pool` visible in one frame (params: B = 1) and facing the camera by at least
    min_facing (points near the silhouette slide off it as the head turns), spread over the pool, and their
    pixels (K, 2) in images `scale` times the video's size."""
    camera, model = problem.camera, problem.model
    verts = model(params).vertices
    pixels, depth = camera.project(verts)
    size = (max(1, round(camera.height * scale)), max(1, round(camera.width * scale)))
    screen = torch.cat([pixels * scale, depth.unsqueeze(-1)], dim=-1)
    fragments = get_rasterizer("torch")(screen, model.faces, RasterSettings(image_size=size))
    seen_faces = torch.unique(fragments.triangle_id[fragments.triangle_id >= 0])
    seen = torch.zeros(model.n_vertices, dtype=torch.bool, device=verts.device)
    seen[model.faces[seen_faces].reshape(-1)] = True
    seen &= facing(model, params)[0] >= min_facing
    candidates = pool[seen.cpu().numpy()[pool]]
    if len(candidates) > count:
        candidates = candidates[np.round(np.linspace(0, len(candidates) - 1, count)).astype(int)]
    return candidates, (pixels[0, candidates] * scale).cpu().numpy()


def follow(points: np.ndarray, images: list[np.ndarray], max_error: float,
           max_change: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Points (K, 2) in images[0] followed through images[1:] (grey uint8) by DIS optical flow.

    Returns, for each later image, the points' positions (K, 2) and whether each is still tracked (K,): lost
    once its forward-backward flow disagrees by more than max_error pixels, it leaves the image, or its grey
    level differs from the one it started on by more than max_change (flow over a blank or covered frame is
    consistent, and wrong).
    """
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    alive = np.ones(len(points), bool)
    start = sample_image(images[0], points)
    out = []
    for previous, current in zip(images[:-1], images[1:]):
        forward = dis.calc(previous, current, None)
        backward = dis.calc(current, previous, None)
        moved = points + sample_flow(forward, points)
        back = moved + sample_flow(backward, moved)
        height, width = current.shape
        inside = (moved[:, 0] >= 0) & (moved[:, 0] < width) & (moved[:, 1] >= 0) & (moved[:, 1] < height)
        alive &= inside & (np.linalg.norm(back - points, axis=1) <= max_error)
        alive &= np.abs(sample_image(current, moved) - start) <= max_change
        points = moved
        out.append((points.copy(), alive.copy()))
    return out


def sample_flow(flow: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bilinear flow (H, W, 2) at continuous pixel positions (K, 2) (pixel (i, j) centred at (j + 0.5, i + 0.5))."""
    map_x = (points[:, 0] - 0.5).astype(np.float32).reshape(1, -1)
    map_y = (points[:, 1] - 0.5).astype(np.float32).reshape(1, -1)
    return cv2.remap(flow, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[0]


def sample_image(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(K,) bilinear grey levels of a grey uint8 image at continuous pixel positions (K, 2)."""
    return sample_flow(image.astype(np.float32)[..., None], points).reshape(-1)


def interpolated(before: FlameParams | None, after: FlameParams | None, alpha: float) -> FlameParams:
    """Parameters a fraction alpha of the way from `before` to `after` (B = 1 each; rotations by slerp); the one
    given when the other is None."""
    if before is None or after is None:
        return (before if after is None else after).detach()
    out = before.detach()
    for name in FRAME_FIELDS:
        setattr(out, name, (1 - alpha) * getattr(before, name) + alpha * getattr(after, name))
    ends = Rotation.from_rotvec(torch.cat([before.rotation, after.rotation]).detach().cpu().numpy().astype(np.float64))
    rotvec = Slerp([0.0, 1.0], ends)([alpha]).as_rotvec().astype(np.float32)
    out.rotation = torch.from_numpy(rotvec).to(before.rotation)
    return out


def grey(rgb: np.ndarray, scale: float) -> np.ndarray:
    image = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if scale == 1.0:
        return image
    return cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)), interpolation=cv2.INTER_AREA)


def bridge_gaps(problem: Problem, result: TrackResult, obs: Observations, frames: Callable[[], Iterable[Frame]],
                masks: dict[str, np.ndarray], cfg: BridgeConfig) -> tuple[TrackResult, np.ndarray, dict]:
    """Fit the frames of short detector gaps from optical flow (see the module docstring).

    problem, result, obs: the landmark stage's (video pixels); frames(): the tracked frames in order.
    Returns the result with bridged frames valid (their errors: tracked-point distances, pixels), the (T,) bool
    mask of bridged frames and a report (gaps found, frames bridged, frames left unfitted).
    """
    T = len(result.valid)
    bridged = np.zeros(T, bool)
    gaps = detector_gaps(result.valid, cfg.max_gap) if cfg.enabled else []
    report = {"ran": bool(gaps), "gaps": len(gaps), "bridged": 0, "unfitted": 0}
    if not gaps:
        return result, bridged, report
    camera = problem.camera
    scale = min(1.0, cfg.flow_size / max(camera.height, camera.width))
    needed = {t for a, b in gaps for t in range(a - 1, b + 1) if 0 <= t < T}
    images = {t: grey(frame.rgb, scale) for t, frame in enumerate(frames()) if t in needed}
    pool = tracked_vertex_pool(masks, problem.model.n_vertices)
    face_size = obs.face_size[result.valid].median() if result.valid.any() else obs.face_size.new_tensor(1.0)
    params = result.params.detach()
    errors = result.lmk_error_px.copy()
    with torch_threads(1):
        for start, stop in gaps:
            anchors = [t for t in (start - 1, stop) if 0 <= t < T and result.valid[t]]
            tracks = {t: [] for t in range(start, stop)}  # frame -> [(vertex ids, pixels, alive, weight)]
            for anchor in anchors:
                order = list(range(start, stop)) if anchor < start else list(range(stop - 1, start - 1, -1))
                vertices, points = visible_points(problem, result.params.frames(slice(anchor, anchor + 1)), pool,
                                                  cfg.points, scale, cfg.min_facing)
                followed = follow(points, [images[anchor]] + [images[t] for t in order], cfg.max_flow_error,
                                  cfg.max_grey_change)
                for t, (pixels, alive) in zip(order, followed):
                    # Tracks drift with every frame they cross: the nearer anchor's count more.
                    closeness = 1 - abs(t - anchor) / (stop - start + 1)
                    tracks[t].append((vertices, pixels / scale, alive, np.full(len(vertices), closeness)))
            before = result.params.frames(slice(start - 1, start)) if start - 1 in anchors else None
            after = result.params.frames(slice(stop, stop + 1)) if stop in anchors else None
            for t in range(start, stop):
                vertices, pixels, alive, weights = (np.concatenate(parts) for parts in zip(*tracks[t]))
                fitted = interpolated(before, after, (t - start + 1) / (stop - start + 1))
                for _ in range(2):  # points whose vertex turns away from the camera are no longer on it
                    kept = alive & (facing(problem.model, fitted)[0].cpu().numpy()[vertices] >= cfg.min_facing / 2)
                    if kept.sum() < cfg.min_points:
                        break
                    fitted, error = fit_to_tracks(problem, fitted, vertices[kept], pixels[kept], weights[kept],
                                                  face_size, cfg.iters)
                if kept.sum() < cfg.min_points:
                    report["unfitted"] += 1
                    continue
                for name in FRAME_FIELDS:
                    getattr(params, name)[t] = getattr(fitted, name)[0]
                bridged[t], errors[t] = True, error
    report["bridged"] = int(bridged.sum())
    valid = result.valid | bridged
    return replace(result, params=params, valid=valid, lmk_error_px=errors.astype(np.float32)), bridged, report


def fit_to_tracks(problem: Problem, init: FlameParams, vertices: np.ndarray, pixels: np.ndarray,
                  weights: np.ndarray, face_size: torch.Tensor, iters: int) -> tuple[FlameParams, float]:
    """Rotation and translation of one frame (init: B = 1) whose `vertices` project onto `pixels` (K, 2)
    (relative `weights` (K,)); the landmark stage's prior and temporal terms (reference: init) keep the rest.
    Returns the parameters and the mean distance (pixels) of the points from their vertices' projections."""
    device = init.rotation.device
    ids = torch.as_tensor(vertices, device=device)
    model = problem.model.restricted(ids)
    target = torch.as_tensor(pixels, dtype=torch.float32, device=device).unsqueeze(0)
    weight = torch.as_tensor(weights, dtype=torch.float32, device=device).unsqueeze(0)
    term = PointTrackEnergy(model, target, weight, face_size.reshape(1))
    terms = [t for t in problem.terms if t.name in ("priors", "temporal")] + [term]
    no_landmarks = Observations(torch.zeros(1, 0, 2, device=device), torch.zeros(1, 0, device=device),
                                face_size.reshape(1))
    fitted, _ = fit_lm(problem.with_terms(terms), init, no_landmarks, ("rotation", "translation"), iters, reference=init)
    with torch.no_grad():
        projected, _ = problem.camera.project(model(fitted).vertices)
    return fitted, float((projected - target).norm(dim=-1).mean())
