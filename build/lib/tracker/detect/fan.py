"""FAN 68-point landmarks (Bulat & Tzimiropoulos) through the optional face-alignment package.

Used only when the package is installed AND its 2D-FAN weights are already in the torch hub
checkpoint folder: this module never downloads. Face boxes come from the tracked box or, without
one, from dlib's HOG detector, so face-alignment's own (weight-hungry) detectors are not loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dlib
import numpy as np
import torch

from tracker.detect.base import SCHEME_IBUG68, FaceBox, Landmarks
from tracker.detect.dlib import hog_search
from tracker.errors import MissingAssetError

WEIGHTS_KEY = "2DFAN-4"


@dataclass(frozen=True)
class FanOptions:
    """device: torch device for the network.
    flip_input: also run the mirrored face and average (twice the time, slightly steadier).
    search_max_side, search_upsample: dlib HOG search used for frames without a box."""

    device: str = "cpu"
    flip_input: bool = False
    search_max_side: int = 640
    search_upsample: int = 1


def fan_weights_path() -> Path:
    """Where the installed face-alignment looks for its 2D-FAN checkpoint: torch hub's checkpoints
    folder ($TORCH_HOME/hub/checkpoints), file name taken from its download URL."""
    api = importlib.import_module("face_alignment.api")
    filename = Path(urlparse(api.models_urls[WEIGHTS_KEY]).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


class FanDetector:
    """LandmarkDetector giving 68 iBUG points with FAN heatmap confidences (scheme 'ibug68')."""

    name = "fan"
    scheme = SCHEME_IBUG68

    def __init__(self, options: FanOptions = FanOptions()) -> None:
        if importlib.util.find_spec("face_alignment") is None:
            raise MissingAssetError("--landmarks fan needs the optional face-alignment package "
                                    "(pip install face-alignment) and its weights; or use mediapipe/dlib")
        self.options = options
        self.weights_path = fan_weights_path()
        if not self.weights_path.is_file():
            raise MissingAssetError(f"FAN weights not found at {self.weights_path} (they are never "
                                    "downloaded here); put the 2DFAN4 checkpoint there or use mediapipe/dlib")
        import face_alignment

        fan_options: dict[str, Any] = {"device": options.device, "flip_input": options.flip_input,
                                       "face_detector": "folder"}  # boxes are ours: no detector weights
        if "compile" in inspect.signature(face_alignment.FaceAlignment).parameters:
            fan_options["compile"] = False  # torch.compile costs minutes up front for one video
        self._fan = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, **fan_options)
        self._hog = dlib.get_frontal_face_detector()

    def settings(self) -> dict[str, Any]:
        return {**asdict(self.options), "weights_path": str(self.weights_path.resolve())}

    def detect(self, rgb: np.ndarray, box_hint: FaceBox | None = None) -> Landmarks | None:
        box = box_hint or hog_search(self._hog, rgb, self.options.search_max_side,
                                     self.options.search_upsample)
        if box is None:
            return None
        points, scores, _ = self._fan.get_landmarks_from_image(
            rgb, detected_faces=[np.array([box.x0, box.y0, box.x1, box.y1])], return_landmark_score=True)
        if not points:
            return None
        # face-alignment reports (rounded) pixel indices: +0.5 moves to the pixel-centre convention.
        return Landmarks(points=(np.asarray(points[0][:, :2]) + 0.5).astype(np.float32),
                         confidence=np.clip(np.asarray(scores[0], np.float32).reshape(-1), 0.0, 1.0),
                         scheme=self.scheme)
