"""Writing results: flame_params.npz (the documented keys), summary.json, per-frame meshes.

The npz is rewritten with whatever has been finished (partial runs carry `complete = False` in metadata), so
an interrupted or crashed run keeps its finished frames.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tracker.camera import Camera, rotation_to_camera
from tracker.flame.model import FlameParams
from tracker.result import PARAM_KEYS, read_npz

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


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def flame_arrays(table: FrameTable, camera: Camera, fps: float) -> dict[str, np.ndarray]:
    """The npz arrays (see README, 'Outputs')."""
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
    if table.stage_energy:
        arrays["stage_names"] = np.array(list(table.stage_energy), dtype=str)
        arrays["stage_energy"] = np.stack(list(table.stage_energy.values())).astype(np.float32)
    return arrays


def write_params(path: Path, table: FrameTable, camera: Camera, fps: float, metadata: dict) -> None:
    """Atomically write flame_params.npz; metadata goes in as a JSON string under `metadata`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = flame_arrays(table, camera, fps)
    arrays["metadata"] = np.array(json.dumps(metadata, default=str))
    tmp = path.with_name(path.stem + ".partial.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def read_params(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Load an exported npz: arrays and the metadata dict."""
    return read_npz(path)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def write_obj(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Wavefront OBJ of one mesh (vertices (V, 3), faces (F, 3) zero-based)."""
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    path.write_text("\n".join(lines) + "\n")
