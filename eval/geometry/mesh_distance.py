"""Exact point-to-surface distances on triangle meshes (closest point on the surface, not on vertices).

`closest_points_on_triangles` is the closed-form closest point of Ericson's "Real-Time Collision Detection"
(5.1.5), vectorised over point/triangle pairs. `SurfaceIndex` samples every triangle densely enough that
each surface point is within a known `cover` radius of a sample of its own triangle; a query takes the
distance u to the triangle of its nearest sample, then examines every triangle with a sample within
u + cover (a k-d tree ball query). Any triangle closer than u is among them, so the result equals a
brute-force search over all triangles (the tests check it against brute force and against libigl).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

# Sampling density of the candidate search: finer than most triangles, so that big ones do not widen it.
SPACING_QUANTILE = 0.25


@dataclass(frozen=True)
class SurfaceProjection:
    """Closest surface points of N query points on a mesh.

    distances: (N,) Euclidean distance to the surface. face_index: (N,) triangle holding the closest
    point. barycentric: (N, 3) its coordinates in that triangle. points: (N, 3) the closest points.
    """

    distances: np.ndarray
    face_index: np.ndarray
    barycentric: np.ndarray
    points: np.ndarray


def closest_points_on_triangles(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Barycentric coordinates of the closest point on each triangle to each point (pairwise).

    Args:
        points: (..., 3) query points.
        triangles: (..., 3, 3) triangle corners a, b, c (broadcast against points).
    Returns:
        (..., 3) barycentric weights of a, b, c; the closest point is `sum_i w_i * corner_i`.
    """
    a, b, c = triangles[..., 0, :], triangles[..., 1, :], triangles[..., 2, :]
    ab, ac = b - a, c - a
    ap, bp, cp = points - a, points - b, points - c
    d1, d2 = (ab * ap).sum(-1), (ac * ap).sum(-1)
    d3, d4 = (ab * bp).sum(-1), (ac * bp).sum(-1)
    d5, d6 = (ab * cp).sum(-1), (ac * cp).sum(-1)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        # Zero denominators only occur in regions that a later (higher-priority) case overrides.
        return num / np.where(den == 0.0, 1.0, den)

    # Face interior first, then the Voronoi regions of edges and vertices: each later assignment takes
    # priority, which reproduces the order of tests in Ericson's branching version.
    area = va + vb + vc
    v, w = ratio(vb, area), ratio(vc, area)
    weights = np.stack([1.0 - v - w, v, w], axis=-1)
    zero, one = np.zeros_like(d1), np.ones_like(d1)
    t_bc, t_ac, t_ab = ratio(d4 - d3, (d4 - d3) + (d5 - d6)), ratio(d2, d2 - d6), ratio(d1, d1 - d3)
    regions = [
        ((va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0), (zero, 1.0 - t_bc, t_bc)),  # edge bc
        ((vb <= 0) & (d2 >= 0) & (d6 <= 0), (1.0 - t_ac, zero, t_ac)),  # edge ac
        ((d6 >= 0) & (d5 <= d6), (zero, zero, one)),  # vertex c
        ((vc <= 0) & (d1 >= 0) & (d3 <= 0), (1.0 - t_ab, t_ab, zero)),  # edge ab
        ((d3 >= 0) & (d4 <= d3), (zero, one, zero)),  # vertex b
        ((d1 <= 0) & (d2 <= 0), (one, zero, zero)),  # vertex a
    ]
    for mask, region_weights in regions:
        weights = np.where(mask[..., None], np.stack(region_weights, axis=-1), weights)
    return weights


