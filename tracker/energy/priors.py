"""Statistical priors (MAP) on identity, expression and pose.

FLAME's identity and PCA expression coefficients are in standard deviations, so -log p = 1/2 |beta|^2: the
residuals are the coefficients themselves. Blendshape expressions (the stand-in's ARKit-style shapes, useful
range 0..1, not orthogonal) get the prior such activations need instead: a quadratic barrier outside [0, 1]
and a smooth L1 sparsity term (few shapes active at once). Which one applies is read from the model
(`expression_basis`): files that name their expressions are blendshape rigs, the others PCA.

Weights are relative to the landmark term, which is a mean over landmarks in units of its robust scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tracker.energy.base import Evaluation

EYELID_RANGE = (-0.25, 1.25)
"""Eyelid closing coefficients run from open (0) to closed (1); the barrier leaves a margin for wide-open and
squeezed eyes, and keeps its kink away from 0, where every track starts."""
SPARSITY_EPS = 0.05
"""Below this activation the sparsity term is quadratic (smooth for Gauss-Newton), above it linear."""


@dataclass
class PriorConfig:
    weight: float = 1.0
    """Overall weight of the priors."""
    shape: float = 0.1
    """Identity: 1/2 |beta|^2 (coefficients in standard deviations). Chosen with expr on the synthetic
    benchmark's sweep (README: 0.02-0.3; weaker fits the detector's biases, stronger holds a mean face)."""
    expr: float = 0.1
    """PCA expressions: 1/2 |psi|^2; blendshape expressions: a light L2 towards neutral."""
    expr_sparsity: float = 0.05
    """Blendshape expressions only: smooth L1 on the activations (few shapes at once)."""
    expr_bounds: float = 10.0
    """Blendshape expressions only: quadratic barrier outside the activation range [0, 1]."""
    jaw: float = 1.0
    """Jaw: penalises sideways/twist rotation and closing past rest, per rad^2."""
    neck: float = 0.02
    """Neck rotation, per rad^2 (the global rotation carries the head pose)."""
    eyes: float = 0.005
    """Eyeball rotation, per rad^2."""
    eyelids: float = 0.001
    """Eyelid closing coefficients: light L2 towards open."""
    eyelid_bounds: float = 10.0
    """Eyelid closing coefficients: quadratic barrier outside [-0.25, 1.25] (open 0 .. closed 1, with a margin;
    an eyelid turned away from the camera is otherwise free to drift)."""


def gaussian_residuals(coefficients: torch.Tensor) -> torch.Tensor:
    """Residuals of -log N(0, I) up to the factor 1/2: the coefficients themselves. (B, D) -> (B, D)."""
    return coefficients


def barrier_residuals(activations: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Distance outside [low, high] (0 inside). (B, D) -> (B, D)."""
    return torch.relu(low - activations) + torch.relu(activations - high)


def sparsity_residuals(activations: torch.Tensor, eps: float = SPARSITY_EPS) -> torch.Tensor:
    """Residuals whose square is the smooth L1 norm sqrt(a^2 + eps^2) - eps. (B, D) -> (B, D).

    Signed, a / sqrt(sqrt(a^2 + eps^2) + eps), so the residual is smooth through 0: sqrt(smooth L1) has a kink
    there, where Gauss-Newton's linear model is wrong and Levenberg-Marquardt stalls.
    """
    return activations / torch.sqrt(torch.sqrt(activations * activations + eps * eps) + eps)


def sparsity_slope(activations: torch.Tensor, eps: float = SPARSITY_EPS) -> torch.Tensor:
    """Element-wise derivative of `sparsity_residuals`. (B, D) -> (B, D)."""
    root = torch.sqrt(activations * activations + eps * eps)
    g = torch.sqrt(root + eps)
    return 1 / g - activations * activations / (2 * g ** 3 * root)


def barrier_slope(activations: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Element-wise derivative of `barrier_residuals` (0 on the bounds, as relu's). (B, D) -> (B, D)."""
    return (activations > high).to(activations) - (activations < low).to(activations)


def expression_basis(model) -> str:
    """'blendshapes' when the model names its expression directions (ARKit-style rig), else 'pca'."""
    return "blendshapes" if getattr(model, "expression_names", None) else "pca"


class PriorEnergy:
    name = "priors"

    def __init__(self, cfg: PriorConfig, model):
        self.cfg = cfg
        self.basis = expression_basis(model)

    def expression_residuals(self, expr: torch.Tensor) -> torch.Tensor:
        """(B, n_expr) -> (B, N) weighted expression prior residuals."""
        c = self.cfg
        parts = [c.expr ** 0.5 * gaussian_residuals(expr)]
        if self.basis == "blendshapes":
            parts += [c.expr_sparsity ** 0.5 * sparsity_residuals(expr), c.expr_bounds ** 0.5 * barrier_residuals(expr)]
        return torch.cat(parts, dim=1)

    def expression_slopes(self, expr: torch.Tensor) -> list[torch.Tensor]:
        """Element-wise derivatives of each block of `expression_residuals`, (B, n_expr) each."""
        c = self.cfg
        slopes = [torch.full_like(expr, c.expr ** 0.5)]
        if self.basis == "blendshapes":
            slopes += [c.expr_sparsity ** 0.5 * sparsity_slope(expr), c.expr_bounds ** 0.5 * barrier_slope(expr)]
        return slopes

    def jacobian(self, ev: Evaluation, fields: Sequence[str]) -> torch.Tensor:
        """(B, N, P) derivatives of the residuals in the parameter fields `fields`: every residual is one
        parameter's function, so each block is diagonal."""
        p, c = ev.params, self.cfg
        columns = ev.field_columns(fields)
        jaw_slope = torch.cat([torch.ones_like(p.jaw_pose[:, 1:]), -(p.jaw_pose[:, :1] < 0).to(p.jaw_pose)], dim=1)
        # (field, per-residual slopes (B, D), which of the field's entries each residual reads)
        blocks = [("shape", torch.full_like(p.shape, c.shape ** 0.5).expand(p.batch_size, -1) / ev.shared_frames ** 0.5,
                   None)]
        blocks += [("expr", slope, None) for slope in self.expression_slopes(p.expr)]
        blocks += [("jaw_pose", c.jaw ** 0.5 * jaw_slope, [1, 2, 0]),
                   ("neck_pose", torch.full_like(p.neck_pose, c.neck ** 0.5), None),
                   ("eyes_pose", torch.full_like(p.eyes_pose, c.eyes ** 0.5), None),
                   ("eyelids", torch.full_like(p.eyelids, c.eyelids ** 0.5), None),
                   ("eyelids", c.eyelid_bounds ** 0.5 * barrier_slope(p.eyelids, *EYELID_RANGE), None)]
        return c.weight ** 0.5 * diagonal_blocks(blocks, columns, p.batch_size, p.expr)

    def focal_jacobian(self, ev: Evaluation) -> torch.Tensor:
        """(B, N) derivatives of the residuals in log focal length: none (no camera in them)."""
        return torch.zeros_like(self(ev))

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        p, c = ev.params, self.cfg
        B = p.batch_size
        # The shared identity is counted once per batch (or track), not once per frame.
        shape = c.shape ** 0.5 * gaussian_residuals(p.shape).expand(B, -1) / ev.shared_frames ** 0.5
        jaw = torch.cat([p.jaw_pose[:, 1:], torch.relu(-p.jaw_pose[:, :1])], dim=1)
        parts = [shape, self.expression_residuals(p.expr), c.jaw ** 0.5 * jaw, c.neck ** 0.5 * p.neck_pose,
                 c.eyes ** 0.5 * p.eyes_pose, c.eyelids ** 0.5 * p.eyelids,
                 c.eyelid_bounds ** 0.5 * barrier_residuals(p.eyelids, *EYELID_RANGE)]
        return c.weight ** 0.5 * torch.cat(parts, dim=1)


def diagonal_blocks(blocks: list, columns: dict[str, slice], batch: int, like: torch.Tensor) -> torch.Tensor:
    """The Jacobian (B, N, P) of residuals that are each one parameter's function, stacked block by block:
    blocks [(field, slopes (B, D), entries or None: 0..D-1)]; a field not in `columns` is held (zero columns)."""
    P = max((s.stop for s in columns.values()), default=0)
    N = sum(slopes.shape[1] for _, slopes, _ in blocks)
    J = like.new_zeros(batch, N, P)
    row = 0
    for name, slopes, entries in blocks:
        D = slopes.shape[1]
        if name in columns:
            cols = columns[name].start + torch.as_tensor(entries if entries is not None else range(D), device=J.device)
            J[:, torch.arange(row, row + D, device=J.device), cols] = slopes
        row += D
    return J

