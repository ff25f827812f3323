"""Geometry benchmark datasets: a loader interface and the NoW folder layout.

NoW (ringnet.is.tue.mpg.de) unpacks to
    NOW_ROOT/imagepathsvalidation.txt, imagepathstest.txt     lines "SUBJECT/CHALLENGE/IMG_XXXX.jpg"
    NOW_ROOT/final_release_version/iphone_pictures/SUBJECT/CHALLENGE/IMG_XXXX.jpg
    NOW_ROOT/final_release_version/scans/SUBJECT/*.obj        one scan per subject, in mm
    NOW_ROOT/final_release_version/scans_lmks_onlypp/SUBJECT/*.pp    its 7 landmarks (MeshLab points)
(the three folders may also sit directly in NOW_ROOT). Predictions follow the image list:
    PREDICTIONS/SUBJECT/CHALLENGE/IMG_XXXX.obj (or .ply)  and  IMG_XXXX.npy (or .txt): 7 x 3 landmarks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from eval.geometry.mesh_io import load_landmarks, load_mesh, save_obj
from tracker.errors import MissingAssetError, TrackerError

NOW_IMAGE_LISTS = {"val": "imagepathsvalidation.txt", "test": "imagepathstest.txt"}
NOW_CHALLENGES = ("multiview_neutral", "multiview_expressions", "multiview_occlusions", "selfie")


@dataclass(frozen=True)
class GeometrySample:
    """One reconstruction task: images of a person and the ground-truth scan to compare against.

    sample_id: identifier, also the relative path (without suffix) of the prediction files.
    image_paths: input images (one for NoW). scan_path: ground-truth mesh.
    scan_landmarks: (7, 3) landmark points on the scan, in the scan's frame and units.
    """

    sample_id: str
    image_paths: tuple[Path, ...]
    scan_path: Path
    scan_landmarks: np.ndarray


class GeometryDataset(Protocol):
    """Anything that yields GeometrySample items and knows how many."""

    def __iter__(self) -> Iterator[GeometrySample]: ...

    def __len__(self) -> int: ...


def _find_dir(root: Path, name: str) -> Path:
    for candidate in (root / "final_release_version" / name, root / name):
        if candidate.is_dir():
            return candidate
    raise MissingAssetError(f"NoW folder '{name}' not found under {root} or {root / 'final_release_version'}")


def _single_file(folder: Path, pattern: str) -> Path:
    matches = sorted(folder.glob(pattern))
    if not matches:
        raise MissingAssetError(f"no {pattern} file in {folder}")
    return matches[0]


class NowDataset:
    """NoW images with their subject's scan and scan landmarks.

    Args:
        root: the NoW dataset folder. split: "val" or "test" (which image list to read).
        challenge: keep one of NOW_CHALLENGES only; all when None.
    """

    def __init__(self, root: str | Path, split: str = "val", challenge: str | None = None) -> None:
        self.root = Path(root)
        if split not in NOW_IMAGE_LISTS:
            raise TrackerError(f"unknown NoW split '{split}' (use val or test)")
        if challenge is not None and challenge not in NOW_CHALLENGES:
            raise TrackerError(f"unknown NoW challenge '{challenge}' (use one of {', '.join(NOW_CHALLENGES)})")
        image_list = self.root / NOW_IMAGE_LISTS[split]
        if not image_list.is_file():
            raise MissingAssetError(f"NoW image list not found: {image_list} (download it from the NoW website)")
        lines = [line.strip() for line in image_list.read_text().splitlines() if line.strip()]
        # Keep the last three parts: some lists carry a leading folder.
        self.entries = [Path(*Path(line).parts[-3:]) for line in lines]
        if challenge is not None:
            self.entries = [e for e in self.entries if e.parts[1] == challenge]
        self.images_dir = _find_dir(self.root, "iphone_pictures")
        self.scans_dir = _find_dir(self.root, "scans")
        self.landmarks_dir = _find_dir(self.root, "scans_lmks_onlypp")

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[GeometrySample]:
        for entry in self.entries:
            subject = entry.parts[0]
            yield GeometrySample(
                sample_id=entry.with_suffix("").as_posix(),
                image_paths=(self.images_dir / entry,),
                scan_path=_single_file(self.scans_dir / subject, "*.obj"),
                scan_landmarks=load_landmarks(_single_file(self.landmarks_dir / subject, "*.pp")),
            )


def _with_suffixes(stem: Path, *suffixes: str) -> list[Path]:
    """stem + suffix for each suffix (image names may contain dots, so no Path.with_suffix)."""
    return [stem.parent / (stem.name + suffix) for suffix in suffixes]


def load_now_prediction(predictions_dir: str | Path, sample_id: str
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Predicted mesh and its 7 landmarks for a sample: (V, 3), (F, 3), (7, 3); None when not predicted."""
    stem = Path(predictions_dir) / sample_id
    mesh_path = next((p for p in _with_suffixes(stem, ".obj", ".ply") if p.is_file()), None)
    landmark_path = next((p for p in _with_suffixes(stem, ".npy", ".txt") if p.is_file()), None)
    if mesh_path is None or landmark_path is None:
        return None
    vertices, faces = load_mesh(mesh_path)
    landmarks = load_landmarks(landmark_path)
    if landmarks.shape != (7, 3):
        raise TrackerError(f"{landmark_path}: NoW needs 7 landmarks (7, 3), found {landmarks.shape}")
    return vertices, faces, landmarks


def save_now_prediction(predictions_dir: str | Path, sample_id: str, vertices: np.ndarray, faces: np.ndarray,
                        landmarks: np.ndarray) -> None:
    """Write a prediction in NoW's layout: SAMPLE_ID.obj and SAMPLE_ID.npy (7 x 3 landmarks)."""
    mesh_path, landmark_path = _with_suffixes(Path(predictions_dir) / sample_id, ".obj", ".npy")
    save_obj(mesh_path, vertices, faces)
    np.save(landmark_path, np.asarray(landmarks, dtype=np.float64).reshape(7, 3))