def _triangle_samples(triangles: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Points on every triangle so that each surface point lies within `cover` of a sample of its triangle.

    A point of a triangle is at most R (its largest centroid-to-corner distance) from the centroid. Triangle j
    is split into n_j^2 congruent sub-triangles, n_j = ceil(R_j / spacing), whose centroids are the samples:
    every point is then within R_j / n_j <= spacing of one of them.
    Returns samples (S, 3), their triangle index (S,), and the cover radius max_j R_j / n_j.
    """
    radii = np.linalg.norm(triangles - triangles.mean(axis=1, keepdims=True), axis=-1).max(-1)
    spacing = float(np.quantile(radii, SPACING_QUANTILE))
    steps = np.maximum(1, np.ceil(radii / spacing)).astype(np.int64)
    samples, owners = [], []
    for n in np.unique(steps):
        ids = np.flatnonzero(steps == n)
        i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        up, down = i + j <= n - 1, i + j <= n - 2  # sub-triangles oriented like the triangle, and flipped
        b1 = np.concatenate([i[up] + 1 / 3, i[down] + 2 / 3]) / n
        b2 = np.concatenate([j[up] + 1 / 3, j[down] + 2 / 3]) / n
        bary = np.stack([1.0 - b1 - b2, b1, b2], axis=-1)  # (n^2, 3)
        samples.append(np.einsum("pk,tkd->tpd", bary, triangles[ids]).reshape(-1, 3))
        owners.append(np.repeat(ids, len(bary)))
    return np.concatenate(samples), np.concatenate(owners), float((radii / steps).max())


def _nearest_on_candidates(
    points: np.ndarray, triangles: np.ndarray, counts: np.ndarray, face_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closest candidate triangle per point.

    Args:
        points: (N, 3). triangles: (F, 3, 3).
        counts: (N,) number of candidates per point, each >= 1.
        face_ids: (sum(counts),) candidate triangles, grouped by point in order.
    Returns:
        distance (N,), face (N,) and barycentric coordinates (N, 3) of the nearest candidate.
    """
    point_ids = np.repeat(np.arange(len(points)), counts)
    weights = closest_points_on_triangles(points[point_ids], triangles[face_ids])
    closest = np.einsum("mc,mcd->md", weights, triangles[face_ids])
    dist = np.linalg.norm(closest - points[point_ids], axis=-1)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    # First position in each point's group that reaches the group minimum.
    at_min = np.flatnonzero(dist == np.repeat(np.minimum.reduceat(dist, starts), counts))
    first = at_min[np.r_[True, np.diff(point_ids[at_min]) != 0]]
    return dist[first], face_ids[first], weights[first]


class SurfaceIndex:
    """A triangle mesh prepared for repeated exact closest-point queries (the mesh must not move).

    Args:
        vertices: (V, 3) mesh vertices. faces: (F, 3) int triangle vertex indices.
    """

    def __init__(self, vertices: np.ndarray, faces: np.ndarray) -> None:
        self.triangles = np.asarray(vertices, dtype=np.float64)[np.asarray(faces, dtype=np.int64)]  # (F, 3, 3)
        samples, self.owners, self.cover = _triangle_samples(self.triangles)
        self.tree = cKDTree(samples)

    def project(self, points: np.ndarray, chunk_size: int = 16384) -> SurfaceProjection:
        """Closest surface points of (N, 3) query points; `chunk_size` points are handled at once."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        n = len(points)
        distances, face_index, barycentric = np.empty(n), np.empty(n, dtype=np.int64), np.empty((n, 3))
        for start in range(0, n, chunk_size):
            part = slice(start, start + chunk_size)
            distances[part], face_index[part], barycentric[part] = self._project_chunk(points[part])
        closest_points = np.einsum("nc,ncd->nd", barycentric, self.triangles[face_index])
        return SurfaceProjection(distances, face_index, barycentric, closest_points)

    def _project_chunk(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # An upper bound from the triangle of the nearest sample ...
        _, nearest = self.tree.query(points, k=1)
        upper, _, _ = _nearest_on_candidates(points, self.triangles, np.ones(len(points), np.int64),
                                             self.owners[nearest])
        # ... then every triangle that can beat it: one within `upper` has a sample within `upper + cover`
        # (widened by a relative 1e-9 against rounding).
        radius = (upper + self.cover) * (1.0 + 1e-9)
        hits = self.tree.query_ball_point(points, r=radius, return_sorted=False)
        counts = np.fromiter(map(len, hits), dtype=np.int64, count=len(points))
        candidates = self.owners[np.fromiter(itertools.chain.from_iterable(hits), np.int64, counts.sum())]
        return _nearest_on_candidates(points, self.triangles, counts, candidates)


def closest_points_on_mesh(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> SurfaceProjection:
    """Exact closest points on a triangle mesh's surface.

    Args:
        points: (N, 3) query points.
        vertices: (V, 3) mesh vertices, same units as points.
        faces: (F, 3) int triangle vertex indices.
    Returns:
        SurfaceProjection with (N,) distances, face indices, (N, 3) barycentrics and closest points.
    """
    return SurfaceIndex(vertices, faces).project(points)
