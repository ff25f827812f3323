"""Face boxes over time and square detector crops.

The tracked box is the (squared) bounding box of the previous frame's landmarks, smoothed with an
exponential filter so that crops don't jitter; detectors crop around it, which keeps small faces
(wide shots) large in the detector's input. When the face is lost the box is dropped and the next
frame is searched in full.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from tracker.detect.base import FaceBox, Landmarks


@dataclass(frozen=True)
class Crop:
    """A square image cut from a frame, with the affine map from crop pixels back to frame pixels.

    image: (S, S, C), dtype of the frame (uint8 RGB for the detectors).
    crop_to_frame: (2, 3) float64, frame_xy = crop_to_frame[:, :2] @ crop_xy + crop_to_frame[:, 2]
        (both in the pixel-centre convention of tracker.detect.base).
    """

    image: np.ndarray
    crop_to_frame: np.ndarray

    def points_to_frame(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) crop pixel coordinates -> (N, 2) float32 frame pixel coordinates."""
        return apply_affine(points, self.crop_to_frame).astype(np.float32)


def apply_affine(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine map to (N, 2) points."""
    return points @ affine[:, :2].T + affine[:, 2]


def square_crop(rgb: np.ndarray, center: tuple[float, float], side: float, out_size: int) -> Crop:
    """Cut the square of `side` frame pixels centred at `center`, resampled to out_size x out_size.

    Parts of the square outside the frame are black. Bilinear resampling both ways: detectors
    resize their input again internally, so a better downscaling filter buys nothing measurable.
    """
    scale = out_size / side
    x0, y0 = center[0] - 0.5 * side, center[1] - 0.5 * side
    # OpenCV indexes pixel centres at integers: shift by half a pixel on both sides of the map.
    frame_to_crop_cv = np.array([[scale, 0.0, -scale * x0 + 0.5 * scale - 0.5],
                                 [0.0, scale, -scale * y0 + 0.5 * scale - 0.5]])
    image = cv2.warpAffine(rgb, frame_to_crop_cv, (out_size, out_size), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    crop_to_frame = np.array([[1.0 / scale, 0.0, x0], [0.0, 1.0 / scale, y0]])
    return Crop(image=image, crop_to_frame=crop_to_frame)


def crop_around_box(rgb: np.ndarray, box: FaceBox, expand: float, out_size: int) -> Crop:
    """Square crop centred on `box` with side `expand` times the box's larger side."""
    return square_crop(rgb, box.center, expand * box.size, out_size)


def square_box(center: tuple[float, float], side: float, score: float = 1.0) -> FaceBox:
    """Square box of side `side` centred at `center`."""
    cx, cy = center
    return FaceBox(cx - 0.5 * side, cy - 0.5 * side, cx + 0.5 * side, cy + 0.5 * side, score)


@dataclass(frozen=True)
class BoxTrackerOptions:
    """smoothing: weight of the newest measurement in the exponential filter (1 = no smoothing).
    snap_distance: a new box whose centre is further than this many box sizes from the filtered one
    replaces it outright (a re-detection, not motion)."""

    smoothing: float = 0.6
    snap_distance: float = 0.5


class FaceBoxTracker:
    """Square face box following the landmarks frame to frame; None while no face is tracked."""

    def __init__(self, options: BoxTrackerOptions = BoxTrackerOptions()) -> None:
        self.options = options
        self.box: FaceBox | None = None

    def update(self, landmarks: Landmarks | None) -> FaceBox | None:
        """Fold in this frame's landmarks (None = face lost) and return the box for the next frame."""
        if landmarks is None:
            self.box = None
            return None
        measured = landmarks.bounding_box()
        center, side = np.array(measured.center), measured.size
        if self.box is not None:
            previous_center, previous_side = np.array(self.box.center), self.box.size
            jumped = np.linalg.norm(center - previous_center) > self.options.snap_distance * previous_side
            if not jumped:
                weight = self.options.smoothing
                center = weight * center + (1.0 - weight) * previous_center
                side = weight * side + (1.0 - weight) * previous_side
        self.box = square_box((float(center[0]), float(center[1])), float(side), measured.score)
        return self.box
