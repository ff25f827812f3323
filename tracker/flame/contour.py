"""The occluding contour of the lower face: where the cheeks, jaw and chin turn away from the camera.

Image face-outline landmarks (dlib/FAN points 0-16, MediaPipe's face oval) lie on the visible silhouette of
the face, which slides over the surface as the head turns or the jaw opens: they have no fixed vertex. The
silhouette is found per frame among the edges of a lower-face region: an edge is on the occluding contour
when one of its two triangles faces the camera and the other faces away.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tracker.render.barycentric import signed_area2

REGION_Y_RANGE = (-0.115, 0.035)
"""Template heights (metres, FLAME's y up) of the outline region: from under the chin to the cheekbones."""
REGION_MIN_Z = -0.065
"""Template depth in front of which the region lies (excludes the back of the head and most of the ears)."""
EXCLUDED_REGIONS = ("left_ear", "right_ear", "left_eyeball", "right_eyeball", "eye_region", "nose", "lips")
"""FLAME mask regions whose own silhouettes (nose, lips, ears) are not the face outline."""


@dataclass
class ContourRegion:
    """Edges of the lower-face region that can become occluding contour."""

    vertex_ids: torch.Tensor
    """(S,) long: FLAME vertices of the region."""
    edges: torch.Tensor
    """(E, 2) long: edge endpoints, indices into vertex_ids."""
    edge_faces: torch.Tensor
    """(E, 2, 3) long: the two triangles sharing each edge, corners as indices into vertex_ids."""

    def to(self, device: torch.device | str) -> ContourRegion:
        return ContourRegion(self.vertex_ids.to(device), self.edges.to(device), self.edge_faces.to(device))


def outline_region(v_template: np.ndarray, faces: np.ndarray, masks: dict[str, np.ndarray]) -> ContourRegion:
    """The lower-face outline region of a FLAME-topology mesh: its interior edges with their two triangles.

    v_template: (V, 3) metres; faces: (F, 3); masks: FLAME_masks region -> vertex ids.
    """
    y, z = v_template[:, 1], v_template[:, 2]
    inside = (y > REGION_Y_RANGE[0]) & (y < REGION_Y_RANGE[1]) & (z > REGION_MIN_Z)
    for name in EXCLUDED_REGIONS:
        if name in masks:
            inside[masks[name]] = False
    region_faces = faces[inside[faces].all(1)]
    vertex_ids = np.unique(region_faces)
    local = np.full(len(v_template), -1, np.int64)
    local[vertex_ids] = np.arange(len(vertex_ids))
    tri = local[region_faces]  # (F', 3)
    # Each triangle's three edges, keyed by their sorted endpoints; interior edges appear exactly twice.
    corner_pairs = ((0, 1), (1, 2), (2, 0))
    edge_keys = np.concatenate([np.sort(tri[:, list(p)], axis=1) for p in corner_pairs])
    owner = np.tile(np.arange(len(tri)), 3)
    order = np.lexsort((edge_keys[:, 1], edge_keys[:, 0]))
    keys, owners = edge_keys[order], owner[order]
    pair = np.flatnonzero((keys[1:] == keys[:-1]).all(1))
    return ContourRegion(
        vertex_ids=torch.from_numpy(vertex_ids.astype(np.int64)),
        edges=torch.from_numpy(keys[pair]),
        edge_faces=torch.from_numpy(np.stack([tri[owners[pair]], tri[owners[pair + 1]]], axis=1)),
    )


def silhouette_edges(points_2d: torch.Tensor, region: ContourRegion) -> torch.Tensor:
    """(B, E) bool: edges whose two triangles face opposite ways in the image (the occluding contour).

    points_2d: (B, S, 2) projected region vertices.
    """
    corners = points_2d[:, region.edge_faces]  # (B, E, 2, 3, 2)
    area = signed_area2(corners)  # (B, E, 2)
    return (area[..., 0] * area[..., 1]) < 0


def closest_on_segments(points: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                        usable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each query point the nearest point on a set of 2D segments.

    points: (B, C, 2); start, end: (B, E, 2); usable: (B, E) bool (at least one per frame for a finite
    answer). Returns the segment index (B, C) long, the position along it t (B, C) in [0, 1] and the
    distance (B, C) (inf where a frame has no usable segment).
    """
    # Only the usable segments (the silhouette: a few percent of them), each frame's first, in their order.
    count = int(usable.sum(1).max()) if usable.numel() else 0
    kept = torch.sort(usable.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :max(count, 1)]
    start, end, usable = start.gather(1, kept[..., None].expand(-1, -1, 2)), end.gather(1, kept[..., None].expand(
        -1, -1, 2)), usable.gather(1, kept)
    d = end - start  # (B, E', 2)
    rel = points[:, :, None] - start[:, None]  # (B, C, E', 2)
    t = ((rel * d[:, None]).sum(-1) / (d * d).sum(-1).clamp(min=1e-12)[:, None]).clamp(0, 1)
    dist = (rel - t[..., None] * d[:, None]).norm(dim=-1)
    dist = torch.where(usable[:, None], dist, torch.full_like(dist, float("inf")))
    best, index = dist.min(dim=2)
    return kept.gather(1, index), t.gather(2, index[..., None])[..., 0], best
