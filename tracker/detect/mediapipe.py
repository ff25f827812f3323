"""MediaPipe Face Landmarker (478-point face mesh) through mediapipe.tasks, run on square crops.

The landmarker's internal face detector sees a 128x128 image, so a face that is small in the frame
(a 1080p wide shot) is invisible to it. Tracked frames are therefore cropped around the face box and
upscaled; frames without a box are searched first whole, then in overlapping square windows.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's native INFO/WARNING lines clutter the CLI
import mediapipe as mp  # noqa: E402
import numpy as np  # noqa: E402
from mediapipe.tasks.python import BaseOptions, vision  # noqa: E402

from tracker.detect.base import SCHEME_MEDIAPIPE, FaceBox, Landmarks
from tracker.detect.boxes import Crop, crop_around_box, square_crop
from tracker.errors import MissingAssetError
from tracker.flame.assets import REPO_ASSETS

log = logging.getLogger(__name__)
_STDERR_LOCK = threading.Lock()

MODEL_ENV = "TRACKER_MEDIAPIPE_MODEL"
SHIPPED_MODEL = REPO_ASSETS / "face_landmarker_v2_with_blendshapes.task"
"""Google's MediaPipe Face Landmarker (Apache-2.0), shipped in flame_assets/ so detection never downloads."""

# Mesh indices of points with an iBUG-68 counterpart, for comparing the two schemes.
MEDIAPIPE_IBUG_EQUIVALENTS = {
    "right_eye_outer": (33, 36),   # subject's right eye, image left: (mediapipe, ibug68)
    "right_eye_inner": (133, 39),
    "left_eye_inner": (362, 42),
    "left_eye_outer": (263, 45),
    "nose_tip": (4, 30),  # measured: 4 is nearer than the mesh apex 1 to where iBUG puts the tip
    "mouth_right": (61, 48),
    "mouth_left": (291, 54),
    "chin": (152, 8),
}


@dataclass(frozen=True)
class MediaPipeOptions:
    """model_path: .task bundle; None = $TRACKER_MEDIAPIPE_MODEL, else the one shipped in flame_assets/.
    crop_expand: crop side over the tracked face box side.
    crop_size: side of the crop fed to the landmarker, in pixels.
    search_levels, min_search_window: a frame without a box is searched whole, then in square
    windows of 1/2, 1/4 ... (search_levels of them) of its shorter side, none smaller than
    min_search_window pixels; the landmarker finds faces down to about a fifth of its input.
    min_confidence: face detection and presence thresholds of the landmarker."""

    model_path: str | None = None
    crop_expand: float = 1.8
    crop_size: int = 384
    search_levels: int = 2
    min_search_window: int = 192
    min_confidence: float = 0.5


def resolve_model_path(options: MediaPipeOptions) -> Path:
    """The .task file to load: explicit option, then $TRACKER_MEDIAPIPE_MODEL, then the shipped one."""
    explicit = options.model_path or os.environ.get(MODEL_ENV)
    path = Path(explicit).expanduser() if explicit else SHIPPED_MODEL
    if not path.is_file():
        raise MissingAssetError(f"MediaPipe model file not found: {path}")
    return path


@contextmanager
def native_stderr_to_log() -> Iterator[None]:
    """Inside the block, what is written to the process's stderr (file descriptor 2: MediaPipe's and TensorFlow
    Lite's start-up lines, which no environment variable silences) goes to this module's DEBUG log instead of the
    terminal (`-vv` shows it). The descriptor is the whole process's, so the block is kept short (a detector's
    start) and one at a time (a lock: two detectors started in two threads would restore each other's copies);
    another thread's line written meanwhile lands in the log too. Restored whatever happens."""
    with _STDERR_LOCK, tempfile.TemporaryFile() as captured:
        try:
            saved = os.dup(2)
        except OSError:  # no usable stderr: nothing to keep clean
            yield
            return
        sys.stderr.flush()
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", "replace").splitlines():
                log.debug("mediapipe: %s", line)


