"""Checkpointing flame_params.npz while a run goes on, and knowing what is on disk when it stops.

The first finished frame is written at once and then the finished frames every CHECKPOINT_SECONDS, so a
`kill -9` loses seconds of work, never more; an interrupt, a signal or a crash writes every finished frame
before the run stops. Every write before the last one says `complete: false`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tracker.camera import Camera
from tracker.detect.base import LandmarkTrack
from tracker.errors import signal_delivered
from tracker.fit.solver import FRAME_FIELDS
from tracker.flame.model import FlameParams
from tracker.io.export import FrameTable, write_params

CHECKPOINT_SECONDS = 10.0
"""Longest time between rewrites of flame_params.npz while frames are being tracked."""
ON_DISK_ATTRIBUTE = "tracker_on_disk"
"""Attribute of an exception that stopped a run: the run's `OnDisk` (what the user has)."""


@dataclass
class OnDisk:
    """What the run folder holds now."""

    path: Path | None = None
    frames: int = 0
    """Rows in the flame_params.npz on disk (0: none written)."""
    complete: bool = False

    def describe(self) -> str:
        """One clause for the user: which frames they have."""
        if not self.frames:
            return "no frames were written"
        return (f"{self.frames} finished frame{'s' if self.frames != 1 else ''} were written to {self.path}"
                f" (complete: {'true' if self.complete else 'false'})")

    @contextmanager
    def attached_to_errors(self) -> Iterator[None]:
        """Any exception leaving the block carries this record (see ON_DISK_ATTRIBUTE)."""
        try:
            yield
        except BaseException as error:
            if getattr(error, ON_DISK_ATTRIBUTE, None) is None:
                setattr(error, ON_DISK_ATTRIBUTE, self)
            raise


class OutputWriter:
    """Collects finished frames of the landmark stage and checkpoints them; writes whole tables later."""

    def __init__(self, out_dir: Path, camera: Camera, fps: float, metadata: dict, track: LandmarkTrack,
                 on_disk: OnDisk, clock: Callable[[], float] = time.monotonic):
        self.path = out_dir / "flame_params.npz"
        self.camera, self.fps, self.metadata, self.track = camera, fps, metadata, track
        self.on_disk, self.clock = on_disk, clock
        self.done: dict[int, tuple] = {}
        self.last_write: float | None = None

    def add(self, t: int, params, err: float, _reinit: bool) -> None:
        self.done[t] = (params, err)
        if self.last_write is None or self.clock() - self.last_write >= CHECKPOINT_SECONDS:
            self.write_partial()

    def write_partial(self) -> None:
        """Finished frames only, marked incomplete."""
        if not self.done:
            return
        ts = sorted(self.done)
        params = [self.done[t][0] for t in ts]
        stacked = FlameParams(shape=params[0].shape,
                              **{n: torch.cat([getattr(p, n) for p in params]) for n in FRAME_FIELDS})
        table = FrameTable(stacked, self.track.frame_indices[ts], self.track.timestamps[ts],
                           np.ones(len(ts), bool), np.array([self.done[t][1] for t in ts], np.float32))
        self.write(table, complete=False)

    def write(self, table: FrameTable, complete: bool) -> dict[str, np.ndarray]:
        """Write a whole table; returns the arrays as written (invariants enforced)."""
        arrays = write_params(self.path, table, self.camera, self.fps, {**self.metadata, "complete": complete})
        self.last_write = self.clock()
        self.on_disk.path, self.on_disk.frames, self.on_disk.complete = self.path, len(table.frame_index), complete
        return arrays

    @contextmanager
    def keep_partial_on_failure(self) -> Iterator[None]:
        """On any failure or interrupt inside the block, write the finished frames, then re-raise."""
        try:
            yield
        except BaseException as error:
            if isinstance(error, KeyboardInterrupt):
                signal_delivered()
            self.write_partial()
            raise
