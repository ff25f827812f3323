"""Temporal smoothness: each frame is pulled towards a reference (the previous frame's fit when tracking
sequentially, or its neighbours' average in the global refinement)."""

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


@dataclass
class SmoothnessConfig:
    weight: float = 1.0
    """Weight of the second-difference smoothness used by the global refinement."""
    rotation: float = 20.0
    """Rotation acceleration, per rad^2."""
    translation: float = 2000.0
    """Translation acceleration, per m^2."""
    expr: float = 0.05
    """Expression coefficient acceleration."""
    jaw: float = 2.0
    """Jaw rotation acceleration, per rad^2."""


class SmoothnessEnergy:
    """Second differences p[t-1] - 2 p[t] + p[t+1] over a batch of consecutive frames (row t holds frame t's
    acceleration; the first and last rows are zero), for the joint refinement of a window of frames."""

    name = "smoothness"

    def __init__(self, cfg: SmoothnessConfig):
        self.cfg = cfg

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        p, c = ev.params, self.cfg
        parts = [(c.rotation, p.rotation), (c.rotation, p.neck_pose), (c.translation, p.translation),
                 (c.expr, p.expr), (c.jaw, p.jaw_pose)]
        x = torch.cat([(c.weight * w) ** 0.5 * v for w, v in parts], dim=1)
        if x.shape[0] < 3:
            return torch.zeros_like(x)
        accel = x[:-2] - 2 * x[1:-1] + x[2:]
        return torch.cat([torch.zeros_like(x[:1]), accel, torch.zeros_like(x[:1])], dim=0)
