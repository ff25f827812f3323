"""Priors on identity, expression and pose.

Coefficient priors are measured in vertex displacement (each direction scaled by its RMS displacement per
unit coefficient), so they mean the same for PCA models (FLAME) and ARKit-style blendshapes (the stand-in),
whose coefficients have very different natural ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tracker.energy.base import Evaluation


@dataclass
class PriorConfig:
    weight: float = 0.1
    """Overall weight of the priors."""
    shape: float = 0.05
    """Identity prior, per cm^2 of RMS vertex displacement (weak: many frames constrain the identity)."""
    expr: float = 0.2
    """Expression prior, per cm^2 of RMS vertex displacement."""
    jaw: float = 1.0
    """Jaw: penalises sideways/twist rotation and closing past rest."""
    neck: float = 0.2
    """Neck rotation prior (the global rotation carries the head pose)."""
    eyes: float = 0.05
    """Eyeball rotation prior."""
    eyelids: float = 0.01
    """Eyelid coefficient prior."""


def direction_scale(dirs: torch.Tensor) -> torch.Tensor:
    """RMS vertex displacement of each blendshape direction. dirs: (V, 3, D) -> (D,) metres."""
    return dirs.pow(2).sum(1).mean(0).sqrt()


class PriorEnergy:
    name = "priors"

    def __init__(self, cfg: PriorConfig, model):
        self.cfg = cfg
        n_s, n_e = model.n_shape, model.n_expr
        self.shape_scale = direction_scale(model.dirs[:, :, :n_s]) * 100  # centimetres
        self.expr_scale = direction_scale(model.dirs[:, :, n_s:n_s + n_e]) * 100

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        p, c = ev.params, self.cfg
        B = p.batch_size
        # The shared identity is counted once per batch, not once per frame.
        shape = (p.shape * self.shape_scale).expand(B, -1) / B ** 0.5
        jaw = torch.cat([p.jaw_pose[:, 1:] * 10 ** 0.5, torch.relu(-p.jaw_pose[:, :1]) * 10 ** 0.5], dim=1)
        parts = [(c.shape, shape), (c.expr, p.expr * self.expr_scale), (c.jaw, jaw), (c.neck, p.neck_pose),
                 (c.eyes, p.eyes_pose), (c.eyelids, p.eyelids)]
        return torch.cat([(c.weight * w) ** 0.5 * r for w, r in parts], dim=1)
