"""Reading parameter files in the tracker's export format (flame_params.npz, and the synthetic ground truth,
which uses the same keys) into FLAME parameters, camera and per-frame vertices for evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tracker.camera import Camera
from tracker.errors import TrackerError
from tracker.flame.landmarks import LandmarkSet, yaw_degrees
from tracker.flame.lbs import batch_rodrigues
from tracker.flame.model import FlameModel, FlameParams
from tracker.io.export import read_params

PER_FRAME_KEYS = ("expr", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "eyelids", "translation")


def _fit_width(values: np.ndarray, width: int) -> np.ndarray:
    """Zero-pad or cut the last axis to `width` (a model with a different basis size reads the same file)."""
    if values.shape[-1] >= width:
        return values[..., :width]
    return np.concatenate([values, np.zeros((*values.shape[:-1], width - values.shape[-1]), values.dtype)], -1)


def params_from_arrays(arrays: dict[str, np.ndarray], n_shape: int, n_expr: int) -> FlameParams:
    """FlameParams of all frames in an exported npz, coefficient vectors fitted to the model's sizes."""
    missing = [k for k in ("shape", *PER_FRAME_KEYS) if k not in arrays]
    if missing:
        raise TrackerError(f"parameter file lacks {', '.join(missing)}: not a tracker export")
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    values = {k: to(arrays[k]) for k in PER_FRAME_KEYS if k not in ("expr",)}
    return FlameParams(shape=to(_fit_width(arrays["shape"].reshape(1, -1), n_shape)),
                       expr=to(_fit_width(arrays["expr"], n_expr)), **values)


def resized_params(params: FlameParams, n_shape: int, n_expr: int) -> FlameParams:
    """The same parameters with identity and expression vectors zero-padded or cut to a model's sizes."""
    def fit(values: torch.Tensor, width: int) -> torch.Tensor:
        values = values.detach().cpu()[..., :width]
        return torch.cat([values, values.new_zeros(*values.shape[:-1], width - values.shape[-1])], -1)

    moved = params.map(lambda t: t.detach().cpu())
    moved.shape, moved.expr = fit(params.shape, n_shape), fit(params.expr, n_expr)
    return moved


def camera_from_arrays(arrays: dict[str, np.ndarray], frame: int = 0) -> Camera:
    """The tracker's Camera from exported K (OpenCV: pixel centres at integers) and image_size."""
    K = arrays["K"][frame].astype(np.float64)
    height, width = (int(v) for v in arrays["image_size"])
    return Camera(torch.tensor(float(K[0, 0])), torch.tensor([K[0, 2] + 0.5, K[1, 2] + 0.5], dtype=torch.float32),
                  height, width)


def head_yaw_deg(params: FlameParams) -> np.ndarray:
    """(B,) yaw in degrees of the head (global rotation then neck), as tracker.flame.landmarks defines it."""
    return yaw_degrees(head_rotation(params)).numpy()


def head_rotation(params: FlameParams) -> torch.Tensor:
    """(B, 3, 3) orientation of the head in the world: global rotation composed with the neck."""
    return batch_rodrigues(params.rotation.double()) @ batch_rodrigues(params.neck_pose.double())


@dataclass
class TrackedSequence:
    """Parameters, camera and frame bookkeeping of one exported sequence (T frames)."""

    params: FlameParams
    camera: Camera
    frame_index: np.ndarray
    """(T,) video frame of each row."""
    valid: np.ndarray
    """(T,) bool."""

    @torch.no_grad()
    def vertices(self, model: FlameModel, chunk: int = 64) -> torch.Tensor:
        """(T, V, 3) world vertices, evaluated in chunks of frames."""
        T = self.params.batch_size
        return torch.cat([model(self.params.frames(slice(s, s + chunk))).vertices for s in range(0, T, chunk)])

    @torch.no_grad()
    def landmarks_2d(self, vertices: torch.Tensor, landmarks: LandmarkSet) -> np.ndarray:
        """(T, L, 2) projected landmarks of a detector scheme (pixel centres at +0.5), jaw contour by yaw."""
        yaw = torch.from_numpy(head_yaw_deg(self.params)).float()
        return self.camera.project(landmarks.full_positions(vertices, yaw))[0].numpy()


def load_tracked(path: str | Path, n_shape: int, n_expr: int) -> TrackedSequence:
    """An exported parameter file (flame_params.npz or a synthetic *.gt.npz)."""
    path = Path(path)
    if not path.is_file():
        raise TrackerError(f"parameter file {path} not found")
    arrays, _ = read_params(path)
    return TrackedSequence(params_from_arrays(arrays, n_shape, n_expr), camera_from_arrays(arrays),
                           arrays["frame_index"].astype(np.int64), arrays["valid"].astype(bool))
