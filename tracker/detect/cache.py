"""On-disk cache of per-video landmark tracks, so that re-running the tracker skips detection.

One .npz per (video, detector) under <cache root>/landmarks; it stores a key made of the video's
resolved path, size and modification time, the detector's name and settings and the frame
selection. A file whose key differs (video edited, settings changed) is ignored and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from tracker.detect.base import LandmarkTrack
from tracker.errors import TrackerError, warn
from tracker.io.files import atomic_write
from tracker.io.safe_load import read_npz
from tracker.io.video import DecodeReport

CACHE_ENV = "TRACKER_CACHE_DIR"
TRACK_ARRAYS = ("frame_indices", "timestamps", "points", "confidence", "valid")


def cache_root() -> Path:
    """Where detection caches live: $TRACKER_CACHE_DIR or ~/.cache/tracker."""
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
    path_digest = hashlib.sha256(os.fsencode(video_path.resolve())).hexdigest()[:12]
    return cache_dir / "landmarks" / f"{video_path.stem}-{path_digest}-{detector_name}.npz"


def save_track(path: Path, track: LandmarkTrack, key: str, report: DecodeReport | None = None) -> None:
    """Write `track` with its cache key and how decoding went (atomically, under a unique temporary name, so
    a crash or a concurrent run never leaves or reads a half-written cache). A cache that cannot be written is
    skipped with a warning: it only saves time."""
    decode = json.dumps((report or DecodeReport()).__dict__)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda out: np.savez(out, key=np.array(key), scheme=np.array(track.scheme),
                                                decode=np.array(decode),
                                                **{name: getattr(track, name) for name in TRACK_ARRAYS}))
    except OSError as error:
        warn(f"cannot write the detection cache {path} ({error.strerror or error}); tracking goes on")


def _decode_report(text: str) -> DecodeReport:
    """The stored DecodeReport, its fields checked (ValueError when damaged)."""
    values, blank = json.loads(text), DecodeReport()
    if not isinstance(values, dict) or set(values) != set(blank.__dict__) or any(
            type(values[name]) is not type(value) for name, value in blank.__dict__.items()):
        raise ValueError("damaged decoding record")
    return DecodeReport(**values)


def load_track(path: Path, key: str, report: DecodeReport | None = None) -> LandmarkTrack | None:
    """The cached track at `path` if it exists, is readable and was stored under `key`; else None. `report` gets
    the decoding report stored with it."""
    if not path.is_file():
        return None
    try:
        stored = read_npz(path, "detection cache")
        if str(stored.get("key")) != key or "decode" not in stored:
            return None  # another video, other settings, or an older layout: detect again
        track = LandmarkTrack(scheme=str(stored["scheme"]), **{name: stored[name] for name in TRACK_ARRAYS})
        if report is not None:
            report.__dict__.update(_decode_report(str(stored["decode"])).__dict__)
        return track
    except (TrackerError, KeyError, ValueError, TypeError) as error:
        warn(f"ignoring the detection cache {path} ({str(error)[-200:]}): detecting again")
        return None
