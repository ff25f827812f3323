"""On-disk cache of per-video landmark tracks, so that re-running the tracker skips detection.

One .npz per (video, detector) under <cache root>/landmarks; it stores a key made of the video's
resolved path, size and modification time, the detector's name and settings and the frame
selection. A file whose key differs (video edited, settings changed) is ignored and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tracker.detect.base import LandmarkTrack

CACHE_ENV = "TRACKER_CACHE_DIR"
TRACK_ARRAYS = ("frame_indices", "timestamps", "points", "confidence", "valid")


def cache_root() -> Path:
    """Where downloaded models and detection caches live: $TRACKER_CACHE_DIR or ~/.cache/tracker."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tracker").expanduser()


def detection_cache_key(video_path: Path, detector_name: str, settings: dict[str, Any]) -> str:
    """Hex digest identifying a detection run: video identity + detector + all settings.

    `settings` must be JSON-serialisable (detector settings, frame selection, box tracking).
    """
    video_path = video_path.resolve()
    stat = video_path.stat()
    identity = {"video": str(video_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "detector": detector_name, "settings": settings}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def cache_file(cache_dir: Path, video_path: Path, detector_name: str) -> Path:
    """The cache file of one video and detector (the same file is rewritten when settings change)."""
    path_digest = hashlib.sha256(str(video_path.resolve()).encode()).hexdigest()[:12]
    return cache_dir / "landmarks" / f"{video_path.stem}-{path_digest}-{detector_name}.npz"


def save_track(path: Path, track: LandmarkTrack, key: str) -> None:
    """Write `track` with its cache key (atomically: a crash never leaves a half-written cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    with open(partial, "wb") as out:
        np.savez(out, key=np.array(key), scheme=np.array(track.scheme),
                 **{name: getattr(track, name) for name in TRACK_ARRAYS})
    partial.replace(path)


def load_track(path: Path, key: str) -> LandmarkTrack | None:
    """The cached track at `path` if it exists, is readable and was stored under `key`; else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != key:
                return None
            return LandmarkTrack(scheme=str(stored["scheme"]),
                                 **{name: stored[name] for name in TRACK_ARRAYS})
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None  # unreadable or from an older layout: detect again
