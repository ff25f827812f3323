"""Writing results: flame_params.npz (the documented keys), summary.json, per-frame meshes.

The npz is rewritten with whatever has been finished (partial runs carry `complete = False` in metadata), so
an interrupted or crashed run keeps its finished frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tracker.camera import Camera, rotation_to_camera
from tracker.errors import TrackerError
from tracker.flame.model import FlameParams
from tracker.io.files import atomic_write, strict_json
from tracker.io.invariants import enforce_frame_invariants
from tracker.result import PARAM_KEYS, read_npz

FRAME_PARAM_KEYS = tuple(key for key in PARAM_KEYS if key != "shape")
CAMERA_KEYS = ("K", "R", "t", "image_size", "fps")
FRAME_KEYS = ("frame_index", "timestamp", "valid", "lmk_error_px")


@dataclass
class FrameTable:
    """Per-frame results of a run, T frames in tracking order."""

    params: FlameParams
    frame_index: np.ndarray
    """(T,) index of each frame in the video."""
    timestamp: np.ndarray
    """(T,) presentation time, seconds."""
    valid: np.ndarray
    """(T,) bool."""
    lmk_error_px: np.ndarray
    """(T,) mean landmark reprojection error, pixels (NaN where invalid)."""
    stage_energy: dict[str, np.ndarray] | None = None
    """{stage: (T,) landmark + prior energy of each frame after that stage} (NaN where invalid), for report.png."""
    invalid_reason: np.ndarray | None = None
    """(T,) why each invalid frame is invalid (None: no face found); see tracker/io/invariants.py."""
    bridged: np.ndarray | None = None
    """(T,) bool: fitted without landmarks, from optical flow across a detector gap (tracker/fit/bridge.py)."""


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def flame_arrays(table: FrameTable, camera: Camera, fps: float) -> dict[str, np.ndarray]:
    """The npz arrays (see README, 'Outputs'), with the invariants of tracker/io/invariants.py enforced."""
    T = len(table.frame_index)
    p = table.params
    K = _np(camera.opencv_intrinsics())
    R = _np(rotation_to_camera())
    arrays = {name: _np(getattr(p, name)) for name in PARAM_KEYS}
    arrays["shape"] = arrays["shape"].reshape(-1)
    arrays.update(
        K=np.repeat(K[None], T, 0), R=np.repeat(R[None], T, 0), t=np.zeros((T, 3), np.float32),
        image_size=np.array([camera.height, camera.width], np.int32), fps=np.float32(fps),
        frame_index=table.frame_index.astype(np.int64), timestamp=table.timestamp.astype(np.float64),
        valid=table.valid.astype(bool), lmk_error_px=table.lmk_error_px.astype(np.float32),
    )
    arrays["bridged"] = np.zeros(T, bool) if table.bridged is None else table.bridged.astype(bool)
    if table.stage_energy:
        arrays["stage_names"] = np.array(list(table.stage_energy), dtype=str)
        arrays["stage_energy"] = np.stack(list(table.stage_energy.values())).astype(np.float32)
    return enforce_frame_invariants(arrays, table.invalid_reason)


def write_params(path: Path, table: FrameTable, camera: Camera, fps: float, metadata: dict) -> dict[str, np.ndarray]:
    """Atomically write flame_params.npz (metadata as a strict JSON string under `metadata`); returns the
    arrays as written (invariants enforced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = flame_arrays(table, camera, fps)
    atomic_write(path, lambda fh: np.savez(fh, **arrays, metadata=np.array(strict_json(metadata))))
    return arrays


def read_params(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Load an exported npz: arrays and the metadata dict."""
    return read_npz(path)


def write_obj(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Wavefront OBJ of one mesh (vertices (V, 3), faces (F, 3) zero-based)."""
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    text = ("\n".join(lines) + "\n").encode()
    atomic_write(path, lambda fh: fh.write(text))


def _fit_width(values: np.ndarray, width: int) -> np.ndarray:
    """Zero-pad or cut the last axis to `width` (a model with a different basis size reads the same file)."""
    if values.shape[-1] >= width:
        return values[..., :width]
    return np.concatenate([values, np.zeros((*values.shape[:-1], width - values.shape[-1]), values.dtype)], -1)


def params_from_arrays(arrays: dict[str, np.ndarray], n_shape: int, n_expr: int) -> FlameParams:
    """FlameParams of all frames in an exported npz, coefficient vectors fitted to the model's sizes."""
    missing = [k for k in ("shape", *FRAME_PARAM_KEYS) if k not in arrays]
    if missing:
        raise TrackerError(f"parameter file lacks {', '.join(missing)}: not a tracker export")
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    values = {k: to(arrays[k]) for k in FRAME_PARAM_KEYS if k not in ("expr",)}
    return FlameParams(shape=to(_fit_width(arrays["shape"].reshape(1, -1), n_shape)),
                       expr=to(_fit_width(arrays["expr"], n_expr)), **values)


def camera_from_arrays(arrays: dict[str, np.ndarray], frame: int = 0) -> Camera:
    """The tracker's Camera from exported K (OpenCV: pixel centres at integers) and image_size."""
    K = arrays["K"][frame].astype(np.float64)
    height, width = (int(v) for v in arrays["image_size"])
    return Camera(torch.tensor(float(K[0, 0])), torch.tensor([K[0, 2] + 0.5, K[1, 2] + 0.5], dtype=torch.float32),
                  height, width)
