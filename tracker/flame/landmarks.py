"""FLAME landmark embeddings: points fixed on mesh triangles by barycentric coordinates.

Two detector schemes map onto FLAME:
- 'ibug68' (dlib, FAN): TF_FLAME's static 68-point embedding whose 17 jaw-contour points are replaced, per
  frame, by the yaw-dependent dynamic contour (79 yaw bins x 17 points, RingNet's convention), because the
  visible silhouette of the cheek moves over the surface as the head turns.
- 'mediapipe478' (MediaPipe Face Landmarker): metrical-tracker's 105-point embedding; `landmark_indices`
  picks those 105 out of MediaPipe's 478.

Each file is looked up under its shipped plain-array name (.npz, in flame_assets/) first, then under the
name the original projects publish it with (.pkl / pickled .npy, read by the restricted readers).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tracker.errors import MissingAssetError, TrackerError
from tracker.flame.contour import ContourRegion
from tracker.flame.loading import read_array_dict

STATIC_68_FILES = ("flame_static_embedding_68.npz", "flame_static_embedding_68.pkl")
DYNAMIC_CONTOUR_FILES = ("flame_dynamic_embedding.npz", "flame_dynamic_embedding.npy")
MEDIAPIPE_FILE = "mediapipe_landmark_embedding.npz"
N_CONTOUR = 17
CONTOUR_MAX_YAW_DEG = 39
OUTLINE_POINTS = {
    "ibug68": tuple(range(17)),
    "mediapipe478": (454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148, 176, 149, 150, 136, 172, 58, 132,
                     93, 234),
}
"""Detector points on the lower face outline (cheekbone to cheekbone round the chin): the 17 iBUG jaw points,
and the lower half of MediaPipe's face oval. They follow the silhouette, not a fixed vertex."""


def contour_bin(yaw_deg: torch.Tensor) -> torch.Tensor:
    """Dynamic-contour bin (0..78) for a head yaw in degrees (RingNet/FLAME-PyTorch convention).

    yaw_deg: (B,) -> (B,) long. Bins 0..39 hold yaw 0..-39 degrees, 40..78 hold yaw +1..+39.
    """
    y = torch.round(torch.clamp(-yaw_deg, max=CONTOUR_MAX_YAW_DEG)).long()
    neg = torch.where(y < -CONTOUR_MAX_YAW_DEG, torch.full_like(y, 78), CONTOUR_MAX_YAW_DEG - y)
    return torch.where(y < 0, neg, y)


def yaw_degrees(rot: torch.Tensor) -> torch.Tensor:
    """Rotation about the vertical (y) axis in degrees, as RingNet extracts it. rot: (B, 3, 3) -> (B,)."""
    sy = torch.sqrt(rot[:, 0, 0] ** 2 + rot[:, 1, 0] ** 2)
    return torch.rad2deg(torch.atan2(-rot[:, 2, 0], sy))


def barycentric_points(corners: torch.Tensor, bary: torch.Tensor) -> torch.Tensor:
    """Points from triangle corners and barycentric weights. corners: (..., 3, 3); bary: (..., 3) -> (..., 3)."""
    return (corners * bary[..., None]).sum(dim=-2)


@dataclass
class LandmarkSet:
    """One detector scheme's landmarks on FLAME, evaluated on a vertex subset for speed.

    vertex_ids: (S,) FLAME vertices the landmarks need; corners index into that subset.
    """

    scheme: str
    vertex_ids: torch.Tensor
    """(S,) long: FLAME vertex ids needed by any landmark (all contour bins included)."""
    corners: torch.Tensor
    """(L, 3) long: each landmark's triangle corners as indices into vertex_ids."""
    bary: torch.Tensor
    """(L, 3) barycentric weights."""
    detector_index: torch.Tensor
    """(L,) long: which detector point each landmark matches."""
    contour_corners: torch.Tensor | None = None
    """(79, 17, 3) long: dynamic-contour triangle corners per yaw bin (ibug68 only)."""
    contour_bary: torch.Tensor | None = None
    """(79, 17, 3) dynamic-contour barycentric weights per yaw bin."""
    sigma: torch.Tensor | None = None
    """(L,) how far the detector strays from each embedded point (robust standard deviation, face-size units),
    from a calibrated embedding (eval.calibrate_embedding); None when the embedding has no such record."""
    outline_index: torch.Tensor | None = None
    """(C,) long: detector points on the lower face outline, matched to the silhouette (energy.contour)."""
    outline: ContourRegion | None = None
    """The mesh region whose silhouette those points lie on."""

    @property
    def n_landmarks(self) -> int:
        return int(self.corners.shape[0])

    def to(self, device: torch.device | str) -> LandmarkSet:
        moved = {k: (v.to(device) if isinstance(v, (torch.Tensor, ContourRegion)) else v)
                 for k, v in self.__dict__.items()}
        return LandmarkSet(**moved)

    def with_outline(self, region: ContourRegion) -> LandmarkSet:
        """A copy whose scheme's face-outline points are matched to the silhouette of `region`."""
        index = torch.tensor(OUTLINE_POINTS[self.scheme], dtype=torch.long, device=self.vertex_ids.device)
        return LandmarkSet(**{**self.__dict__, "outline_index": index, "outline": region})

    def positions(self, sub_vertices: torch.Tensor, yaw_deg: torch.Tensor | None = None) -> torch.Tensor:
        """Landmark 3D positions. sub_vertices: (B, S, 3) at vertex_ids; yaw_deg: (B,) -> (B, L, 3)."""
        B = sub_vertices.shape[0]
        corners = self.corners[None].expand(B, -1, -1)
        bary = self.bary[None].expand(B, -1, -1)
        if self.contour_corners is not None and yaw_deg is not None:
            bins = contour_bin(yaw_deg)
            corners = torch.cat([self.contour_corners[bins], corners[:, N_CONTOUR:]], dim=1)
            bary = torch.cat([self.contour_bary[bins], bary[:, N_CONTOUR:]], dim=1)
        batch = torch.arange(B, device=sub_vertices.device)[:, None, None]
        return barycentric_points(sub_vertices[batch, corners], bary)

    def full_positions(self, vertices: torch.Tensor, yaw_deg: torch.Tensor | None = None) -> torch.Tensor:
        """Same as positions() but from all FLAME vertices (B, V, 3)."""
        return self.positions(vertices[:, self.vertex_ids], yaw_deg)


