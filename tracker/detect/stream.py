"""Landmark detection as a stream: decoding and detection run in background threads while the caller consumes
the detections in order (the landmark fit), so that detection and fitting overlap.

A keyframe pass detects a few frames spread over the selection (decoded by skipping the others, searched
without a box hint), so that the caller can estimate the shared identity before the first frame is fitted; the
per-frame pass detects every selected frame in order with the tracked face box, exactly as `detect_video` does.
Given a `keyframe_detector` (a second detector: one instance per thread), the keyframe pass runs in a thread of
its own beside the per-frame pass, which is then hundreds of frames ahead when the fit starts (1000 frames, 2
cores: 0.0177 -> 0.0155 s/frame end to end); without one, it runs first. When the candidates are the whole
selection (a short video: `tracker.pipeline.keyframe_positions`), the keyframes are the per-frame pass's own
first detections instead, served once all of them are in: no frame is detected twice. Only the landmarks cross
the bounded queue (never the images), so memory stays flat in the number of frames. Each pass decodes a few
frames ahead in a thread of its own (`tracker.io.video.prefetched`), so decoding overlaps detection.

Both passes are cached per video (the track under the same file and key as `detect_video`). The result does not
depend on the threading: each pass does the same work in the same order as a run without threads
(`background=False`), and MediaPipe's native calls release the GIL, so decoding and detection really run beside
the fit. (A detection process instead of a thread was measured too: no faster, since what slows detection
beside the fit is the two cores' shared caches and memory, not the GIL.)"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tracker.detect.base import LandmarkDetector, Landmarks, LandmarkTrack
from tracker.detect.boxes import BoxTrackerOptions
from tracker.detect.cache import cache_file, cache_root, detection_cache_key, load_track, save_track
from tracker.detect.sequence import detect_each, track_cache_key
from tracker.io.video import DecodeReport, FrameSelection, prefetched, probe_video, read_frames

QUEUE_FRAMES = 1024
"""Detections the producer may run ahead of the consumer (landmarks only, 6-12 KB each: at most ~12 MB),
enough to keep detecting through the keyframe pass and the identity fit (3-4 s, ~300 frames on 2 cores)."""


@dataclass(frozen=True)
class DetectedFrame:
    """One selected frame's detection: its position in the selection, video frame index, time, landmarks."""

    position: int
    index: int
    timestamp: float
    landmarks: Landmarks | None