def _create_landmarker(model_path: Path, min_confidence: float) -> vision.FaceLandmarker:
    landmarker_options = vision.FaceLandmarkerOptions(
        base_options=BaseOptions(model_asset_path=str(model_path)),
        running_mode=vision.RunningMode.IMAGE,  # crops move every frame: no internal tracking
        num_faces=1,
        min_face_detection_confidence=min_confidence,
        min_face_presence_confidence=min_confidence,
    )
    try:
        return vision.FaceLandmarker.create_from_options(landmarker_options)
    except (RuntimeError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MissingAssetError(f"cannot load MediaPipe model {model_path} ({first_line}); "
                                "is it a face_landmarker .task file?") from None


def _window_centres(extent: int, side: float) -> np.ndarray:
    """Centres of windows of `side` <= `extent` spanning [0, extent] with (at least) 50% overlap."""
    return np.linspace(side / 2, extent - side / 2, int(np.ceil((extent - side) / (side / 2))) + 1)


def search_windows(height: int, width: int, levels: int,
                   min_side: float) -> list[tuple[tuple[float, float], float]]:
    """Square windows (centre, side) covering the frame with 50% overlap, of side = shorter frame
    side / 2**level for level 1..levels, none smaller than `min_side`; coarse first and, within a
    level, nearest the frame centre first (where the subject usually is)."""
    windows: list[tuple[tuple[float, float], float]] = []
    for level in range(1, levels + 1):
        side = min(height, width) / 2**level
        if side < min_side:
            break
        level_windows = [((float(x), float(y)), side)
                         for y in _window_centres(height, side) for x in _window_centres(width, side)]
        level_windows.sort(key=lambda w: (w[0][0] - width / 2) ** 2 + (w[0][1] - height / 2) ** 2)
        windows.extend(level_windows)
    return windows


class MediaPipeDetector:
    """LandmarkDetector giving the 478 MediaPipe mesh points (scheme 'mediapipe478'); confidence
    is 1 for all points (the Face Landmarker reports no per-point scores)."""

    name = "mediapipe"
    scheme = SCHEME_MEDIAPIPE

    def __init__(self, options: MediaPipeOptions = MediaPipeOptions()) -> None:
        self.options = options
        self.model_path = resolve_model_path(options)
        with native_stderr_to_log():
            self._landmarker = _create_landmarker(self.model_path, options.min_confidence)
            # The graph's worker threads log their own start-up lines on the first inference.
            self._landmarker.detect(mp.Image(image_format=mp.ImageFormat.SRGB,
                                             data=np.zeros((options.crop_size, options.crop_size, 3), np.uint8)))
        # Free the native graph when garbage collected. Not at exit: by then mediapipe's worker
        # thread is gone, so callers that care about a quiet exit use close() or `with`.
        self._finalizer = weakref.finalize(self, self._landmarker.close)
        self._finalizer.atexit = False

    def __enter__(self) -> MediaPipeDetector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def settings(self) -> dict[str, Any]:
        return {**asdict(self.options), "model_path": str(self.model_path.resolve())}

    def close(self) -> None:
        """Release the landmarker's native resources; the detector is unusable afterwards."""
        self._finalizer()

    def _landmarks_in_crop(self, crop: Crop) -> Landmarks | None:
        result = self._landmarker.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=crop.image))
        if not result.face_landmarks:
            return None
        size = crop.image.shape[0]
        # Normalised coordinates are fractions of the image extent, i.e. pixel-centre convention.
        crop_points = np.array([(p.x * size, p.y * size) for p in result.face_landmarks[0]])
        points = crop.points_to_frame(crop_points)
        return Landmarks(points=points, confidence=np.ones(len(points), np.float32), scheme=self.scheme)

    def _detect_in_box(self, rgb: np.ndarray, box: FaceBox) -> Landmarks | None:
        return self._landmarks_in_crop(
            crop_around_box(rgb, box, self.options.crop_expand, self.options.crop_size))

    def _search(self, rgb: np.ndarray) -> Landmarks | None:
        height, width = rgb.shape[:2]
        windows = [((width / 2, height / 2), float(max(height, width))),  # the whole frame first
                   *search_windows(height, width, self.options.search_levels,
                                   self.options.min_search_window)]
        for center, side in windows:
            found = self._landmarks_in_crop(square_crop(rgb, center, side, self.options.crop_size))
            if found is not None:
                return found
        return None

    def detect(self, rgb: np.ndarray, box_hint: FaceBox | None = None) -> Landmarks | None:
        if box_hint is not None:
            return self._detect_in_box(rgb, box_hint)
        found = self._search(rgb)
        # A search hit may come from a window where the face was small: redo it on a face crop.
        return None if found is None else self._detect_in_box(rgb, found.bounding_box()) or found
