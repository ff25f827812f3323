"""2D point tracks: chosen mesh vertices should project onto points followed into the frame by optical flow.

Residual per vertex: (projection - tracked point) / face size, through the robust loss (Cauchy at `scale`),
weighted so that a frame's energy is a weighted mean over its points, like the landmark term's.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from tracker.energy.base import Evaluation, robust_linear_map, robust_residuals
from tracker.flame.model import FlameModel

TRACK_SCALE = 0.02
"""Residual scale of the robust loss, fraction of the face size (the landmark term's)."""


class PointTrackEnergy:
    """model: FLAME restricted to the K tracked vertices; points: (B, K, 2) their tracked pixels in the B
    frames; weights: (B, K) 0 where a track was lost; face_size: (B,) pixels."""

    name = "point_tracks"

    def __init__(self, model: FlameModel, points: Tensor, weights: Tensor, face_size: Tensor, weight: float = 1.0):
        self.model, self.points, self.face_size, self.weight = model, points, face_size, weight
        self.weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-6)

    def __call__(self, ev: Evaluation) -> Tensor:
        pixels, _ = ev.camera.project(self.model(ev.params).vertices)
        diff = (pixels - self.points) / self.face_size[:, None, None]
        scaled = robust_residuals(diff, TRACK_SCALE, "cauchy") * (self.weight * self.weights).sqrt().unsqueeze(-1)
        return scaled.flatten(1)

    def jacobian(self, ev: Evaluation, fields: Sequence[str]) -> Tensor:
        """(B, 2K, P) derivatives of the residuals in the parameter fields `fields`."""
        vertices, d_vertices = self.model.jacobian(ev.params, list(fields))
        size = self.face_size[:, None, None, None]
        diff = (ev.camera.project(vertices)[0] - self.points) / size[..., 0]
        left = robust_linear_map(diff, TRACK_SCALE, "cauchy") @ ev.camera.projection_jacobian(vertices)
        return (left * ((self.weight * self.weights)[..., None, None].sqrt() / size) @ d_vertices).flatten(1, 2)