def _face_corners(faces: np.ndarray, face_idx: np.ndarray) -> np.ndarray:
    return faces[np.asarray(face_idx, dtype=np.int64)]


def find_side_file(folder: Path, names: tuple[str, ...] | str) -> Path | None:
    """The first of `names` (shipped plain-array name first) that exists in folder, else None."""
    names = (names,) if isinstance(names, str) else names
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _require(folder: Path, names: tuple[str, ...] | str) -> Path:
    path = find_side_file(folder, names)
    if path is None:
        name = names if isinstance(names, str) else " or ".join(names)
        raise MissingAssetError(
            f"landmark embedding {name} not found in {folder}: put FLAME's embedding files there "
            "or set --flame-assets / TRACKER_FLAME_ASSETS"
        )
    return path


def read_dynamic_contour(path: Path) -> dict:
    """The dynamic contour as a dict: plain .npz, or RingNet's original pickled .npy."""
    if path.suffix == ".npz":
        return read_array_dict(path)
    try:
        return np.load(path, allow_pickle=True, encoding="latin1").item()
    except (ValueError, OSError, pickle.UnpicklingError) as exc:
        raise TrackerError(f"{path.name} is unreadable ({exc})") from None


def _build(scheme: str, faces: np.ndarray, tri_corners: list[np.ndarray], detector_index: np.ndarray,
           bary: np.ndarray, contour: tuple[np.ndarray, np.ndarray] | None,
           sigma: np.ndarray | None = None) -> LandmarkSet:
    used = np.unique(np.concatenate([c.reshape(-1) for c in tri_corners]))
    local = {int(v): i for i, v in enumerate(used)}
    to_local = np.vectorize(lambda v: local[int(v)], otypes=[np.int64])
    static_corners = to_local(tri_corners[0])
    contour_corners = contour_bary = None
    if contour is not None:
        contour_corners = torch.from_numpy(to_local(contour[0]))
        contour_bary = torch.from_numpy(contour[1].astype(np.float32))
    return LandmarkSet(
        scheme=scheme,
        vertex_ids=torch.from_numpy(used.astype(np.int64)),
        corners=torch.from_numpy(static_corners),
        bary=torch.from_numpy(bary.astype(np.float32)),
        detector_index=torch.from_numpy(detector_index.astype(np.int64)),
        contour_corners=contour_corners,
        contour_bary=contour_bary,
        sigma=None if sigma is None else torch.from_numpy(np.asarray(sigma, np.float32)),
    )


def load_ibug68(assets_dir: Path, faces: np.ndarray) -> LandmarkSet:
    """68 iBUG landmarks: static 68 embedding with the dynamic 17-point jaw contour."""
    static = read_array_dict(_require(assets_dir, STATIC_68_FILES))
    dynamic = read_dynamic_contour(_require(assets_dir, DYNAMIC_CONTOUR_FILES))
    static_corners = _face_corners(faces, static["lmk_face_idx"])  # (68, 3)
    contour_corners = _face_corners(faces, np.asarray(dynamic["lmk_face_idx"]))  # (79, 17, 3)
    contour_bary = np.asarray(dynamic["lmk_b_coords"], dtype=np.float32)
    if static_corners.shape[0] != 68 or contour_corners.shape[1:] != (N_CONTOUR, 3):
        raise TrackerError("landmark embedding files do not have the 68 / 79x17 layout")
    return _build("ibug68", faces, [static_corners, contour_corners], np.arange(68),
                  np.asarray(static["lmk_b_coords"]), (contour_corners, contour_bary))


def load_mediapipe105(assets_dir: Path, faces: np.ndarray) -> LandmarkSet:
    """MediaPipe's 478 points, 105 of them embedded on FLAME."""
    try:
        with np.load(_require(assets_dir, MEDIAPIPE_FILE), allow_pickle=False) as z:
            face_idx, bary, mp_idx = z["lmk_face_idx"], z["lmk_b_coords"], z["landmark_indices"]
            sigma = z["landmark_sigma"] if "landmark_sigma" in z.files else None
    except (KeyError, ValueError, OSError) as exc:
        raise TrackerError(f"{MEDIAPIPE_FILE} is unreadable ({exc})") from None
    corners = _face_corners(faces, face_idx)
    return _build("mediapipe478", faces, [corners], mp_idx, bary, None, sigma)


def load_landmark_set(scheme: str, assets_dir: str | Path, faces: np.ndarray) -> LandmarkSet:
    """The FLAME embedding for a detector's landmark scheme ('ibug68' or 'mediapipe478')."""
    loaders = {"ibug68": load_ibug68, "mediapipe478": load_mediapipe105}
    if scheme not in loaders:
        raise TrackerError(f"no FLAME embedding for landmark scheme {scheme!r} (known: {', '.join(loaders)})")
    return loaders[scheme](Path(assets_dir), faces)
