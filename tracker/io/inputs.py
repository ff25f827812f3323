"""Which videos a command was given: files, folders, glob patterns, or list files of them."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

from tracker.errors import TrackerError

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
LIST_SUFFIXES = (".txt", ".list", ".lst")
"""A file with one of these suffixes names one video, folder or pattern per line (# comments; relative paths
are relative to the list file's folder)."""


def find_videos(inputs: Sequence[str | Path]) -> list[Path]:
    """The video files named by `inputs`, in order, each once: files as given, folders searched non-recursively
    (sorted by name), glob patterns (`**` recurses) and list files expanded. TrackerError when an input matches
    nothing."""
    videos: dict[Path, None] = {}
    for item in inputs:
        for video in _expand(str(item)):
            videos.setdefault(video, None)
    if not videos:
        raise TrackerError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) found in {', '.join(map(str, inputs))}")
    return list(videos)


def _expand(item: str, base: Path | None = None) -> list[Path]:
    path = Path(item).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        lines = [line.strip() for line in path.read_text().splitlines()]
        return [video for line in lines if line and not line.startswith("#") for video in _expand(line, path.parent)]
    if path.is_file():
        return [path]
    if glob.has_magic(str(path)):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        videos = [p for p in matches if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES]
        if videos:
            return videos
        raise TrackerError(f"no videos match {item}")
    raise TrackerError(f"input not found: {item}")
