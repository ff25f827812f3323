"""FLAME landmark embeddings: points fixed on mesh triangles by barycentric coordinates.

Two detector schemes map onto FLAME:
- 'ibug68' (dlib, FAN): TF_FLAME's static 68-point embedding whose 17 jaw-contour points are replaced, per
  frame, by the yaw-dependent dynamic contour (79 yaw bins x 17 points, RingNet's convention), because the
  visible silhouette of the cheek moves over the surface as the head turns.
- 'mediapipe478' (MediaPipe Face Landmarker): metrical-tracker's 105-point embedding; `landmark_indices`
  picks those 105 out of MediaPipe's 478.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tracker.errors import MissingAssetError, TrackerError
from tracker.flame.loading import read_pickle

STATIC_68_FILE = "flame_static_embedding_68.pkl"
DYNAMIC_CONTOUR_FILE = "flame_dynamic_embedding.npy"
MEDIAPIPE_FILE = "mediapipe_landmark_embedding.npz"
N_CONTOUR = 17
CONTOUR_MAX_YAW_DEG = 39


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

    @property
    def n_landmarks(self) -> int:
        return int(self.corners.shape[0])

    def to(self, device: torch.device | str) -> "LandmarkSet":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return LandmarkSet(**moved)

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


def _require(path: Path) -> Path:
    if not path.is_file():
        raise MissingAssetError(
            f"landmark embedding {path.name} not found in {path.parent}: put FLAME's embedding files there "
            "or set --flame-assets / TRACKER_FLAME_ASSETS"
        )
    return path


def _build(scheme: str, faces: np.ndarray, tri_corners: list[np.ndarray], detector_index: np.ndarray,
           bary: np.ndarray, contour: tuple[np.ndarray, np.ndarray] | None) -> LandmarkSet:
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
    )


def load_ibug68(assets_dir: Path, faces: np.ndarray) -> LandmarkSet:
    """68 iBUG landmarks: static 68 embedding with the dynamic 17-point jaw contour."""
    static = read_pickle(_require(assets_dir / STATIC_68_FILE))
    try:
        dynamic = np.load(_require(assets_dir / DYNAMIC_CONTOUR_FILE), allow_pickle=True, encoding="latin1")
        dynamic = dynamic.item()
    except (ValueError, OSError, pickle.UnpicklingError) as exc:
        raise TrackerError(f"{DYNAMIC_CONTOUR_FILE} is unreadable ({exc})") from None
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
        with np.load(_require(assets_dir / MEDIAPIPE_FILE)) as z:
            face_idx, bary, mp_idx = z["lmk_face_idx"], z["lmk_b_coords"], z["landmark_indices"]
    except (KeyError, ValueError, OSError) as exc:
        raise TrackerError(f"{MEDIAPIPE_FILE} is unreadable ({exc})") from None
    corners = _face_corners(faces, face_idx)
    return _build("mediapipe478", faces, [corners], mp_idx, bary, None)


def load_landmark_set(scheme: str, assets_dir: str | Path, faces: np.ndarray) -> LandmarkSet:
    """The FLAME embedding for a detector's landmark scheme ('ibug68' or 'mediapipe478')."""
    loaders = {"ibug68": load_ibug68, "mediapipe478": load_mediapipe105}
    if scheme not in loaders:
        raise TrackerError(f"no FLAME embedding for landmark scheme {scheme!r} (known: {', '.join(loaders)})")
    return loaders[scheme](Path(assets_dir), faces)
