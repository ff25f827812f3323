"""2D landmark reprojection energy with robust loss and per-landmark weights."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tracker.energy.base import Evaluation, robust_linear_map, robust_residuals

# MediaPipe Face Mesh indices of the lips and eyes (its FACEMESH_LIPS / _LEFT_EYE / _RIGHT_EYE sets).
MEDIAPIPE_LIPS = {61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 185, 40, 39, 37, 0, 267, 269, 270, 409, 78,
                  95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 191, 80, 81, 82, 13, 312, 311, 310, 415}
MEDIAPIPE_EYES = {263, 249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386, 385, 384, 398,
                  33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173}


@dataclass
class LandmarkEnergyConfig:
    weight: float = 1.0
    """Weight of the landmark term."""
    robust: str = "cauchy"
    """Robust loss: l2 | huber | cauchy | gm."""
    scale: float = 0.02
    """Residual scale of the robust loss, as a fraction of the face size."""
    contour_weight: float = 0.5
    """Relative weight of the jaw contour (less reliable: it slides over the cheek)."""
    eye_weight: float = 1.5
    """Relative weight of eye landmarks."""
    mouth_weight: float = 1.5
    """Relative weight of mouth landmarks."""


def landmark_group_weights(scheme: str, detector_index: torch.Tensor, cfg: LandmarkEnergyConfig,
                           sigma: torch.Tensor | None = None) -> torch.Tensor:
    """(L,) relative weight per embedded landmark: by facial region, or, for a calibrated embedding that
    records how far the detector strays from each point (sigma, face-size units), by inverse variance
    relative to the median landmark (clipped to [1/4, 4])."""
    idx = detector_index.tolist()
    if scheme == "ibug68":
        def group(i):
            return cfg.contour_weight if i < 17 else cfg.eye_weight if 36 <= i < 48 else \
                cfg.mouth_weight if i >= 48 else 1.0
    else:
        def group(i):
            return cfg.eye_weight if i in MEDIAPIPE_EYES else cfg.mouth_weight if i in MEDIAPIPE_LIPS else 1.0
    weights = torch.tensor([group(i) for i in idx], dtype=torch.float32)
    if sigma is not None and torch.isfinite(sigma).any():
        known = torch.isfinite(sigma) & (sigma > 0)
        ratio = (sigma[known].median() / sigma.clamp(min=1e-6)) ** 2
        weights = torch.where(known, ratio.clamp(0.25, 4.0), weights)
    return weights



class LandmarkEnergy:
    """Energy sum_l w_l rho(||proj(x_l) - y_l||^2 / (scale * face_size)^2) / sum_l w_l per frame."""

    name = "landmarks"

    def __init__(self, cfg: LandmarkEnergyConfig):
        self.cfg = cfg

    def residuals(self, ev: Evaluation) -> torch.Tensor:
        """(B, L) landmark reprojection distances, pixels."""
        return (ev.landmarks_2d - ev.obs.landmarks).norm(dim=-1)

    def weights(self, ev: Evaluation) -> torch.Tensor:
        """(B, L) each landmark's share of the term's weight."""
        w = ev.obs.landmark_weights
        return self.cfg.weight * w / w.sum(-1, keepdim=True).clamp(min=1e-6)

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        diff = (ev.landmarks_2d - ev.obs.landmarks) / ev.obs.face_size[:, None, None]
        return (robust_residuals(diff, self.cfg.scale, self.cfg.robust) * self.weights(ev)[..., None].sqrt()).flatten(1)

    def jacobian(self, ev: Evaluation, fields: Sequence[str]) -> torch.Tensor:
        """(B, 2L, P) derivatives of the residuals in the parameter fields `fields`: per landmark, the robust
        loss's and the projection's 2 x 3 map applied to its corners' vertex derivatives in one product."""
        size = ev.obs.face_size[:, None, None, None]
        diff = (ev.landmarks_2d - ev.obs.landmarks) / size[..., 0]
        robust = robust_linear_map(diff, self.cfg.scale, self.cfg.robust)  # (B, L, 2, 2)
        left = robust @ ev.camera.projection_jacobian(ev.landmarks_3d) * (self.weights(ev)[..., None, None].sqrt() / size)
        return ev.landmarks_jacobian(fields, left).flatten(1, 2)

    def focal_jacobian(self, ev: Evaluation) -> torch.Tensor:
        """(B, 2L) derivatives of the residuals in log focal length with the 3D points held: the image scales
        about the principal point, so each projection moves by its offset from it."""
        size = ev.obs.face_size[:, None, None]
        diff = (ev.landmarks_2d - ev.obs.landmarks) / size
        robust = robust_linear_map(diff, self.cfg.scale, self.cfg.robust)  # (B, L, 2, 2)
        moved = robust @ ((ev.landmarks_2d - ev.camera.center) / size)[..., None]
        return (moved[..., 0] * self.weights(ev)[..., None].sqrt()).flatten(1)
