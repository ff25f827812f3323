"""Rigid initialisation of a frame from its own landmarks (PnP against the neutral FLAME landmarks)."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from tracker.camera import WORLD_TO_CAMERA, Camera
from tracker.flame.landmarks import LandmarkSet
from tracker.flame.lbs import matrix_to_axis_angle
from tracker.flame.model import FlameModel, FlameParams


@torch.no_grad()
def neutral_landmarks(model: FlameModel, landmarks: LandmarkSet,
                      shape: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(L, 3) landmark positions of the neutral head facing the camera, and its root joint (3,)."""
    device = model.v_template.device
    params = FlameParams.zeros(1, model.n_shape, model.n_expr, device)
    if shape is not None:
        params.shape = shape.detach().reshape(1, -1).to(device)
    out = model(params, landmarks.vertex_ids)
    points = landmarks.positions(out.vertices, torch.zeros(1, device=device))[0].cpu().numpy()
    return points.astype(np.float64), out.joints[0, 0].cpu().numpy().astype(np.float64)


def solve_rigid(object_points: np.ndarray, root: np.ndarray, landmarks: LandmarkSet, camera: Camera,
                points_2d: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FLAME global rotation and translation that put `object_points` (L, 3) on points_2d (L, 2).

    weights: (L,), points with weight 0 are ignored. Returns rotation (3,) axis-angle and translation (3,)
    metres, or raises ValueError if PnP fails.
    """
    use = weights > 0
    if landmarks.contour_corners is not None:  # the jaw contour slides with yaw: not a fixed 3D point
        use[:17] = False
    if use.sum() < 6:
        raise ValueError("too few landmarks for PnP")
    K = camera.intrinsics().cpu().numpy().astype(np.float64)
    obj, img = object_points[use], points_2d[use].astype(np.float64)
    ok, rvec, tvec = cv2.solvePnP(obj, img, K, None, flags=cv2.SOLVEPNP_EPNP)
    if ok:
        ok, rvec, tvec = cv2.solvePnP(obj, img, K, None, rvec, tvec, useExtrinsicGuess=True,
                                      flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok or tvec[2, 0] <= 0:
        raise ValueError("PnP failed")
    # Camera = W (R (X - root) + root + T)  <=>  R_cv = W R,  t_cv = W (root - R root + T).
    W = WORLD_TO_CAMERA.cpu().numpy().astype(np.float64)
    R = W @ cv2.Rodrigues(rvec)[0]
    T = W @ tvec[:, 0] - root + R @ root
    rotation = matrix_to_axis_angle(torch.from_numpy(R)[None])[0].cpu().numpy()
    return rotation.astype(np.float32), T.astype(np.float32)


def rigid_from_landmarks(model: FlameModel, landmarks: LandmarkSet, camera: Camera, points_2d: np.ndarray,
                         weights: np.ndarray, shape: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """FLAME global rotation and translation that put the neutral landmarks on points_2d (see solve_rigid)."""
    object_points, root = neutral_landmarks(model, landmarks, shape)
    return solve_rigid(object_points, root, landmarks, camera, points_2d, weights)


def rough_head_angles(model: FlameModel, landmarks: LandmarkSet, camera: Camera, points_2d: np.ndarray,
                      weights: np.ndarray) -> np.ndarray:
    """(B, 2) yaw and pitch in degrees of each frame's head from its own landmarks (mean face, PnP), NaN
    where PnP fails. points_2d: (B, L, 2); weights: (B, L)."""
    object_points, root = neutral_landmarks(model, landmarks)
    angles = np.full((len(points_2d), 2), np.nan)
    for b in range(len(points_2d)):
        try:
            rotation, _ = solve_rigid(object_points, root, landmarks, camera, points_2d[b], weights[b].copy())
        except ValueError:
            continue
        R = cv2.Rodrigues(rotation.astype(np.float64))[0]
        angles[b] = np.degrees([np.arctan2(-R[2, 0], np.hypot(R[0, 0], R[1, 0])), np.arctan2(R[2, 1], R[2, 2])])
    return angles
