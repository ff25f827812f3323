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
def rigid_from_landmarks(model: FlameModel, landmarks: LandmarkSet, camera: Camera, points_2d: np.ndarray,
                         weights: np.ndarray, shape: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """FLAME global rotation and translation that put the neutral landmarks on points_2d.

    points_2d: (L, 2) pixels in embedding order; weights: (L,), points with weight 0 are ignored.
    Returns rotation (3,) axis-angle and translation (3,) metres, or raises ValueError if PnP fails.
    """
    device = model.v_template.device
    params = FlameParams.zeros(1, model.n_shape, model.n_expr, device)
    if shape is not None:
        params.shape = shape.detach().reshape(1, -1).to(device)
    out = model(params, landmarks.vertex_ids)
    object_points = landmarks.positions(out.vertices, torch.zeros(1, device=device))[0].cpu().numpy()
    root = out.joints[0, 0].cpu().numpy()
    use = weights > 0
    if landmarks.contour_corners is not None:  # the jaw contour slides with yaw: not a fixed 3D point
        use[:17] = False
    if use.sum() < 6:
        raise ValueError("too few landmarks for PnP")
    K = camera.intrinsics().cpu().numpy().astype(np.float64)
    ok, rvec, tvec = cv2.solvePnP(object_points[use].astype(np.float64), points_2d[use].astype(np.float64),
                                  K, None, flags=cv2.SOLVEPNP_EPNP)
    if ok:
        ok, rvec, tvec = cv2.solvePnP(object_points[use].astype(np.float64), points_2d[use].astype(np.float64),
                                      K, None, rvec, tvec, useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok or tvec[2, 0] <= 0:
        raise ValueError("PnP failed")
    # Camera = W (R (X - root) + root + T)  <=>  R_cv = W R,  t_cv = W (root - R root + T).
    W = WORLD_TO_CAMERA.numpy().astype(np.float64)
    R = W @ cv2.Rodrigues(rvec)[0]
    T = W @ tvec[:, 0] - root + R @ root
    rotation = matrix_to_axis_angle(torch.from_numpy(R)[None])[0].numpy()
    return rotation.astype(np.float32), T.astype(np.float32)

