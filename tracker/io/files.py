"""Writing files safely: atomic writes, strict JSON, and the run folder OUT/<name>/ of one video.

- Every output is written to a uniquely named temporary file in its target folder, then renamed over the
  target: a reader (or a crash, or a second run writing the same file at the same time) never sees a half-written
  file, and concurrent writers never collide on a temporary name.
- JSON is strict: non-finite floats become null (json's default would write bare NaN, which is not JSON).
- `RunFolder` checks the output root before any work, derives a safe folder name from the video (one path
  component: no '..', never empty, bytes that are not UTF-8 escaped), never lets two videos share a folder
  silently, and removes the previous run's outputs when a new run starts, so no folder shows a stale
  `complete: true` next to new work.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from tracker.errors import TrackerError

RUN_OUTPUTS = ("flame_params.npz", "summary.json", "report.png", "overlay.mp4", "texture.png", "lighting.json",
               "vertex_colors.npy", "densemarks_canonical_map.npz", "densemarks_canonical_map.png", "meshes")
"""What a run writes into its folder (files or folders): removed when a new run starts there."""
OWNER_FILE = ".tracker-video"
"""Records which video a run folder belongs to (its resolved path)."""
TEMP_PREFIX = ".tmp-"
STALE_TEMP_SECONDS = 3600
"""Temporary files older than this in a run folder are left over from a killed run and removed."""


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A unique temporary path next to `path` to write to; renamed over `path` when the block succeeds,
    removed when it fails (or is interrupted). The temporary name keeps the suffix (writers that pick the format
    by suffix, e.g. np.savez or cv2.imwrite, see the right one)."""
    path = Path(path)
    # Unique per process and call; created by the writer itself, so it gets the usual permissions (umask).
    tmp = path.parent / f"{TEMP_PREFIX}{path.stem[:40]}-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}"
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write `path` atomically with `write(file object)`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)
    return Path(path)


def strict_json(data: Any, **kwargs) -> str:
    """JSON text with non-finite floats as null and numpy values as plain numbers (never bare NaN/Infinity)."""
    return json.dumps(_finite(data), allow_nan=False, default=str, **kwargs)


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def write_image(path: Path, rgb: np.ndarray) -> Path:
    """An RGB uint8 image (format from the suffix), written atomically."""
    import cv2

    ok, encoded = cv2.imencode(Path(path).suffix, np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise TrackerError(f"cannot encode {path} as {Path(path).suffix}")
    return atomic_write(path, lambda fh: fh.write(encoded.tobytes()))


def write_json(path: Path, data: Any) -> Path:
    """Strict JSON, written atomically."""
    text = strict_json(data, indent=2).encode()
    return atomic_write(path, lambda fh: fh.write(text))


def printable(path: Path | str) -> str:
    """A path as text that any output accepts (bytes that are not UTF-8 as \\xNN)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def safe_name(video: Path) -> str:
    """A folder name from a video's file name: one path component, never empty or '.'/'..', no hidden name,
    bytes that are not UTF-8 escaped (as %NN), path separators and control characters replaced by '_'."""
    raw = os.fsencode(video.name)
    stem = raw.rsplit(b".", 1)[0] if b"." in raw else raw
    text = stem.replace(b"\\", b"_").decode("utf-8", "backslashreplace")
    text = re.sub(r"\\x([0-9a-f]{2})", r"%\1", text)  # bytes that are not UTF-8, as %NN
    text = re.sub(r"[\x00-\x1f\x7f/:]", "_", text).strip(" .")
    return text[:120] or "video"


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_output_root(root: Path) -> None:
    """Refuse an output root that cannot hold results (a file, below a file, not writable) before any work,
    without creating it."""
    existing = _nearest_existing(root.absolute())
    if not existing.is_dir():
        raise TrackerError(f"output folder {root} cannot be created: {existing} is a file; choose another --out")
    try:
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise TrackerError(f"output folder {root} is not writable ({error.strerror or error} in {existing}); "
                           "choose another --out") from None


class RunFolder:
    """OUT/<name>/ of one video: created only after the inputs were accepted (`open`)."""

    def __init__(self, root: str | Path, video: Path):
        self.root = Path(root)
        self.video = video
        check_output_root(self.root)
        self.owner = os.fsencode(str(video.resolve()))
        name = safe_name(video)
        self.path = self.root / name
        if self._owned_by_another(self.path):  # A/take.mp4 and B/take.mov into one --out: both kept
            self.path = self.root / f"{name}-{hashlib.sha256(self.owner).hexdigest()[:8]}"
        self.renamed = self.path.name != name
        self.created: list[Path] = []

    def _owned_by_another(self, folder: Path) -> bool:
        try:
            return (folder / OWNER_FILE).read_bytes() != self.owner
        except OSError:
            return False

    def open(self) -> Path:
        """Create the folder, claim it for this video and remove the previous run's outputs and temporary files;
        returns the folder."""
        try:
            self.created = [p for p in (self.path, *self.path.parents) if not p.exists()]
            self.path.mkdir(parents=True, exist_ok=True)
            resolved_root = self.root.resolve()
            if self.path.resolve().parent != resolved_root:
                raise TrackerError(f"{self.path} leads outside {self.root} (a link?); remove it or choose another "
                                   "--out")
            for name in RUN_OUTPUTS:
                target = self.path / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
            for leftover in self.path.glob(f"{TEMP_PREFIX}*"):  # from killed runs (not from one still running)
                if time.time() - leftover.stat().st_mtime > STALE_TEMP_SECONDS:
                    leftover.unlink(missing_ok=True)
            atomic_write(self.path / OWNER_FILE, lambda fh: fh.write(self.owner))
        except OSError as error:
            raise TrackerError(f"cannot prepare the output folder {self.path} ({error.strerror or error}); "
                               "choose another --out") from None
        return self.path

    @contextmanager
    def removed_if_refused(self, written: Callable[[], int]) -> Iterator[None]:
        """When input is refused (a TrackerError) before `written()` reports any frame on disk, the folders
        `open` created are removed again: refused input leaves nothing behind."""
        try:
            yield
        except TrackerError:
            if not written():
                (self.path / OWNER_FILE).unlink(missing_ok=True)
                for folder in self.created:  # deepest first
                    try:
                        folder.rmdir()
                    except OSError:
                        break  # not empty: something else lives there
            raise