class LandmarkStream:
    """Keyframe detections, then every selected frame's detections, produced in a background thread.

    Use as a context manager (leaving it stops and joins the producer): `keyframes()` blocks until the keyframe
    pass is done; iterating yields the DetectedFrames in order; `track()` is the whole LandmarkTrack once the
    iteration is complete. `frame_indices` and `timestamps` cover the frames yielded so far.

    keyframe_detector: builds a second detector for a keyframe pass in a thread of its own (called only when
    that pass is needed and not cached; closed by the stream); None: the keyframe pass runs first, with
    `detector`.
    """

    def __init__(self, video: str | Path, detector: LandmarkDetector, selection: FrameSelection,
                 keyframe_positions: Sequence[int], box_options: BoxTrackerOptions = BoxTrackerOptions(),
                 use_cache: bool = True, cache_dir: Path | None = None, background: bool = True,
                 keyframe_detector: Callable[[], LandmarkDetector] | None = None):
        self.video, self.detector, self.selection = Path(video), detector, selection
        self.keyframe_positions = sorted({int(p) for p in keyframe_positions})
        self.box_options, self.use_cache = box_options, use_cache
        self.cache_dir = cache_dir or cache_root()
        probe_video(self.video, selection.stream)  # a missing or unreadable file fails here, before any thread
        self.report = DecodeReport()
        """How decoding the selection went (stored with the cached track); final once the stream has ended."""
        self._pass_seconds = {"frames": 0.0, "keyframes": 0.0}
        self._frames: list[DetectedFrame] = []
        self._keyframes: LandmarkTrack | None = None
        self._complete = False
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_FRAMES)
        self._keyframe_pass: threading.Thread | None = None
        self._keyframe_outcome: LandmarkTrack | BaseException | None = None
        if background and keyframe_detector is not None and self.keyframe_positions and not self._leading_keyframes:
            self._keyframe_pass = threading.Thread(target=self._detect_keyframes, args=(keyframe_detector,),
                                                   name="landmark-keyframes", daemon=True)
            self._keyframe_pass.start()
        self._messages = self._produce()
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._run, name="landmark-stream", daemon=True)
            self._thread.start()

    @property
    def detect_seconds(self) -> float:
        """Seconds spent decoding and detecting (0 for cached passes), both passes together; overlaps the
        consumer (and, with a keyframe detector, the two passes overlap each other)."""
        return self._pass_seconds["frames"] + self._pass_seconds["keyframes"]

    # --- producer -------------------------------------------------------------------------------------------

    @property
    def _leading_keyframes(self) -> bool:
        """The keyframe candidates are the first frames of the selection, all of them (a short video): they are
        then the per-frame pass's own first detections, so no frame is detected twice."""
        return bool(self.keyframe_positions) and self.keyframe_positions == list(range(len(self.keyframe_positions)))

    def _produce(self) -> Iterator[tuple[str, object]]:
        """("keyframes", LandmarkTrack), then ("frame", DetectedFrame) per selected frame, then ("end", cached)."""
        leading = len(self.keyframe_positions) if self._leading_keyframes else 0
        track = load_track(self._track_cache_path(), self._track_key(), self.report) if self.use_cache else None
        if track is not None:
            if leading:
                yield "keyframes", first_frames(track, leading)
            elif self._keyframe_pass is None:
                yield "keyframes", self._keyframe_track(lambda: self.detector)
            for frame in detected_frames(track):
                yield "frame", frame
            yield "end", True
            return
        if not leading and self._keyframe_pass is None:
            yield "keyframes", self._keyframe_track(lambda: self.detector)
        first: list[DetectedFrame] = []
        with closing(prefetched(read_frames(self.video, self.selection, self.report))) as frames:
            detections = detect_each(frames, self.detector, self.box_options)
            for position in itertools.count():
                start = time.perf_counter()
                item = next(detections, None)
                self._pass_seconds["frames"] += time.perf_counter() - start
                if item is None:
                    break
                frame = DetectedFrame(position, item[0].index, item[0].timestamp, item[1])
                if position < leading:  # a keyframe candidate: held until all of them are detected
                    first.append(frame)
                    if position == leading - 1:
                        yield from self._serve_leading(first)
                    continue
                yield "frame", frame
        if leading and len(first) < leading:  # the video ended before the last candidate
            yield from self._serve_leading(first)
        yield "end", False

    def _serve_leading(self, first: list[DetectedFrame]) -> Iterator[tuple[str, object]]:
        """The keyframes when they are the first frames (`_leading_keyframes`), then those frames themselves."""
        yield "keyframes", LandmarkTrack.from_detections(self.detector.scheme, [f.index for f in first],
                                                         [f.timestamp for f in first], [f.landmarks for f in first])
        for frame in first:
            yield "frame", frame

    def _detect_keyframes(self, make_detector: Callable[[], LandmarkDetector]) -> None:
        """The keyframe pass in a thread of its own, beside the per-frame pass, with a detector of its own (built
        only when the pass is not cached); its track or its error waits for `keyframes`."""
        detector = None

        def build() -> LandmarkDetector:
            nonlocal detector
            detector = make_detector()
            return detector

        try:
            self._keyframe_outcome = self._keyframe_track(build)
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._keyframe_outcome = error
        finally:
            if detector is not None and hasattr(detector, "close"):
                detector.close()

    def _keyframe_track(self, detector: Callable[[], LandmarkDetector]) -> LandmarkTrack | None:
        """The keyframes' detections (cached): full-frame searches, no tracked box, by `detector()` (called only
        when the cache misses). None when the stream was stopped before the end."""
        key = detection_cache_key(self.video, self.detector.name, {
            "detector": self.detector.settings(), "selection": asdict(self.selection),
            "keyframe_positions": self.keyframe_positions})
        path = cache_file(self.cache_dir, self.video, self.detector.name + "-keyframes")
        cached = load_track(path, key) if self.use_cache else None
        if cached is not None:
            return cached
        start = time.perf_counter()
        indices, timestamps, detections = [], [], []
        if self.keyframe_positions:
            searcher = detector()
            keyframes = read_frames(self.video, self.selection, positions=self.keyframe_positions)
            with closing(prefetched(keyframes)) as frames:
                for frame in frames:
                    if self._stop.is_set():
                        return None
                    indices.append(frame.index)
                    timestamps.append(frame.timestamp)
                    detections.append(searcher.detect(frame.rgb, None))  # no tracked box: full search
        track = LandmarkTrack.from_detections(self.detector.scheme, indices, timestamps, detections)
        self._pass_seconds["keyframes"] += time.perf_counter() - start
        if self.use_cache:
            save_track(path, track, key)
        return track

    def _track_cache_path(self) -> Path:
        return cache_file(self.cache_dir, self.video, self.detector.name)

    def _track_key(self) -> str:
        return track_cache_key(self.video, self.detector, self.selection, self.box_options)

    def _run(self) -> None:
        try:
            for message in self._messages:
                if not self._put(message):
                    return
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._put(("error", error))

    def _put(self, message: tuple[str, object]) -> bool:
        """Queue a message, waiting for room; False when the consumer stopped the stream."""
        while not self._stop.is_set():
            try:
                self._queue.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    # --- consumer -------------------------------------------------------------------------------------------

    def _next(self) -> tuple[str, object]:
        if self._thread is None:
            return next(self._messages)
        kind, payload = self._queue.get()
        if kind == "error":
            raise payload  # type: ignore[misc]
        return kind, payload

    def keyframes(self) -> LandmarkTrack:
        """Detections of the keyframes (positions that lie past the end of the video are absent)."""
        if self._keyframes is None and self._keyframe_pass is not None:
            self._keyframe_pass.join()
            if isinstance(self._keyframe_outcome, BaseException):
                raise self._keyframe_outcome
            if self._keyframe_outcome is None:
                raise RuntimeError("the landmark stream was closed before its keyframes were detected")
            self._keyframes = self._keyframe_outcome
        if self._keyframes is None:
            kind, payload = self._next()
            assert kind == "keyframes", kind
            self._keyframes = payload  # type: ignore[assignment]
        return self._keyframes

    def __iter__(self) -> Iterator[DetectedFrame]:
        self.keyframes()
        while not self._complete:
            kind, payload = self._next()
            if kind == "end":
                self._complete = True
                if not payload and self.use_cache:
                    save_track(self._track_cache_path(), self.track(), self._track_key(), self.report)
                return
            self._frames.append(payload)  # type: ignore[arg-type]
            yield payload  # type: ignore[misc]

    @property
    def frame_indices(self) -> np.ndarray:
        return np.array([f.index for f in self._frames], np.int64)

    @property
    def timestamps(self) -> np.ndarray:
        return np.array([f.timestamp for f in self._frames], np.float64)

    def track(self) -> LandmarkTrack:
        """All selected frames' detections (after the iteration has ended)."""
        if not self._complete:
            raise RuntimeError("the landmark stream has not been consumed to its end")
        return LandmarkTrack.from_detections(self.detector.scheme, [f.index for f in self._frames],
                                             [f.timestamp for f in self._frames],
                                             [f.landmarks for f in self._frames])

    def close(self) -> None:
        """Stop the producer and wait for it (the detector may be closed afterwards)."""
        self._stop.set()
        for thread in (self._thread, self._keyframe_pass):
            if thread is not None:
                thread.join()
        self._messages.close()

    def __enter__(self) -> LandmarkStream:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def first_frames(track: LandmarkTrack, count: int) -> LandmarkTrack:
    """The first `count` frames of a track (all of them when it is shorter)."""
    keep = slice(0, min(count, len(track)))
    return LandmarkTrack(track.scheme, track.frame_indices[keep], track.timestamps[keep], track.points[keep],
                         track.confidence[keep], track.valid[keep])


def detected_frames(track: LandmarkTrack) -> Iterator[DetectedFrame]:
    """The frames of a known track, in order."""
    for t in range(len(track)):
        yield DetectedFrame(t, int(track.frame_indices[t]), float(track.timestamps[t]), track.landmarks(t))


class KnownTrack:
    """A track detected beforehand (or exact landmarks), served like a LandmarkStream: its frames at the keyframe
    positions (those inside it), then every frame."""

    def __init__(self, track: LandmarkTrack, keyframe_positions: Sequence[int]):
        self._track = track
        keys = [int(p) for p in sorted(set(keyframe_positions)) if p < len(track)]
        self._keyframes = LandmarkTrack(track.scheme, track.frame_indices[keys], track.timestamps[keys],
                                        track.points[keys], track.confidence[keys], track.valid[keys])
        self.frame_indices, self.timestamps = track.frame_indices, track.timestamps
        self.detect_seconds = 0.0
        self.report = DecodeReport()

    def keyframes(self) -> LandmarkTrack:
        return self._keyframes

    def __iter__(self) -> Iterator[DetectedFrame]:
        return detected_frames(self._track)

    def track(self) -> LandmarkTrack:
        return self._track
