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
def tracked_wojtek(tmp_path_factory) -> Path:
    """Run folder of 20 frames of wojtek.mp4 tracked by the CLI with the default (MediaPipe) pipeline, overlay
    video and report on, DenseMarks off; shared by the tests that read a real run."""
    from tracker.run import main

    out = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRACKER_CACHE_DIR", str(out / "cache"))
        code = main([str(VIDEOS / "wojtek.mp4"), "--max-frames", "20", "--densemarks", "off", "--out", str(out),
                     "--quiet"])
    assert code == 0
    return out / "wojtek"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared test data not found at {SHARED} (set TRACKER_SHARED_DATA)")
    return SHARED
