"""Pose smoothing after frame-by-frame tracking: each frame's head pose moves only where its landmarks leave it free.

Tracked frame by frame, the rigid pose jitters along the directions the landmarks barely see: the distance, and a
turn of the head traded against a sideways shift. A fixed temporal weight either leaves that jitter or, strong
enough to remove it, makes fast motion lag (and the expression then explains the lag). Here each frame's fit is
summarised by the Gauss-Newton information of its energy in the pose x = (rotation, translation),
H_t = J_t^T J_t, and the smoothed poses of each run of consecutive tracked frames minimise

    sum_t (x_t - x̂_t)^T H_t (x_t - x̂_t) + sum_t rho(|W^(1/2) (x_{t-1} - 2 x_t + x_{t+1})|)

(x̂_t: the frame's own fit; W: `fit.smooth_rotation`, `fit.smooth_translation`; rho: Huber's with scale
`fit.smooth_robust`), a few sparse linear systems per run. Directions a frame's landmarks pin down stay where its
fit put them; the others follow the neighbours, except across a real start or stop of the motion.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from tracker.energy.base import Observations
from tracker.fit.sequence import TrackResult, landmark_error_px, valid_runs
from tracker.fit.solver import Problem
from tracker.flame.model import FlameParams

STEPS = (1e-3, 1e-3, 1e-3, 1e-4, 1e-4, 1e-4)
"""Central-difference steps of the pose Jacobian: radians, metres."""
CHUNK = 64
"""Frames evaluated at once for the Jacobians and the errors: memory flat in the number of frames (256 at once
took 0.2 GB)."""
IRLS_ITERATIONS = 5
"""Re-weighting rounds of the robust smoothing."""


def pose_vector(params: FlameParams) -> torch.Tensor:
    """(B, 6) rotation (axis-angle) and translation side by side."""
    return torch.cat([params.rotation, params.translation], dim=1)


def with_pose(params: FlameParams, pose: torch.Tensor) -> FlameParams:
    """params with rotation and translation taken from pose (B, 6); the other fields are shared, not copied."""
    return replace(params, rotation=pose[:, :3], translation=pose[:, 3:])


@torch.no_grad()
def pose_information(problem: Problem, params: FlameParams, obs: Observations) -> torch.Tensor:
    """(B, 6, 6) Gauss-Newton information J^T J of each frame's energy in its pose (the temporal term aside: it
    needs a reference), by central differences of batched evaluations."""
    ev = problem.evaluation(params, obs)
    yaw, state = ev.yaw_deg, problem.prepare(ev)
    pose = pose_vector(params)
    columns = []
    for k, h in enumerate(STEPS):
        step = torch.zeros_like(pose)
        step[:, k] = h
        plus = problem.residuals(with_pose(params, pose + step), obs, contour_yaw=yaw, term_state=state)
        minus = problem.residuals(with_pose(params, pose - step), obs, contour_yaw=yaw, term_state=state)
        columns.append((plus - minus) / (2 * h))
    J = torch.stack(columns, dim=-1)  # (B, R, 6)
    return J.transpose(1, 2) @ J


def smooth_run(poses: np.ndarray, information: np.ndarray, weights: np.ndarray, robust: float = 0.0) -> np.ndarray:
    """Smoothed poses (n, d) of one run of consecutive frames: the minimiser of sum_t (x_t - p_t)^T H_t (x_t - p_t)
    + sum_t rho(|diag(weights)^(1/2) a_t|), a_t the second difference at t; rho is the square, or with robust > 0
    Huber's with that scale (by iteratively re-weighted least squares): accelerations beyond it, a real motion
    starting or stopping, are not rounded off as noise is. poses (n, d), information (n, d, d), weights (d,)."""
    n, d = poses.shape
    if n < 3:
        return poses
    blocks = sp.block_diag(list(information), format="csr")
    second = sp.diags([1.0, -2.0, 1.0], [0, 1, 2], shape=(n - 2, n))
    D = sp.kron(second, sp.identity(d), format="csr")
    b = blocks @ poses.reshape(-1)

    def huber_scale(x: np.ndarray) -> np.ndarray:
        """IRLS weights of Huber's rho at the weighted second differences of x (1 without robust)."""
        if robust <= 0:
            return np.ones(n - 2)
        accel = np.sqrt(((D @ x.reshape(-1)).reshape(n - 2, d) ** 2 * weights).sum(1))
        return np.minimum(1.0, robust / np.maximum(accel, 1e-12))

    # Re-weighting starts from the fits' own accelerations: from a quadratic solution, which spreads an onset over
    # many frames below the scale, it would never find the onset again.
    scale, x = huber_scale(poses), poses
    for _ in range(IRLS_ITERATIONS if robust > 0 else 1):
        W = sp.kron(sp.diags(scale), sp.diags(weights), format="csr")
        x = spla.spsolve((blocks + D.T @ W @ D).tocsc(), b)
        scale = huber_scale(x)
    return x.reshape(n, d)


def smooth_poses(problem: Problem, params: FlameParams, obs: Observations, valid: np.ndarray,
                 rotation_weight: float, translation_weight: float, robust: float = 0.0) -> FlameParams:
    """params with the rotation and translation of every run of valid frames smoothed (invalid frames untouched).
    obs: the landmark observations the poses were fitted to."""
    if rotation_weight <= 0 and translation_weight <= 0:
        return params
    weights = np.array([rotation_weight] * 3 + [translation_weight] * 3, np.float64)
    pose = pose_vector(params).detach()
    smoothed = pose.clone()
    for start, stop in valid_runs(valid, min_length=3):
        info = torch.cat([pose_information(problem, params.frames(idx), obs.frames(idx))
                          for idx in (torch.arange(s, min(s + CHUNK, stop), device=pose.device)
                                      for s in range(start, stop, CHUNK))])
        result = smooth_run(pose[start:stop].double().cpu().numpy(), info.double().cpu().numpy(), weights, robust)
        smoothed[start:stop] = torch.as_tensor(result, dtype=pose.dtype, device=pose.device)
    return with_pose(params, smoothed)


def smooth_track(problem: Problem, result: TrackResult, obs: Observations, rotation_weight: float,
                 translation_weight: float, robust: float = 0.0) -> TrackResult:
    """The landmark stage's track with its poses smoothed (`smooth_poses`) and its landmark errors updated."""
    if rotation_weight <= 0 and translation_weight <= 0:
        return result
    params = smooth_poses(problem, result.params, obs, result.valid, rotation_weight, translation_weight, robust)
    errors = result.lmk_error_px.copy()
    valid_idx = np.flatnonzero(result.valid)
    for start in range(0, len(valid_idx), CHUNK):
        chunk = valid_idx[start:start + CHUNK]
        sel = torch.as_tensor(chunk, device=obs.landmarks.device)
        errors[chunk] = landmark_error_px(problem, params.frames(sel), obs.frames(sel)).cpu().numpy()
    return replace(result, params=params, lmk_error_px=errors.astype(np.float32))
