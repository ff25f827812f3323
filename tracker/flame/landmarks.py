"""FLAME landmark embeddings: points fixed on mesh triangles by barycentric coordinates.

Two detector schemes map onto FLAME:
- 'ibug68' (dlib, FAN): TF_FLAME's static 68-point embedding whose 17 jaw-contour points are replaced, per
  frame, by the yaw-dependent dynamic contour (79 yaw bins x 17 points, RingNet's convention), because the
  visible silhouette of the cheek moves over the surface as the head turns.
- 'mediapipe478' (MediaPipe Face Landmarker): `landmark_indices` picks the embedded points out of MediaPipe's
  478: metrical-tracker's / SMIRK's 105 (the published file), or the shipped calibrated embedding's 432 (those
  105 plus the rest of MediaPipe's face mesh without the face oval, eval.calibrate_embedding).

Each file is looked up under its shipped plain-array name (.npz, in flame_assets/) first, then under the
name the original projects publish it with (.pkl / pickled .npy, read by the restricted readers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tracker.detect.base import POINTS_PER_SCHEME, SCHEME_MEDIAPIPE
from tracker.errors import MissingAssetError, TrackerError
from tracker.flame.contour import ContourRegion
from tracker.flame.loading import read_array_dict
from tracker.io.safe_load import read_npy, read_npz

STATIC_68_FILES = ("flame_static_embedding_68.npz", "flame_static_embedding_68.pkl")
DYNAMIC_CONTOUR_FILES = ("flame_dynamic_embedding.npz", "flame_dynamic_embedding.npy")
MEDIAPIPE_FILE = "mediapipe_landmark_embedding.npz"
N_CONTOUR = 17
CONTOUR_MAX_YAW_DEG = 39
MEDIAPIPE_FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
                       148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
"""MediaPipe's FACEMESH_FACE_OVAL, from the top of the forehead round the right cheek, the chin and back: where the
face meets hair and background, a silhouette rather than a surface point."""
OUTLINE_POINTS = {
    "ibug68": tuple(range(17)),
    "mediapipe478": MEDIAPIPE_FACE_OVAL[8:29],
}
"""Detector points on the lower face outline (cheekbone to cheekbone round the chin): the 17 iBUG jaw points,
and the lower half of MediaPipe's face oval (454 ... 152 ... 234). They follow the silhouette, not a fixed
vertex."""


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
    sources: tuple[Path, ...] = ()
    """The embedding files it was read from (their digests go into the outputs)."""

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
        B, S = sub_vertices.shape[:2]
        if self.contour_corners is None or yaw_deg is None:
            # The same triangles in every frame: gather whole rows of a (S, B * 3) layout and weight them with one
            # batched product (several times faster than per-frame fancy indexing on the solver's large batches).
            rows = sub_vertices.permute(1, 0, 2).reshape(S, B * 3).index_select(0, self.corners.reshape(-1))
            points = torch.bmm(self.bary[:, None, :], rows.view(-1, 3, B * 3))[:, 0]  # (L, B * 3)
            return points.view(-1, B, 3).permute(1, 0, 2)
        corners, bary = self.triangles(yaw_deg)  # the jaw contour's triangles follow each frame's yaw
        batch = torch.arange(B, device=sub_vertices.device)[:, None, None]
        return barycentric_points(sub_vertices[batch, corners], bary)

    def triangles(self, yaw_deg: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The landmarks' triangle corners (indices into vertex_ids) and barycentric weights: (L, 3) each when
        every frame uses the same, else (B, L, 3) with the jaw contour's triangles picked by each frame's yaw."""
        if self.contour_corners is None or yaw_deg is None:
            return self.corners, self.bary
        B, bins = yaw_deg.shape[0], contour_bin(yaw_deg)
        corners = torch.cat([self.contour_corners[bins], self.corners[None, N_CONTOUR:].expand(B, -1, -1)], 1)
        bary = torch.cat([self.contour_bary[bins], self.bary[None, N_CONTOUR:].expand(B, -1, -1)], 1)
        return corners, bary

    def full_positions(self, vertices: torch.Tensor, yaw_deg: torch.Tensor | None = None) -> torch.Tensor:
        """Same as positions() but from all FLAME vertices (B, V, 3)."""
        return self.positions(vertices[:, self.vertex_ids], yaw_deg)


def _embedding_array(path: Path, values: dict, key: str, dtype, shape: tuple) -> np.ndarray:
    """values[key] as a finite array of `shape` (None: any size); one line naming the file and array otherwise."""
    try:
        array = np.asarray(values[key], dtype=np.float64)
    except KeyError:
        raise TrackerError(f"{path}: array {key} is missing") from None
    except (TypeError, ValueError):
        raise TrackerError(f"{path}: array {key} is not numeric") from None
    if array.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, array.shape)):
        wanted = "x".join("?" if s is None else str(s) for s in shape)
        raise TrackerError(f"{path}: array {key} has shape {'x'.join(map(str, array.shape))}, expected {wanted}")
    if not np.isfinite(array).all():
        raise TrackerError(f"{path}: array {key} holds non-finite values")
    return array.astype(dtype)


