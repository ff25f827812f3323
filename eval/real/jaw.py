"""Jaw-outline agreement on real video: an independent detector's jaw points against the fitted mesh's own
projected jaw/cheek silhouette.

Per frame, the outline of the mesh's lower face is found (`ContourMesh`): the occluding contour of the face
surface below the eyes (edges whose two triangles face opposite ways as seen from the camera: the cheek turning
away) and the border of FLAME's face region there (the jaw line against the neck, the cheeks against the ears; a
level camera sees the underside of the chin, so no silhouette runs along the chin), kept where the depth buffer
shows them (eval.holdout.raster, not the tracker's renderer), projected to 2D segments. Each of dlib's 17 jaw points
(iBUG 0-16) is measured to the nearest point of those segments (point to curve: sliding along the outline is
free) and the mean is divided by dlib's inter-ocular distance (outer eye corners 36, 45). The inner 51 points
(17-67) are compared with the mesh's embedded iBUG landmarks, point to point, in the same units. A clip's
values are the medians over its frames. dlib's own error sets the floor: the true mesh of a synthetic render
scores about 0.05.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from eval.holdout.raster import rasterize
from eval.metrics import IBUG68_OUTER_EYE_CORNERS
from eval.tracked import TrackedSequence
from tracker.camera import Camera, to_camera
from tracker.flame.landmarks import LandmarkSet
from tracker.flame.model import FlameModel

JAW_POINTS = np.arange(17)
INNER_POINTS = np.arange(17, 68)
OUTLINE_MAX_Y_M = 0.03
"""Template height below which the face outline counts as jaw and cheek (the eyes are at 0.02, the chin at -0.09)."""
NOT_OUTLINE = ("left_eyeball", "right_eyeball", "nose", "lips", "eye_region")
"""FLAME masks whose silhouettes are not the face outline."""
VISIBILITY_TOLERANCE_M = 0.01
"""A contour point counts as seen when at most this far behind the depth buffer (it lies on the silhouette)."""
DEPTH_BUFFER_SIDE = 320
"""Longer side of the depth buffer (a crop around the contour, never upsampled)."""


def interior_edges(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges shared by exactly two triangles: (E, 2) vertex ids and (E, 2) the two triangles."""
    corner_edges = np.sort(np.stack([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], 1).reshape(-1, 2), 1)
    owner = np.repeat(np.arange(len(faces)), 3)
    edges, inverse, counts = np.unique(corner_edges, axis=0, return_inverse=True, return_counts=True)
    order = np.argsort(inverse.reshape(-1), kind="stable")
    first = np.r_[0, np.cumsum(counts)[:-1]]
    shared = counts == 2
    return edges[shared], np.stack([owner[order[first[shared]]], owner[order[first[shared] + 1]]], 1)


@dataclass(frozen=True)
class ContourMesh:
    """Where the lower face's outline can lie on the mesh: the triangles drawn in the depth buffer, the edges
    that outline the jaw and cheeks when their two triangles face opposite ways (silhouettes of the face surface),
    and the edges where the face region ends (the jaw line against the neck, the cheeks against the ears), which
    outline it wherever they are seen."""

    faces: np.ndarray
    """(F, 3) mesh triangles without the eyeballs."""
    silhouette_edges: np.ndarray
    """(E, 2) vertex ids of face-region edges below the eyes (eyes, nose and lips excluded)."""
    silhouette_faces: np.ndarray
    """(E, 2) the two triangles (rows of `faces`) of each silhouette edge."""
    border_edges: np.ndarray
    """(B, 2) vertex ids of edges between a face-region triangle and another, below the eyes."""

    @staticmethod
    def build(model: FlameModel, masks: dict[str, np.ndarray]) -> ContourMesh:
        faces = model.faces.detach().cpu().numpy().astype(np.int64)
        member = lambda names: np.isin(np.arange(model.n_vertices), np.concatenate(  # noqa: E731
            [masks[n] for n in names if n in masks] or [np.zeros(0, np.int64)]))
        faces = faces[~member(("left_eyeball", "right_eyeball"))[faces].any(1)]
        low = model.v_template.detach().cpu().numpy()[:, 1] <= OUTLINE_MAX_Y_M
        face = member(("face",))
        edges, edge_faces = interior_edges(faces)
        in_face = face[faces].all(1)[edge_faces]  # (E, 2): each side's triangle lies in the face region
        below_eyes = low[edges].all(1)
        outline = face & ~member(NOT_OUTLINE)
        silhouette = below_eyes & outline[edges].all(1) & in_face.all(1)
        border = below_eyes & outline[edges].all(1) & (in_face[:, 0] != in_face[:, 1])  # not eyes, nostrils, mouth
        return ContourMesh(faces, edges[silhouette], edge_faces[silhouette], edges[border])


