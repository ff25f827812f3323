"""Photometric render-and-compare energy (implementation lands with the renderer)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PhotometricConfig:
    weight: float = 0.0
    """Weight of the photometric term (the photometric stage turns it on)."""
    robust: str = "huber"
    """Robust loss on colour residuals: l1 | huber."""
    regions: list[str] = field(default_factory=lambda: ["face", "forehead", "nose"])
    """FLAME_masks regions compared."""
