"""dlib 68-point landmarks (iBUG order): HOG frontal face detector + the ERT shape predictor.

Weights come from the face_recognition_models package. The HOG detector finds faces of about
80 px and up, so tracked frames are cropped around the face box at a fixed size, and full frames
larger than `search_max_side` are downscaled for the search (HOG upsampling covers small faces).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import dlib
import numpy as np

from tracker.detect.base import SCHEME_IBUG68, FaceBox, Landmarks
from tracker.detect.boxes import Crop, apply_affine, crop_around_box
from tracker.errors import MissingAssetError


@dataclass(frozen=True)
class DlibOptions:
    """predictor_path: shape_predictor_68_face_landmarks.dat; None = face_recognition_models' copy.
    search_upsample: HOG pyramid upsamplings for full-frame search (each finds 2x smaller faces).
    search_max_side: full frames are downscaled to this longer side before the HOG search.
    crop_expand, crop_size: square crop around the tracked box (side = crop_expand x box side)
    and its size in pixels; the face then spans about crop_size / crop_expand pixels."""

    predictor_path: str | None = None
    search_upsample: int = 1
    search_max_side: int = 640
    crop_expand: float = 2.0
    crop_size: int = 256


def default_predictor_path() -> Path:
    """The 68-point predictor shipped by the face_recognition_models package."""
    try:
        with warnings.catch_warnings():  # it imports pkg_resources, which warns it is deprecated
            warnings.simplefilter("ignore")
            import face_recognition_models
    except ImportError:
        raise MissingAssetError("dlib landmarks need the face_recognition_models package: "
                                "pip install face_recognition_models 'setuptools<81'") from None
    return Path(face_recognition_models.pose_predictor_model_location())


def box_from_dlib_rect(rect: dlib.rectangle, score: float = 1.0) -> FaceBox:
    """dlib rectangles hold inclusive pixel indices; the box spans the pixels' outer edges."""
    return FaceBox(rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1, score)


def dlib_rect_from_box(box: FaceBox) -> dlib.rectangle:
    return dlib.rectangle(round(box.x0), round(box.y0), round(box.x1) - 1, round(box.y1) - 1)


def map_box(box: FaceBox, affine: np.ndarray) -> FaceBox:
    """Axis-aligned box through a scale + translation affine map (2, 3)."""
    (x0, y0), (x1, y1) = apply_affine(np.array([[box.x0, box.y0], [box.x1, box.y1]]), affine)
    return FaceBox(float(x0), float(y0), float(x1), float(y1), box.score)


def hog_faces(hog: dlib.fhog_object_detector, rgb: np.ndarray, upsample: int) -> list[FaceBox]:
    """HOG face boxes in `rgb` pixels, best score first."""
    rects, scores, _ = hog.run(np.ascontiguousarray(rgb), upsample, 0.0)
    boxes = [box_from_dlib_rect(rect, score) for rect, score in zip(rects, scores, strict=True)]
    return sorted(boxes, key=lambda box: -box.score)


def hog_search(hog: dlib.fhog_object_detector, rgb: np.ndarray, max_side: int,
               upsample: int) -> FaceBox | None:
    """Best HOG face box in the whole frame (frame pixels), searched on a copy downscaled to
    `max_side`: HOG cost grows with pixels, and faces in big frames are big enough to survive it."""
    scale = min(1.0, max_side / max(rgb.shape[:2]))
    small = rgb if scale == 1.0 else cv2.resize(rgb, None, fx=scale, fy=scale,
                                                interpolation=cv2.INTER_AREA)
    faces = hog_faces(hog, small, upsample)
    if not faces:
        return None
    return map_box(faces[0], np.array([[1 / scale, 0.0, 0.0], [0.0, 1 / scale, 0.0]]))


class DlibDetector:
    """LandmarkDetector giving the 68 iBUG points (scheme 'ibug68'); confidence is 1 for all points
    (the shape predictor has no per-point score)."""

    name = "dlib"
    scheme = SCHEME_IBUG68

    def __init__(self, options: DlibOptions = DlibOptions()) -> None:
        self.options = options
        self.predictor_path = Path(options.predictor_path or default_predictor_path())
        if not self.predictor_path.is_file():
            raise MissingAssetError(f"dlib shape predictor not found: {self.predictor_path}")
        try:
            self._predictor = dlib.shape_predictor(str(self.predictor_path))
        except RuntimeError as error:
            raise MissingAssetError(f"cannot load dlib shape predictor {self.predictor_path} "
                                    f"({error}); is it a 68-point .dat model?") from None
        self._hog = dlib.get_frontal_face_detector()

    def settings(self) -> dict[str, Any]:
        return {**asdict(self.options), "predictor_path": str(self.predictor_path.resolve())}

    def _landmarks(self, crop: Crop, face_in_crop: FaceBox) -> Landmarks:
        shape = self._predictor(crop.image, dlib_rect_from_box(face_in_crop))
        # Part coordinates are pixel indices: +0.5 moves them to the pixel-centre convention.
        crop_points = np.array([(part.x + 0.5, part.y + 0.5) for part in shape.parts()])
        points = crop.points_to_frame(crop_points)
        return Landmarks(points=points, confidence=np.ones(len(points), np.float32), scheme=self.scheme)

    def detect(self, rgb: np.ndarray, box_hint: FaceBox | None = None) -> Landmarks | None:
        if box_hint is None:
            found = hog_search(self._hog, rgb, self.options.search_max_side, self.options.search_upsample)
            if found is None:
                return None
            # Predict on a crop around the HOG box: same face scale as in tracked frames.
            crop = crop_around_box(rgb, found, self.options.crop_expand, self.options.crop_size)
            frame_to_crop = cv2.invertAffineTransform(crop.crop_to_frame)
            return self._landmarks(crop, map_box(found, frame_to_crop))
        crop = crop_around_box(rgb, box_hint, self.options.crop_expand, self.options.crop_size)
        faces = hog_faces(self._hog, crop.image, upsample=0)
        return self._landmarks(crop, faces[0]) if faces else None
