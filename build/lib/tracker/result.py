"""A tracking result in memory: what `tracker.track` returns and `tracker.load` reads back from disk.

Reading needs numpy only; torch and the FLAME model are loaded on the first `vertices(i)` call.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tracker.errors import MissingAssetError, TrackerError

if TYPE_CHECKING:
    from tracker.flame.model import FlameModel, FlameParams

PARAMS_FILE = "flame_params.npz"
PARAM_KEYS = ("shape", "expr", "jaw_pose", "neck_pose", "rotation", "translation", "eyes_pose", "eyelids")
"""FLAME parameter arrays of flame_params.npz (shape (n_shape,), the others (T, k))."""


def read_npz(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays of a flame_params.npz and its metadata dict (never unpickles)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "metadata"}
            metadata = json.loads(str(z["metadata"])) if "metadata" in z.files else {}
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise TrackerError(f"{path} is not a readable flame_params.npz ({exc})") from None
    missing = [k for k in (*PARAM_KEYS, "K", "R", "t", "valid", "frame_index") if k not in arrays]
    if missing:
        raise TrackerError(f"{path} is not a tracker result: missing {', '.join(missing)}")
    return arrays, metadata


def params_path(path: str | Path) -> Path:
    """The flame_params.npz of a run folder (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / PARAMS_FILE
    if not path.is_file():
        raise TrackerError(f"no tracking result at {path} (expected a run folder with {PARAMS_FILE})")
    return path


def load_run_model(metadata: dict, flame: str | os.PathLike | None = None,
                   assets: str | os.PathLike | None = None) -> "FlameModel":
    """The FLAME model that produced a run, from its metadata (or `flame`/`assets` when the files moved),
    checked against the recorded sha256 so vertices are never computed with another model."""
    from tracker.flame.assets import find_assets_dir, load_eyelids
    from tracker.flame.loading import load_flame_file
    from tracker.flame.model import FlameModel

    path = Path(flame or metadata.get("flame_file", ""))
    if not path.is_file():
        raise MissingAssetError(f"the FLAME model of this run ({path}) is not there: pass its path (--flame)")
    data = load_flame_file(path, int(metadata["n_shape"]), int(metadata["n_expr"]))
    if metadata.get("flame_sha256") and data.sha256 != metadata["flame_sha256"]:
        raise TrackerError(f"{path} is not the model that produced this run (sha256 {data.sha256[:12]}..., "
                           f"the run's is {metadata['flame_sha256'][:12]}...)")
    eyelids = None
    if metadata.get("eyelid_blendshapes"):
        folder = Path(assets or metadata.get("flame_assets_dir") or
                      find_assets_dir(metadata.get("config", {}).get("flame", {}).get("assets_dir"), path))
        eyelids = load_eyelids(folder)
        if eyelids is None:
            raise MissingAssetError(f"this run used eyelid blendshapes, but l_eyelid.npy / r_eyelid.npy are not in "
                                    f"{folder}: pass the FLAME assets folder (--flame-assets)")
    return FlameModel(data, eyelids)


@dataclass
class TrackingResult:
    """Per-frame FLAME parameters and cameras of one tracked video (T frames).

    `result["expr"]` (or `result.params["expr"]`) gives the arrays under the export's key names; `K`, `R`, `t`,
    `valid`, `frame_index` are attributes. World vertices = FLAME(params) + translation; a world point X is at
    pixel K (R X + t) / depth (OpenCV: x right, y down, pixel centres at integers).
    """

    path: Path
    """The flame_params.npz."""
    arrays: dict[str, np.ndarray]
    """Every array of the npz (README, 'Outputs')."""
    metadata: dict
    """Model, config, versions and stage status of the run."""
    summary: dict | None = None
    """summary.json of the run when present."""
    _model: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.arrays["frame_index"])

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    @property
    def params(self) -> dict[str, np.ndarray]:
        """The FLAME parameter arrays: shape (n_shape,), expr (T, n_expr), rotation, translation, jaw_pose,
        neck_pose (T, 3), eyes_pose (T, 6), eyelids (T, 2)."""
        return {k: self.arrays[k] for k in PARAM_KEYS}

    @property
    def K(self) -> np.ndarray:
        """(T, 3, 3) intrinsics, OpenCV convention."""
        return self.arrays["K"]

    @property
    def R(self) -> np.ndarray:
        """(T, 3, 3) world-to-camera rotations."""
        return self.arrays["R"]

    @property
    def t(self) -> np.ndarray:
        """(T, 3) world-to-camera translations."""
        return self.arrays["t"]

    @property
    def valid(self) -> np.ndarray:
        """(T,) a face was found and fitted."""
        return self.arrays["valid"]

    @property
    def frame_index(self) -> np.ndarray:
        """(T,) index of each row's frame in the video."""
        return self.arrays["frame_index"]

    def model(self, flame: str | os.PathLike | None = None, assets: str | os.PathLike | None = None) -> "FlameModel":
        """The FLAME model of the run (loaded once; `flame`/`assets` when its files moved)."""
        if self._model is None or flame or assets:
            self._model = load_run_model(self.metadata, flame, assets)
        return self._model

    def flame_params(self, index: int | slice | np.ndarray) -> "FlameParams":
        """The parameters of the selected rows as torch tensors (FlameParams)."""
        import torch

        from tracker.flame.model import FlameParams

        rows = np.atleast_1d(np.arange(len(self))[index])
        tensor = lambda a: torch.as_tensor(np.asarray(a, np.float32))  # noqa: E731
        frames = {k: tensor(self.arrays[k][rows]) for k in PARAM_KEYS if k != "shape"}
        return FlameParams(shape=tensor(self.arrays["shape"])[None], **frames)

    def vertices(self, i: int) -> np.ndarray:
        """(V, 3) world vertices of row i, metres."""
        import torch

        with torch.no_grad():
            return self.model()(self.flame_params(i)).vertices[0].numpy()

    def project(self, points: np.ndarray, i: int) -> np.ndarray:
        """Pixels (N, 2) of world points (N, 3) seen by row i's camera (OpenCV convention)."""
        cam = points @ self.R[i].T + self.t[i]
        pix = cam @ self.K[i].T
        return pix[:, :2] / pix[:, 2:3]


def load(path: str | os.PathLike) -> TrackingResult:
    """Read a run folder (or its flame_params.npz) into a TrackingResult."""
    npz = params_path(path)
    arrays, metadata = read_npz(npz)
    summary_file = npz.parent / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    return TrackingResult(npz, arrays, metadata, summary)
