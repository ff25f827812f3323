"""Finding the user's FLAME file and the side assets (embeddings, masks, eyelids) and building the model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tracker.errors import MissingAssetError, TrackerError
from tracker.flame.landmarks import LandmarkSet, load_landmark_set
from tracker.flame.loading import FLAME_DOWNLOAD_HINT, load_flame_file, read_pickle
from tracker.flame.model import FlameModel
from tracker.resources import shipped_assets_dir

REPO_ASSETS = shipped_assets_dir()
MODEL_NAMES = ("flame2023_Open.pkl", "flame2023.pkl", "FLAME2023.pkl", "generic_model.pkl", "FLAME_NEUTRAL.pkl")
MASKS_FILE = "FLAME_masks.pkl"
EYELID_FILES = ("l_eyelid.npy", "r_eyelid.npy")


def find_flame_file(explicit: str | os.PathLike | None) -> Path:
    """FLAME model path from --flame, then $FLAME_MODEL, then flame_assets/."""
    for candidate in (explicit, os.environ.get("FLAME_MODEL")):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_file():
                raise MissingAssetError(f"FLAME model not found at {path}: {FLAME_DOWNLOAD_HINT}")
            return path
    for name in MODEL_NAMES:
        if (REPO_ASSETS / name).is_file():
            return REPO_ASSETS / name
    raise MissingAssetError(f"no FLAME model given: {FLAME_DOWNLOAD_HINT}")


def find_assets_dir(explicit: str | os.PathLike | None, flame_file: Path) -> Path:
    """Directory of the embedding/mask files: --flame-assets, $TRACKER_FLAME_ASSETS, the model's folder,
    then flame_assets/ (the first that holds the 68-point embedding)."""
    for candidate in (explicit, os.environ.get("TRACKER_FLAME_ASSETS")):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_dir():
                raise MissingAssetError(f"FLAME assets folder {path} does not exist")
            return path
    for folder in (flame_file.parent, REPO_ASSETS):
        if (folder / "flame_static_embedding_68.pkl").is_file():
            return folder
    return flame_file.parent


def load_region_masks(assets_dir: Path) -> dict[str, np.ndarray]:
    """FLAME vertex index arrays per region (face, forehead, nose, ears, neck, ...)."""
    path = assets_dir / MASKS_FILE
    if not path.is_file():
        raise MissingAssetError(f"{MASKS_FILE} not found in {assets_dir}: needed for region masks")
    return {k: np.asarray(v, dtype=np.int64) for k, v in read_pickle(path).items()}


def load_eyelids(assets_dir: Path) -> np.ndarray | None:
    """(V, 3, 2) eyelid-closing blendshapes (left, right) when both files are present."""
    paths = [assets_dir / n for n in EYELID_FILES]
    if not all(p.is_file() for p in paths):
        return None
    try:
        return np.stack([np.load(p) for p in paths], axis=2).astype(np.float32)
    except (ValueError, OSError) as exc:
        raise TrackerError(f"eyelid blendshapes in {assets_dir} are unreadable ({exc})") from None


@dataclass
class FlameBundle:
    """The FLAME model with everything the tracker needs from its folder."""

    model: FlameModel
    landmarks: LandmarkSet
    masks: dict[str, np.ndarray]
    flame_file: Path
    assets_dir: Path


def load_flame_bundle(flame: str | None, assets: str | None, n_shape: int, n_expr: int,
                      landmark_scheme: str, use_eyelids: bool = True) -> FlameBundle:
    flame_file = find_flame_file(flame)
    assets_dir = find_assets_dir(assets, flame_file)
    data = load_flame_file(flame_file, n_shape, n_expr)
    eyelids = load_eyelids(assets_dir) if use_eyelids else None
    if eyelids is not None and eyelids.shape[0] != data.v_template.shape[0]:
        raise TrackerError(f"eyelid blendshapes in {assets_dir} do not match the FLAME vertex count")
    model = FlameModel(data, eyelids)
    return FlameBundle(
        model=model,
        landmarks=load_landmark_set(landmark_scheme, assets_dir, data.faces),
        masks=load_region_masks(assets_dir),
        flame_file=flame_file,
        assets_dir=assets_dir,
    )
