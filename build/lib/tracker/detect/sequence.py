"""Landmarks for a whole video: detection with a tracked face box, cached on disk per video."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

from tracker.detect.base import LandmarkDetector, Landmarks, LandmarkTrack
from tracker.detect.boxes import BoxTrackerOptions, FaceBoxTracker
from tracker.detect.cache import cache_file, cache_root, detection_cache_key, load_track, save_track
from tracker.io.video import Frame, FrameSelection, probe_video, read_frames


def detect_frames(frames: Iterable[Frame], detector: LandmarkDetector,
                  box_options: BoxTrackerOptions = BoxTrackerOptions(),
                  on_frame: Callable[[Frame, Landmarks | None], None] | None = None) -> LandmarkTrack:
    """Run `detector` over `frames` in order, cropping around the box tracked from the previous
    frame; a frame where the tracked face is lost is searched again in full before giving up."""
    box_tracker = FaceBoxTracker(box_options)
    indices: list[int] = []
    timestamps: list[float] = []
    detections: list[Landmarks | None] = []
    for frame in frames:
        hint = box_tracker.box
        found = detector.detect(frame.rgb, hint)
        if found is None and hint is not None:
            found = detector.detect(frame.rgb, None)
        box_tracker.update(found)
        indices.append(frame.index)
        timestamps.append(frame.timestamp)
        detections.append(found)
        if on_frame is not None:
            on_frame(frame, found)
    return LandmarkTrack.from_detections(detector.scheme, indices, timestamps, detections)


def detect_video(video_path: str | Path, detector: LandmarkDetector,
                 selection: FrameSelection = FrameSelection(),
                 box_options: BoxTrackerOptions = BoxTrackerOptions(),
                 cache_dir: Path | None = None, use_cache: bool = True,
                 on_frame: Callable[[Frame, Landmarks | None], None] | None = None) -> LandmarkTrack:
    """Landmarks of the selected frames of a video, read from the cache when an identical run
    (same file, detector, settings and selection) was stored before. `on_frame` is called for
    freshly detected frames only (progress reporting)."""
    video_path = Path(video_path)
    probe_video(video_path)  # a missing or unreadable file fails here, before the cache lookup
    frames = read_frames(video_path, selection)
    if not use_cache:
        return detect_frames(frames, detector, box_options, on_frame)
    settings = {"detector": detector.settings(), "selection": asdict(selection),
                "boxes": asdict(box_options)}
    key = detection_cache_key(video_path, detector.name, settings)
    path = cache_file(cache_dir or cache_root(), video_path, detector.name)
    track = load_track(path, key)
    if track is None:
        track = detect_frames(frames, detector, box_options, on_frame)
        save_track(path, track, key)
    return track
