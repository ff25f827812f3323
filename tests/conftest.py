"""Shared fixtures: paths into ../shared/data (beside the repo) and a small FLAME model."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRACKER_SHARED_DATA", REPO.parent / "shared" / "data"))
ASSETS = SHARED / "assets"
FLAME_STANDIN = ASSETS / "flame_standin" / "flame_standin.pkl"
FLAME_ASSETS = ASSETS / "flame"
VIDEOS = SHARED / "videos" / "dev"
MEDIAPIPE_TASK = ASSETS / "mediapipe" / "face_landmarker_v2_with_blendshapes.task"

# The CLI under test finds FLAME, its side assets and the MediaPipe model through these variables.
os.environ.setdefault("FLAME_MODEL", str(FLAME_STANDIN))
os.environ.setdefault("TRACKER_FLAME_ASSETS", str(FLAME_ASSETS))
os.environ.setdefault("TRACKER_MEDIAPIPE_MODEL", str(MEDIAPIPE_TASK))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared test data not found at {SHARED} (set TRACKER_SHARED_DATA)")
    return SHARED