def _face_corners(faces: np.ndarray, face_idx: np.ndarray, path: Path | None = None) -> np.ndarray:
    face_idx = np.asarray(face_idx, dtype=np.int64)
    if face_idx.size and (face_idx.min() < 0 or face_idx.max() >= len(faces)):
        raise TrackerError(f"{path}: array lmk_face_idx holds triangle indices outside 0..{len(faces) - 1}: "
                           "the embedding does not belong to this FLAME mesh")
    return faces[face_idx]


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
    """The dynamic contour as a dict: plain .npz, or RingNet's original pickled .npy (its pickle read by the
    restricted unpickler of tracker.io.safe_load, never np.load(allow_pickle=True))."""
    if path.suffix == ".npz":
        return read_array_dict(path, "landmark embedding")
    dynamic = read_npy(path, "landmark embedding")
    if not isinstance(dynamic, dict):
        raise TrackerError(f"{path} does not hold a dict of arrays (found {type(dynamic).__name__})")
    return dynamic


def _build(scheme: str, faces: np.ndarray, tri_corners: list[np.ndarray], detector_index: np.ndarray,
           bary: np.ndarray, contour: tuple[np.ndarray, np.ndarray] | None,
           sigma: np.ndarray | None = None, sources: tuple[Path, ...] = ()) -> LandmarkSet:
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
        sources=sources,
    )


def load_ibug68(assets_dir: Path, faces: np.ndarray) -> LandmarkSet:
    """68 iBUG landmarks: static 68 embedding with the dynamic 17-point jaw contour."""
    static_path = _require(assets_dir, STATIC_68_FILES)
    dynamic_path = _require(assets_dir, DYNAMIC_CONTOUR_FILES)
    static = read_array_dict(static_path, "landmark embedding")
    dynamic = read_dynamic_contour(dynamic_path)
    static_faces = _embedding_array(static_path, static, "lmk_face_idx", np.int64, (68,))
    static_bary = _embedding_array(static_path, static, "lmk_b_coords", np.float32, (68, 3))
    contour_faces = _embedding_array(dynamic_path, dynamic, "lmk_face_idx", np.int64, (79, N_CONTOUR))
    contour_bary = _embedding_array(dynamic_path, dynamic, "lmk_b_coords", np.float32, (79, N_CONTOUR, 3))
    static_corners = _face_corners(faces, static_faces, static_path)  # (68, 3)
    contour_corners = _face_corners(faces, contour_faces, dynamic_path)  # (79, 17, 3)
    return _build("ibug68", faces, [static_corners, contour_corners], np.arange(68), static_bary,
                  (contour_corners, contour_bary), sources=(static_path, dynamic_path))


def load_mediapipe(assets_dir: Path, faces: np.ndarray) -> LandmarkSet:
    """MediaPipe's 478 points, those `landmark_indices` names embedded on FLAME."""
    path = _require(assets_dir, MEDIAPIPE_FILE)
    stored = read_npz(path, "landmark embedding")
    face_idx = _embedding_array(path, stored, "lmk_face_idx", np.int64, (None,))
    n = len(face_idx)
    bary = _embedding_array(path, stored, "lmk_b_coords", np.float32, (n, 3))
    mp_idx = _embedding_array(path, stored, "landmark_indices", np.int64, (n,))
    if n == 0 or mp_idx.min() < 0 or mp_idx.max() >= POINTS_PER_SCHEME[SCHEME_MEDIAPIPE]:
        raise TrackerError(f"{path}: array landmark_indices must hold indices into MediaPipe's 478 points")
    sigma = (_embedding_array(path, stored, "landmark_sigma", np.float32, (n,))
             if "landmark_sigma" in stored else None)
    if sigma is not None and not (sigma > 0).all():
        raise TrackerError(f"{path}: array landmark_sigma must be positive")
    corners = _face_corners(faces, face_idx, path)
    return _build("mediapipe478", faces, [corners], mp_idx, bary, None, sigma, sources=(path,))


def load_landmark_set(scheme: str, assets_dir: str | Path, faces: np.ndarray) -> LandmarkSet:
    """The FLAME embedding for a detector's landmark scheme ('ibug68' or 'mediapipe478')."""
    loaders = {"ibug68": load_ibug68, "mediapipe478": load_mediapipe}
    if scheme not in loaders:
        raise TrackerError(f"no FLAME embedding for landmark scheme {scheme!r} (known: {', '.join(loaders)})")
    return loaders[scheme](Path(assets_dir), faces)
