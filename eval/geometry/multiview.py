"""Multi-view reprojection metrics (NeRSemble-style captures): a fitted mesh seen by calibrated cameras.

Cameras follow OpenCV: a world point X maps to the camera frame as R X + t (camera looks along +z, y down)
and to pixels as K (R X + t) / depth, with pixel centres at integer coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from eval.metrics import as_numpy, reprojection_error_px
from tracker.errors import TrackerError

# Sub-pixel precision of the silhouette rasteriser (cv2 fixed-point shift).
_SHIFT_BITS = 4


@dataclass(frozen=True)
class PinholeCamera:
    """intrinsics: (3, 3) K. rotation: (3, 3) and translation: (3,) world -> camera. height, width: pixels."""

    intrinsics: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    height: int
    width: int


def project_points(points: np.ndarray, camera: PinholeCamera) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) world points -> (N, 2) pixels and (N,) depths (z in the camera frame)."""
    in_camera = as_numpy(points) @ np.asarray(camera.rotation).T + np.asarray(camera.translation)
    depth = in_camera[:, 2]
    homogeneous = in_camera @ np.asarray(camera.intrinsics).T
    with np.errstate(divide="ignore", invalid="ignore"):
        return homogeneous[:, :2] / depth[:, None], depth


def render_silhouette(vertices: np.ndarray, faces: np.ndarray, camera: PinholeCamera) -> np.ndarray:
    """(H, W) bool mask of the pixels covered by the projected triangles (cv2 scan conversion at 1/16 px,
    boundary pixels included, so the mask is up to one pixel wider than the exact silhouette).

    Triangles with a vertex at or behind the camera plane are skipped (a head in front of a camera has none).
    """
    pixels, depth = project_points(vertices, camera)
    tris = np.asarray(faces, dtype=np.int64)
    tris = tris[(depth[tris] > 0).all(axis=1)]
    fixed = np.round(pixels * (1 << _SHIFT_BITS)).astype(np.int32)
    mask = np.zeros((camera.height, camera.width), np.uint8)
    for corners in fixed[tris]:
        cv2.fillConvexPoly(mask, corners, 1, lineType=cv2.LINE_8, shift=_SHIFT_BITS)
    return mask.astype(bool)


def silhouette_iou(pred_mask: np.ndarray, gt_mask: np.ndarray) -> float:
    """Intersection over union of two (H, W) masks (1.0 when both are empty)."""
    pred, gt = np.asarray(pred_mask, bool), np.asarray(gt_mask, bool)
    if pred.shape != gt.shape:
        raise TrackerError(f"silhouette masks differ in size: {pred.shape} vs {gt.shape}")
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


def multiview_reprojection_errors(
    points: np.ndarray,
    cameras: Sequence[PinholeCamera],
    targets_px: Sequence[np.ndarray],
    visible: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Mean reprojection error per view, in pixels.

    Args:
        points: (N, 3) points of the fitted mesh (e.g. landmark or tracked vertices), world frame.
        cameras: C cameras. targets_px: C arrays (N, 2) of ground-truth pixels.
        visible: C arrays (N,) of bool, points annotated in each view; all when None.
    Returns:
        (C,) errors (NaN for a view with no visible point).
    """
    if len(targets_px) != len(cameras) or (visible is not None and len(visible) != len(cameras)):
        raise TrackerError("give one target array (and one visibility array) per camera")
    return np.array([
        reprojection_error_px(project_points(points, camera)[0], target,
                              None if visible is None else visible[i])[0]
        for i, (camera, target) in enumerate(zip(cameras, targets_px, strict=True))
    ])


def multiview_silhouette_ious(
    vertices: np.ndarray, faces: np.ndarray, cameras: Sequence[PinholeCamera], masks: Sequence[np.ndarray]
) -> np.ndarray:
    """Silhouette IoU per view between the rendered mesh and ground-truth (H, W) masks: (C,)."""
    if len(masks) != len(cameras):
        raise TrackerError("give one mask per camera")
    return np.array([silhouette_iou(render_silhouette(vertices, faces, camera), mask)
                     for camera, mask in zip(cameras, masks, strict=True)])
