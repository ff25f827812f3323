"""Common types of the 2D landmark detectors and the factory that builds one by name.

Coordinates everywhere are full-frame pixels, x right and y down, in the pixel-centre convention:
the centre of pixel (row i, column j) is at (j + 0.5, i + 0.5), so the image spans [0, W] x [0, H].
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np

from tracker.errors import MissingAssetError, TrackerError

SCHEME_MEDIAPIPE = "mediapipe478"
SCHEME_IBUG68 = "ibug68"
POINTS_PER_SCHEME = {SCHEME_MEDIAPIPE: 478, SCHEME_IBUG68: 68}


@dataclass(frozen=True)
class FaceBox:
    """Axis-aligned face box in frame pixels (x0, y0) top-left to (x1, y1) bottom-right."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float = 1.0

    @property
    def center(self) -> tuple[float, float]:
        return 0.5 * (self.x0 + self.x1), 0.5 * (self.y0 + self.y1)

    @property
    def size(self) -> float:
        """The larger side of the box."""
        return max(self.x1 - self.x0, self.y1 - self.y0)


@dataclass(frozen=True)
class Landmarks:
    """2D landmarks of one face in one frame.

    points: (N, 2) float32 full-frame pixel coordinates (x, y), pixel-centre convention.
    confidence: (N,) float32 in [0, 1]; detectors without per-point scores report 1.
    scheme: 'mediapipe478' (raw MediaPipe mesh order) or 'ibug68' (iBUG 300-W order).
    """

    points: np.ndarray
    confidence: np.ndarray
    scheme: str

    def __post_init__(self) -> None:
        n_points = POINTS_PER_SCHEME.get(self.scheme)
        if n_points is None:
            raise ValueError(f"unknown landmark scheme {self.scheme!r}")
        if self.points.shape != (n_points, 2) or self.confidence.shape != (n_points,):
            raise ValueError(f"{self.scheme} landmarks need points ({n_points}, 2) and confidence "
                             f"({n_points},), got {self.points.shape} and {self.confidence.shape}")

    def bounding_box(self) -> FaceBox:
        """Tight box around the points (score = mean confidence)."""
        x0, y0 = self.points.min(axis=0)
        x1, y1 = self.points.max(axis=0)
        return FaceBox(float(x0), float(y0), float(x1), float(y1), float(self.confidence.mean()))


class LandmarkDetector(Protocol):
    """Finds one face's landmarks in an RGB frame.

    `box_hint` is the tracked face box (the landmark bounding box of a previous frame, see
    tracker.detect.boxes); detectors use it to crop instead of searching the whole frame.
    Returns None when no face is found.
    """

    name: str
    scheme: str

    def detect(self, rgb: np.ndarray, box_hint: FaceBox | None = None) -> Landmarks | None: ...

    def settings(self) -> dict[str, Any]:
        """Everything that changes the output (model files, crop sizes); part of the cache key."""
        ...


# Backends import lazily (module, detector class, options dataclass): each pulls in a heavy native
# library that the others don't need.
DETECTORS: Mapping[str, tuple[str, str, str]] = {
    "mediapipe": ("tracker.detect.mediapipe", "MediaPipeDetector", "MediaPipeOptions"),
    "dlib": ("tracker.detect.dlib", "DlibDetector", "DlibOptions"),
    "fan": ("tracker.detect.fan", "FanDetector", "FanOptions"),
}


def make_detector(name: str, **options: Any) -> LandmarkDetector:
    """Build the detector registered under `name` with its options (see each backend's *Options)."""
    if name not in DETECTORS:
        raise TrackerError(f"unknown landmark detector {name!r}: choose one of {', '.join(DETECTORS)}")
    module_name, detector_name, options_name = DETECTORS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:  # an optional backend whose extra is not installed
        raise MissingAssetError(f"--landmarks {name} needs the {exc.name} package: pip install \".[{name}]\" "
                                "(or pip install -r requirements.txt)") from None
    options_type = getattr(module, options_name)
    unknown = sorted(set(options) - {field.name for field in fields(options_type)})
    if unknown:
        raise TrackerError(f"unknown option(s) {', '.join(unknown)} for landmark detector {name!r}")
    return getattr(module, detector_name)(options_type(**options))


@dataclass(frozen=True)
class LandmarkTrack:
    """Landmarks of one face over a sequence of video frames (T frames, N points each).

    frame_indices: (T,) int64 index of each frame in the video.
    timestamps: (T,) float64 presentation times in seconds.
    points: (T, N, 2) float32 frame pixel coordinates, NaN where no face was found.
    confidence: (T, N) float32, 0 where no face was found.
    valid: (T,) bool, whether a face was found.
    """

    scheme: str
    frame_indices: np.ndarray
    timestamps: np.ndarray
    points: np.ndarray
    confidence: np.ndarray
    valid: np.ndarray

    def __len__(self) -> int:
        return len(self.frame_indices)

    def landmarks(self, t: int) -> Landmarks | None:
        """Landmarks of the t-th frame of the track (not video frame index), None if no face."""
        if not self.valid[t]:
            return None
        return Landmarks(self.points[t], self.confidence[t], self.scheme)

    @staticmethod
    def from_detections(scheme: str, frame_indices: list[int], timestamps: list[float],
                        detections: list[Landmarks | None]) -> LandmarkTrack:
        n_points = POINTS_PER_SCHEME[scheme]
        points = np.full((len(detections), n_points, 2), np.nan, np.float32)
        confidence = np.zeros((len(detections), n_points), np.float32)
        for t, found in enumerate(detections):
            if found is not None:
                points[t], confidence[t] = found.points, found.confidence
        return LandmarkTrack(scheme=scheme, frame_indices=np.asarray(frame_indices, np.int64),
                             timestamps=np.asarray(timestamps, np.float64), points=points,
                             confidence=confidence,
                             valid=np.array([d is not None for d in detections], dtype=bool))