def contour_segments(mesh: ContourMesh, vertices: torch.Tensor, camera: Camera) -> np.ndarray:
    """(S, 2, 2) pixel segments of the visible outline of the jaw and cheeks. vertices: (V, 3) world."""
    cam = to_camera(vertices.detach().cpu().double()).numpy()
    tri = cam[mesh.faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    front = (normals * tri.mean(1)).sum(1) < 0  # normal towards the camera at the origin
    turning = front[mesh.silhouette_faces[:, 0]] != front[mesh.silhouette_faces[:, 1]]
    edges = np.concatenate([mesh.silhouette_edges[turning], mesh.border_edges])
    if len(edges) == 0:
        return np.zeros((0, 2, 2))
    focal, centre = float(camera.focal), camera.center.detach().cpu().double().numpy()
    pixels = cam[:, :2] / cam[:, 2:] * focal + centre
    middle = cam[edges].mean(1)
    seen = _visible(pixels, cam[:, 2], mesh.faces, middle[:, :2] / middle[:, 2:] * focal + centre, middle[:, 2])
    return pixels[edges[seen]]


def _visible(pixels: np.ndarray, depth: np.ndarray, faces: np.ndarray, points: np.ndarray,
             point_depth: np.ndarray) -> np.ndarray:
    """(N,) bool: points (N, 2 pixels; N depths) not hidden by the mesh (pixels, depth per vertex; faces), tested
    in a depth buffer of the crop around the points."""
    margin = 2.0
    low = points.min(0) - margin
    scale = min(1.0, DEPTH_BUFFER_SIDE / (np.ptp(points, axis=0).max() + 2 * margin))
    size = np.ceil((points.max(0) + margin - low) * scale).astype(int) + 1
    screen = np.c_[(pixels - low) * scale, depth]
    zbuffer = rasterize(screen, faces, int(size[1]), int(size[0])).depth
    at = np.floor((points - low) * scale).astype(int)
    inside = (at >= 0).all(1) & (at[:, 0] < size[0]) & (at[:, 1] < size[1])
    shown = np.full(len(points), np.inf)
    shown[inside] = zbuffer[at[inside, 1], at[inside, 0]]
    return point_depth <= shown + VISIBILITY_TOLERANCE_M


def point_to_segments(points: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """(N,) distance of each point (N, 2) to the nearest of the segments (S, 2, 2); inf when S = 0."""
    if len(segments) == 0:
        return np.full(len(points), np.inf)
    a, b = segments[None, :, 0], segments[None, :, 1]
    ab = b - a
    t = ((points[:, None] - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12)
    nearest = a + np.clip(t, 0.0, 1.0)[..., None] * ab
    return np.linalg.norm(points[:, None] - nearest, axis=-1).min(1)


def inter_ocular(points68: np.ndarray) -> float:
    left, right = IBUG68_OUTER_EYE_CORNERS
    return float(np.linalg.norm(points68[left] - points68[right]))


@torch.no_grad()
def jaw_scores(tracked: TrackedSequence, vertices: torch.Tensor, mesh: ContourMesh, landmarks68: LandmarkSet,
               detected68: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame `jaw_iod` (dlib jaw points to the mesh's outline) and `inner51_iod` (inner points to the mesh's
    landmarks), NaN where dlib found no face (NaN points) or the frame was not tracked.

    vertices: (T, V, 3) world vertices of the tracked frames (tracked.vertices(model));
    detected68: (T, 68, 2) dlib landmarks on the tracked frames (pixel centres at +0.5), NaN where none.
    """
    T = len(tracked.frame_index)
    jaw, inner = np.full(T, np.nan), np.full(T, np.nan)
    mesh_points = tracked.landmarks_2d(vertices, landmarks68)
    for t in range(T):
        points = detected68[t]
        if not tracked.valid[t] or not np.isfinite(points).all():
            continue
        iod = inter_ocular(points)
        distances = point_to_segments(points[JAW_POINTS], contour_segments(mesh, vertices[t], tracked.camera))
        if np.isfinite(distances).all():
            jaw[t] = distances.mean() / iod
        inner[t] = np.linalg.norm(points[INNER_POINTS] - mesh_points[t, INNER_POINTS], axis=1).mean() / iod
    return {"jaw_iod": jaw, "inner51_iod": inner}
