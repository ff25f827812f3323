"""Which real videos to evaluate: files and folders given on the command line, default the shared dev clips."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from eval import SHARED_DATA
from tracker.errors import TrackerError
from tracker.io.inputs import VIDEO_SUFFIXES

DEFAULT_VIDEO_DIR = SHARED_DATA / "videos" / "dev"
REFERENCE_VIDEO = DEFAULT_VIDEO_DIR / "wojtek.mp4"
"""A frontal 512 x 512 clip where both detectors find the face: --quick runs and the speed benchmark use it."""


def find_videos(paths: Sequence[str | Path]) -> list[Path]:
    """Video files among `paths` (files as given, folders searched non-recursively, sorted by name)."""
    videos: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            videos += sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
        elif path.is_file():
            videos.append(path)
        else:
            raise TrackerError(f"video path {path} does not exist (set TRACKER_SHARED_DATA or pass --videos)")
    if not videos:
        raise TrackerError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) found in {', '.join(map(str, paths))}")
    return videos
