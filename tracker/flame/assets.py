"""Finding the FLAME file and the side assets (embeddings, masks, eyelids) and building the model.

flame_assets/ ships an open default head model in FLAME's format and topology (`flame_standin.npz`, not the
official FLAME; see flame_assets/NOTICE.md) with the side files it needs, all plain arrays. A user's own
official FLAME file takes precedence over it wherever it is given or found.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tracker.errors import MissingAssetError, TrackerError, quote
from tracker.flame.contour import outline_region
from tracker.flame.landmarks import STATIC_68_FILES, LandmarkSet, find_side_file, load_landmark_set
from tracker.flame.loading import FLAME_DOWNLOAD_HINT, file_sha256, load_flame_file, read_array_dict
from tracker.flame.model import FlameModel
from tracker.io.safe_load import read_npy
from tracker.resources import shipped_assets_dir

REPO_ASSETS = shipped_assets_dir()
"""The project's flame_assets/ (in a checkout or the installed package): the shipped default model and side
files, and where users put their FLAME."""
MODEL_NAMES = ("flame2023_Open.pkl", "flame2023.pkl", "FLAME2023.pkl", "generic_model.pkl", "FLAME_NEUTRAL.pkl")
"""Official FLAME file names looked for in flame_assets/ (before the shipped default)."""
DEFAULT_MODEL = REPO_ASSETS / "flame_standin.npz"
"""The shipped open default head model (FLAME topology; not the official FLAME)."""
DEFAULT_MODEL_NOTE = (
    "note: using the shipped open default head model (flame_standin: FLAME's topology, but not the official "
    "FLAME: no pose correctives, ARKit-style expressions); for FLAME 2020 / 2023 / 2023 Open pass --flame PATH, "
    "set FLAME_MODEL, or put the .pkl in flame_assets/ (see README.md)"
)
MASKS_FILES = ("FLAME_masks.npz", "FLAME_masks.pkl")
EYELID_FILES = ("l_eyelid.npy", "r_eyelid.npy")


def find_flame_file(explicit: str | os.PathLike | None) -> Path:
    """FLAME model path from --flame, then $FLAME_MODEL, then an official FLAME file in flame_assets/, then
    the shipped default model."""
    for candidate in (explicit, os.environ.get("FLAME_MODEL")):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_file():
                raise MissingAssetError(f"FLAME model not found at {path}: {FLAME_DOWNLOAD_HINT}")
            return path
    for name in MODEL_NAMES:
        if (REPO_ASSETS / name).is_file():
            return REPO_ASSETS / name
    if DEFAULT_MODEL.is_file():
        return DEFAULT_MODEL
    raise MissingAssetError(f"no FLAME model given and the shipped default {DEFAULT_MODEL} is missing: "
                            f"{FLAME_DOWNLOAD_HINT}")


def find_assets_dir(explicit: str | os.PathLike | None, flame_file: Path) -> Path:
    """Directory of the embedding/mask files: --flame-assets, $TRACKER_FLAME_ASSETS, the model's folder,
    then flame_assets/ with the shipped side files (the first that holds the 68-point embedding)."""
    for candidate in (explicit, os.environ.get("TRACKER_FLAME_ASSETS")):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_dir():
                raise MissingAssetError(f"FLAME assets folder {path} does not exist")
            return path
    for folder in (flame_file.parent, REPO_ASSETS):
        if find_side_file(folder, STATIC_68_FILES) is not None:
            return folder
    return flame_file.parent


def load_region_masks(assets_dir: Path, n_vertices: int) -> dict[str, np.ndarray]:
    """FLAME vertex index arrays per region (face, forehead, nose, ears, neck, ...), checked against the model's
    vertex count."""
    path = find_side_file(assets_dir, MASKS_FILES)
    if path is None:
        raise MissingAssetError(f"{MASKS_FILES[-1]} not found in {assets_dir}: needed for region masks")
    masks = {}
    for name, value in read_array_dict(path, "region masks").items():
        try:
            indices = np.asarray(value, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError, OverflowError):
            raise TrackerError(f"{path}: array {quote(name, 40)} is not a list of vertex indices") from None
        if indices.size and (indices.min() < 0 or indices.max() >= n_vertices):
            raise TrackerError(f"{path}: array {quote(name, 40)} holds vertex indices outside 0..{n_vertices - 1}: "
                               "the masks do not belong to this FLAME model")
        masks[str(name)] = indices
    return masks


def load_eyelids(assets_dir: Path, n_vertices: int) -> np.ndarray | None:
    """(V, 3, 2) eyelid-closing blendshapes (left, right) when both files are present."""
    paths = [assets_dir / n for n in EYELID_FILES]
    if not all(p.is_file() for p in paths):
        return None
    arrays = []
    for path in paths:
        array = read_npy(path, "eyelid blendshape")
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf" or array.shape != (n_vertices, 3):
            shape = "x".join(map(str, getattr(array, "shape", ()))) or type(array).__name__
            raise TrackerError(f"{path}: eyelid blendshape has shape {shape}, expected {n_vertices}x3 (the FLAME "
                               "vertex count)")
        if not np.isfinite(array).all():
            raise TrackerError(f"{path}: eyelid blendshape holds non-finite values")
        arrays.append(array)
    return np.stack(arrays, axis=2).astype(np.float32)


@dataclass
class FlameBundle:
    """The FLAME model with everything the tracker needs from its folder."""

    model: FlameModel
    landmarks: LandmarkSet
    masks: dict[str, np.ndarray]
    flame_file: Path
    assets_dir: Path
    model_record: dict
    """What outputs record about the model: name, file, sha256, licence, whether it is the shipped default, the
    side-file folder and the landmark embedding's files (name -> sha256), which results depend on as much."""

    @property
    def is_default(self) -> bool:
        """True for the shipped open default model (not the official FLAME)."""
        return bool(self.model_record["shipped_default"])


def load_flame_bundle(flame: str | None, assets: str | None, n_shape: int, n_expr: int,
                      landmark_scheme: str, use_eyelids: bool = True) -> FlameBundle:
    flame_file = find_flame_file(flame)
    assets_dir = find_assets_dir(assets, flame_file)
    data = load_flame_file(flame_file, n_shape, n_expr)
    eyelids = load_eyelids(assets_dir, data.v_template.shape[0]) if use_eyelids else None
    model = FlameModel(data, eyelids)
    masks = load_region_masks(assets_dir, data.v_template.shape[0])
    landmarks = load_landmark_set(landmark_scheme, assets_dir, data.faces)
    return FlameBundle(
        model=model,
        landmarks=landmarks.with_outline(outline_region(data.v_template, data.faces, masks)),
        masks=masks,
        flame_file=flame_file,
        assets_dir=assets_dir,
        model_record={
            "name": data.name, "file": str(flame_file), "sha256": data.sha256,
            "license": data.license or "not stated in the file (see its provider's terms)",
            "shipped_default": flame_file.resolve() == DEFAULT_MODEL.resolve(),
            "assets_dir": str(assets_dir),
            "landmark_embedding": {path.name: file_sha256(path) for path in landmarks.sources},
        },
    )
