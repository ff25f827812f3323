"""Temporal smoothness while tracking: each frame is pulled towards a reference (the prediction from the previous
frames' fits). The offline pose smoothing after tracking is tracker.fit.smooth."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tracker.energy.base import Evaluation


@dataclass
class TemporalConfig:
    weight: float = 1.0
    """Weight of the smoothness term (0 disables it)."""
    rotation: float = 5.0
    """Head and neck rotation change, per rad^2."""
    translation: float = 200.0
    """Translation change, per m^2."""
    expr: float = 0.02
    """Expression coefficient change."""
    jaw: float = 0.5
    """Jaw rotation change, per rad^2."""


class TemporalEnergy:
    name = "temporal"

    def __init__(self, cfg: TemporalConfig):
        self.cfg = cfg

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        ref, p, c = ev.reference, ev.params, self.cfg
        if ref is None:
            return p.expr.new_zeros(p.batch_size, 0)
        parts = [(c.rotation, p.rotation - ref.rotation), (c.rotation, p.neck_pose - ref.neck_pose),
                 (c.translation, p.translation - ref.translation), (c.expr, p.expr - ref.expr),
                 (c.jaw, p.jaw_pose - ref.jaw_pose)]
        return torch.cat([(c.weight * w) ** 0.5 * r for w, r in parts], dim=1)

