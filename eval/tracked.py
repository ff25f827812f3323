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
from tracker.io.export import camera_from_arrays, params_from_arrays, read_params


def resized_params(params: FlameParams, n_shape: int, n_expr: int) -> FlameParams:
    """The same parameters with identity and expression vectors zero-padded or cut to a model's sizes."""
    def fit(values: torch.Tensor, width: int) -> torch.Tensor:
        values = values.detach().cpu()[..., :width]
        return torch.cat([values, values.new_zeros(*values.shape[:-1], width - values.shape[-1])], -1)

    moved = params.map(lambda t: t.detach().cpu())
    moved.shape, moved.expr = fit(params.shape, n_shape), fit(params.expr, n_expr)
    return moved


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
