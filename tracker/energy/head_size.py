"""The head-size term: holds the neutral head's size while an image stage re-estimates the identity."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import jacrev

from tracker.energy.base import Evaluation
from tracker.flame.model import FlameModel


def head_size(model: FlameModel, shape: torch.Tensor) -> torch.Tensor:
    """() RMS distance of the neutral head's vertices from their centroid for identity shape (1, n_shape)."""
    vertices = model.v_template + model.dirs[:, :, :model.n_shape] @ shape[0]
    return (vertices - vertices.mean(0)).square().sum(-1).mean().sqrt()


HOLD_WEIGHT = 1e4
"""Weight of the squared relative size change that holds a head's size (a 1% change costs 1)."""


class HeadSizeEnergy:
    """Holds the neutral head's size at that of a reference identity while the identity is re-estimated.

    A single camera sees size and distance only together, and a canonical map estimated from this video's own
    fits is itself only known up to an affine transform, so with such a map the dense terms can trade head size
    against depth; the landmark stage's size (set by the shape prior) is kept then. Residual (B, 1): the
    relative size change, shared out over the frames.
    """

    name = "head_size"

    def __init__(self, model: FlameModel, reference_shape: torch.Tensor, weight: float = HOLD_WEIGHT):
        self.model = model
        self.reference = head_size(model, reference_shape).detach()
        self.weight = weight

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        change = head_size(self.model, ev.params.shape) / self.reference - 1
        return (self.weight / ev.shared_frames) ** 0.5 * change.expand(ev.params.batch_size, 1)

    def focal_jacobian(self, ev: Evaluation) -> torch.Tensor:
        """(B, N) derivatives of the residuals in log focal length: none (no camera in them)."""
        return torch.zeros_like(self(ev))

    def jacobian(self, ev: Evaluation, fields: Sequence[str]) -> torch.Tensor:
        """(B, 1, P) derivatives of the residual in the parameter fields `fields` (only the identity moves it)."""
        columns = ev.field_columns(fields)
        p = ev.params
        J = p.expr.new_zeros(p.batch_size, 1, max((s.stop for s in columns.values()), default=0))
        if "shape" in columns:
            slope = jacrev(lambda shape: head_size(self.model, shape))(p.shape)[0] / self.reference
            J[:, 0, columns["shape"]] = (self.weight / ev.shared_frames) ** 0.5 * slope
        return J

