"""Temporal smoothness while tracking: each frame is pulled towards a reference (the prediction from the previous
frames' fits). The offline pose smoothing after tracking is tracker.fit.smooth."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tracker.energy.base import Evaluation
from tracker.energy.priors import diagonal_blocks


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

    def parts(self) -> list[tuple[str, float]]:
        """The fields pulled to the reference, in residual order, and their weights."""
        c = self.cfg
        return [("rotation", c.rotation), ("neck_pose", c.rotation), ("translation", c.translation),
                ("expr", c.expr), ("jaw_pose", c.jaw)]

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        ref, p, c = ev.reference, ev.params, self.cfg
        if ref is None:
            return p.expr.new_zeros(p.batch_size, 0)
        return torch.cat([(c.weight * w) ** 0.5 * (getattr(p, name) - getattr(ref, name))
                          for name, w in self.parts()], dim=1)

    def focal_jacobian(self, ev: Evaluation) -> torch.Tensor:
        """(B, N) derivatives of the residuals in log focal length: none (no camera in them)."""
        return torch.zeros_like(self(ev))

    def jacobian(self, ev: Evaluation, fields: Sequence[str]) -> torch.Tensor:
        """(B, N, P) derivatives of the residuals in the parameter fields `fields` (constant)."""
        p, columns = ev.params, ev.field_columns(fields)
        if ev.reference is None:
            return p.expr.new_zeros(p.batch_size, 0, max((s.stop for s in columns.values()), default=0))
        blocks = [(name, torch.full_like(getattr(p, name), (self.cfg.weight * w) ** 0.5), None)
                  for name, w in self.parts()]
        return diagonal_blocks(blocks, columns, p.batch_size, p.expr)

