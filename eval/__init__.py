"""Evaluation harness of the head tracker: metrics (eval.metrics) and benchmarks (eval.geometry, ...)."""

import os
from pathlib import Path

SHARED_DATA = Path(os.environ.get("TRACKER_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
"""The shared data folder beside the repository (clips, face images, FLAME stand-in), or $TRACKER_SHARED_DATA."""
