"""Video input: probe a file and decode its frames as RGB arrays with per-frame timestamps (PyAV).

Frames are decoded sequentially from the start, so frame indices are exact for any container and
for variable frame rate streams (no index-by-seek guessing). Timestamps are the presentation time of
each frame in seconds, as stored in the file, so variable frame rate video keeps its real timing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np

from tracker.errors import TrackerError


@dataclass(frozen=True)
class VideoInfo:
    """Static properties of a video's first video stream.

    `n_frames` is an estimate from container metadata (exact for most mp4 files, approximate for
    streams that only declare a duration); decoding is the only exact count.
    """

    path: Path
    width: int
    height: int
    fps: float
    n_frames: int


@dataclass(frozen=True)
class FrameSelection:
    """Which frames to read: indices start, start + stride, ... (at most `max_frames` of them)."""

    start: int = 0
    max_frames: int | None = None
    stride: int = 1

    def __post_init__(self) -> None:
        if self.start < 0:
            raise TrackerError(f"start frame must be >= 0, got {self.start}")
        if self.stride < 1:
            raise TrackerError(f"frame stride must be >= 1, got {self.stride}")
        if self.max_frames is not None and self.max_frames < 1:
            raise TrackerError(f"max_frames must be >= 1, got {self.max_frames}")

    def wants(self, index: int) -> bool:
        """Whether frame `index` of the video is selected (ignoring the max_frames budget)."""
        return index >= self.start and (index - self.start) % self.stride == 0


class Frame(NamedTuple):
    """One decoded frame: its index in the video, presentation time in seconds, RGB uint8 (H, W, 3)."""

    index: int
    timestamp: float
    rgb: np.ndarray


def _open_container(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise TrackerError(f"video not found: {path}")
    if not path.is_file():
        raise TrackerError(f"video path is not a file: {path}")
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, UnicodeDecodeError) as error:
        raise TrackerError(f"cannot read {path} as a video ({error.__class__.__name__}): "
                           "is it a valid mp4/mov/mkv/avi file?") from None
    if not container.streams.video:
        container.close()
        raise TrackerError(f"{path} contains no video stream")
    return container


def _frame_rate(stream: av.video.stream.VideoStream, path: Path) -> float:
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise TrackerError(f"cannot determine the frame rate of {path}")
    return float(rate)


def _frame_count_estimate(container: av.container.InputContainer,
                          stream: av.video.stream.VideoStream, fps: float) -> int:
    if stream.frames > 0:
        return int(stream.frames)
    if stream.duration is not None and stream.time_base is not None:
        return round(float(stream.duration * stream.time_base) * fps)
    if container.duration is not None:  # microseconds
        return round(container.duration / 1e6 * fps)
    return 0


def probe_video(path: str | Path) -> VideoInfo:
    """Read a video's size, average frame rate and estimated frame count without decoding it."""
    path = Path(path)
    with _open_container(path) as container:
        stream = container.streams.video[0]
        fps = _frame_rate(stream, path)
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise TrackerError(f"{path} has a video stream without a frame size; is the file damaged?")
        return VideoInfo(path=path, width=width, height=height, fps=fps,
                         n_frames=_frame_count_estimate(container, stream, fps))


def read_frames(path: str | Path, selection: FrameSelection = FrameSelection()) -> Iterator[Frame]:
    """Decode the selected frames of a video in order.

    Raises TrackerError if the file is missing or not a video, if no frame at all can be decoded,
    or if `selection.start` lies beyond the last frame.
    """
    path = Path(path)
    with _open_container(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame + slice threading: decoding is often the bottleneck
        fps = _frame_rate(stream, path)
        n_decoded = n_yielded = 0
        try:
            for index, frame in enumerate(container.decode(stream)):
                n_decoded = index + 1
                if not selection.wants(index):
                    continue
                # Streams without pts fall back to the nominal frame rate.
                timestamp = float(frame.time) if frame.time is not None else index / fps
                yield Frame(index, timestamp, frame.to_ndarray(format="rgb24"))
                n_yielded += 1
                if selection.max_frames is not None and n_yielded >= selection.max_frames:
                    return
        except av.FFmpegError as error:
            if n_decoded == 0:
                raise TrackerError(f"cannot decode any frame of {path} ({error.__class__.__name__}): "
                                   "the video stream is damaged or uses an unsupported codec") from None
            raise TrackerError(f"decoding {path} failed after frame {n_decoded - 1} "
                               f"({error.__class__.__name__}): the file is truncated or damaged") from None
    if n_decoded == 0:
        raise TrackerError(f"{path} has no decodable video frames")
    if n_yielded == 0:
        raise TrackerError(f"start frame {selection.start} is beyond the end of {path} "
                           f"({n_decoded} frames)")
