"""A tracked video as VHAP's tracked_flame_params.npz (what VHAP's tracker saves and loads back).

Keys: rotation, translation, neck_pose, jaw_pose (T, 3), eyes_pose (T, 6), expr (T, 100), shape (300,),
static_offset (1, V + 120, 3) [+ dynamic_offset (T, V + 120, 3): eyelids], focal_length (1,), image_size (2,)
= (height, width), timestep_id (T,) frame indices as 5-digit strings, n_processed_frames, lights (9, 3),
plus valid (T,) (a face was fitted; VHAP ignores it).

VHAP's monocular camera: world-to-camera [I | (0, 0, -1)] in OpenGL axes (the camera at (0, 0, 1) looking
along -z) and intrinsics fx = fy = focal_length * max(height, width), principal point (width / 2, height / 2)
with the image spanning [0, width]. Our camera sits at the origin with the same axes (world-to-camera
diag(1, -1, -1) in OpenCV axes), so the export shifts the world by (0, 0, 1): translation + (0, 0, 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tracker.errors import TrackerError
from tracker.io.avatar import ConsumerFrames
from tracker.result import TrackingResult

VHAP_CAMERA_POSITION = np.array([0.0, 0.0, 1.0])
"""Where VHAP puts its monocular camera (world coordinates, OpenGL axes, looking along -z)."""
UNIFORM_LIGHTS = np.zeros((9, 3), np.float32)
UNIFORM_LIGHTS[0] = np.sqrt(4 * np.pi)
"""VHAP's initial SH lighting (uniform): its loader requires `lights`; the tracker's lighting is not converted."""


def vhap_focal_length(result: TrackingResult) -> float:
    """VHAP's normalised focal length: pixels over the longer image side (fx must equal fy, and the
    principal point must be the image centre, which VHAP's monocular camera assumes)."""
    K = result.K[0].astype(np.float64)
    height, width = (int(v) for v in result["image_size"])
    if abs(K[0, 0] - K[1, 1]) > 1e-6 * K[0, 0] or not np.allclose(K[:2, 2] + 0.5, [width / 2, height / 2]):
        raise TrackerError("VHAP's monocular camera needs square pixels and a centred principal point")
    if not np.allclose(result.K, result.K[0]):
        raise TrackerError("VHAP's monocular camera has one focal length; this run's intrinsics change over time")
    return float(K[0, 0]) / max(height, width)


def write_vhap_params(result: TrackingResult, frames: ConsumerFrames, path: Path) -> dict[str, np.ndarray]:
    """Write tracked_flame_params.npz for all rows of the run (frames converted with the world shifted by
    VHAP_CAMERA_POSITION); returns the arrays written."""
    T = len(result)
    arrays = {
        "rotation": frames.rotation, "translation": frames.translation, "neck_pose": frames.neck_pose,
        "jaw_pose": frames.jaw_pose, "eyes_pose": frames.eyes_pose, "shape": frames.shape, "expr": frames.expr,
        "static_offset": frames.static_offset,
        "focal_length": np.array([vhap_focal_length(result)], np.float32),
        "image_size": result["image_size"].astype(np.int64),
        "timestep_id": np.array([f"{int(i):05d}" for i in result.frame_index]),
        "n_processed_frames": np.array(T), "lights": UNIFORM_LIGHTS, "valid": result.valid.astype(bool),
    }
    if frames.dynamic_offset is not None:
        arrays["dynamic_offset"] = frames.dynamic_offset
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays
