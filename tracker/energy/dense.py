"""DenseMarks energies (implementation lands with the DenseMarks stage)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DenseRenderConfig:
    weight: float = 0.0
    """Weight of the canonical-cube render-and-compare term."""


@dataclass
class DenseCorrespondenceConfig:
    weight: float = 0.0
    """Weight of the nearest-canonical-coordinate correspondence term."""
