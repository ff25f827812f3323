"""Run DenseMarks on video frames: square head crops -> uvw maps, with a per-video prediction cache.

Pixel convention: integer coordinates are pixel centres (OpenCV's). A crop of side S taken from the frame square
[x0, x0+size) x [y0, y0+size) maps frame point p to crop point  s * (p + 1/2 - (x0, y0)) - 1/2,  s = S / size.
`UvwPrediction.frame_to_crop` is that 2x3 affine: callers project mesh vertices to the frame, map them into the crop
and sample the uvw map there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from tracker.densemarks.model import DenseMarksConfig, DenseMarksNet
from tracker.densemarks.weights import LICENSE, file_sha256, load_densemarks, resolve_weights_path
from tracker.errors import TrackerError


@dataclass(frozen=True)
class CropBox:
    """Square region of a frame in frame pixels: top-left corner (x0, y0) and side `size`."""

    x0: float
    y0: float
    size: float

    def rounded(self) -> CropBox:
        """The same box snapped to whole pixels (crops are cut on the pixel grid, then resized)."""
        return CropBox(float(round(self.x0)), float(round(self.y0)), float(max(1, round(self.size))))


@dataclass(frozen=True)
class UvwPrediction:
    """uvw: (3,S,S) float32 canonical cube coordinates in (0,1); frame_to_crop: (2,3) float64 affine."""

    uvw: np.ndarray
    frame_to_crop: np.ndarray


def frame_to_crop_affine(box: CropBox, crop_size: int) -> np.ndarray:
    """(2,3) affine taking frame pixel coordinates to crop pixel coordinates (pixel-centre convention)."""
    scale = crop_size / box.size
    return np.array([[scale, 0.0, scale * (0.5 - box.x0) - 0.5],
                     [0.0, scale, scale * (0.5 - box.y0) - 0.5]])


def invert_affine(affine: np.ndarray) -> np.ndarray:
    """Inverse of a (2,3) affine, as (2,3)."""
    linear_inverse = np.linalg.inv(affine[:, :2])
    return np.concatenate([linear_inverse, -linear_inverse @ affine[:, 2:]], axis=1)


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map points (N,2) through a (2,3) affine -> (N,2)."""
    return points @ affine[:, :2].T + affine[:, 2]


def crop_square(frame: np.ndarray, box: CropBox, crop_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut `box` (snapped to whole pixels; black outside the frame) and resize it to crop_size^2.

    frame: (H,W,3) uint8. Returns the crop (S,S,3) uint8 and its exact (2,3) frame->crop affine. Area averaging
    when shrinking avoids aliasing; bilinear when enlarging.
    """
    box = box.rounded()
    x0, y0, size = int(box.x0), int(box.y0), int(box.size)
    height, width = frame.shape[:2]
    square = np.zeros((size, size, frame.shape[2]), dtype=frame.dtype)
    left, top = max(x0, 0), max(y0, 0)
    right, bottom = min(x0 + size, width), min(y0 + size, height)
    if right > left and bottom > top:
        square[top - y0 : bottom - y0, left - x0 : right - x0] = frame[top:bottom, left:right]
    interpolation = cv2.INTER_AREA if size > crop_size else cv2.INTER_LINEAR
    crop = cv2.resize(square, (crop_size, crop_size), interpolation=interpolation)
    return crop, frame_to_crop_affine(box, crop_size)


class DenseMarksPredictor:
    """A DenseMarks net on a device, applied to square crops of RGB frames."""

    def __init__(self, net: DenseMarksNet, model_id: str, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.model_id = model_id  # identifies the weights (sha256 of the file) for caches

    @classmethod
    def from_weights(cls, weights: str | Path | None = None, device: torch.device | str = "cpu",
                     config: DenseMarksConfig | None = None) -> DenseMarksPredictor:
        """Load official weights (`weights` path, else the Hugging Face cache/hub; see `resolve_weights_path`)."""
        path = resolve_weights_path(weights)
        return cls(load_densemarks(path, config, device), model_id=file_sha256(path), device=device)

    @property
    def crop_size(self) -> int:
        return self.net.config.image_size

    @torch.no_grad()
    def predict(self, frame: np.ndarray, box: CropBox) -> UvwPrediction:
        """uvw map of the crop `box` of an RGB uint8 frame (H,W,3)."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise TrackerError(f"DenseMarks expects an RGB uint8 frame (H,W,3), got {frame.dtype} {frame.shape}")
        crop, affine = crop_square(frame, box, self.crop_size)
        images = torch.from_numpy(crop).to(self.device).permute(2, 0, 1)[None]
        uvw = self.net(images)[0].float().cpu().numpy()
        return UvwPrediction(uvw=uvw, frame_to_crop=affine)


class UvwCache:
    """Per-video store of uvw predictions, keyed by frame index, valid for one model and crop size.

    Layout: `directory/meta.json` ({model_id, crop_size, license}) and `directory/frame_XXXXXX.npz` (uvw float16,
    frame_to_crop). Opening it with another model id or crop size deletes the stored frames. Each entry keeps the
    affine of the crop it was computed on, so an entry stays usable when later crop boxes differ.
    """

    META = "meta.json"

    def __init__(self, directory: str | Path, model_id: str, crop_size: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = {"model_id": model_id, "crop_size": crop_size, "license": LICENSE}
        meta_path = self.directory / self.META
        if not meta_path.is_file() or self._read_meta(meta_path) != meta:
            for stale in self.directory.glob("frame_*.npz"):
                stale.unlink()
            meta_path.write_text(json.dumps(meta, indent=1))

    @staticmethod
    def _read_meta(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # unreadable: treated as another model's cache

    def _path(self, frame_index: int) -> Path:
        return self.directory / f"frame_{frame_index:06d}.npz"

    def __contains__(self, frame_index: int) -> bool:
        return self._path(frame_index).is_file()

    def get(self, frame_index: int) -> UvwPrediction | None:
        """The stored prediction (uvw as float32), or None when the frame was not computed yet."""
        path = self._path(frame_index)
        if not path.is_file():
            return None
        with np.load(path) as stored:
            return UvwPrediction(uvw=stored["uvw"].astype(np.float32), frame_to_crop=stored["frame_to_crop"])

    def put(self, frame_index: int, prediction: UvwPrediction) -> None:
        # Write-then-rename so an interrupted run never leaves a truncated entry behind.
        partial = self.directory / f"partial_{frame_index:06d}.npz"
        np.savez(partial, uvw=prediction.uvw.astype(np.float16), frame_to_crop=prediction.frame_to_crop)
        partial.replace(self._path(frame_index))


def cached_predict(predictor: DenseMarksPredictor, cache: UvwCache, frame_index: int,
                   frame: np.ndarray, box: CropBox) -> UvwPrediction:
    """The cached prediction of `frame_index` if there is one, else predict, store and return it.

    Either way uvw carries the cache's float16 precision, so a re-run sees exactly the values of the first run.
    """
    stored = cache.get(frame_index)
    if stored is not None:
        return stored
    prediction = predictor.predict(frame, box)
    cache.put(frame_index, prediction)
    as_stored = prediction.uvw.astype(np.float16).astype(np.float32)
    return UvwPrediction(uvw=as_stored, frame_to_crop=prediction.frame_to_crop)
