"""Metrics of the evaluation harness: pure functions, numpy or torch in, floats or numpy arrays out.

Conventions: 3D inputs are in metres and 3D errors are reported in millimetres; 2D inputs and errors are
in pixels; rotations are axis-angle vectors (radians) and angle errors are in degrees. Tensors on any
device are accepted and copied to the CPU as float64: metrics are computed once per frame, off the
optimisation's hot path, so exactness matters more than speed.
"""

from __future__ import annotations

import itertools
import resource
import sys
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy import ndimage, sparse
from scipy.sparse.csgraph import dijkstra
from scipy.spatial import cKDTree

from tracker.errors import TrackerError

M_TO_MM = 1000.0
# Outer eye corners in the 68-point iBUG layout (0-based), the usual inter-ocular normaliser.
IBUG68_OUTER_EYE_CORNERS = (36, 45)


def as_numpy(x: np.ndarray | torch.Tensor | Sequence[float]) -> np.ndarray:
    """Any array-like (torch tensor on any device included) -> float64 numpy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------
# Alignment and 3D vertex errors
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimilarityTransform:
    """x -> scale * rotation @ x + translation. rotation: (3, 3) proper (det +1); translation: (3,)."""

    rotation: np.ndarray
    translation: np.ndarray
    scale: float = 1.0

    def apply(self, points: np.ndarray) -> np.ndarray:
        """(..., 3) -> (..., 3)."""
        return self.scale * as_numpy(points) @ self.rotation.T + self.translation


def umeyama_alignment(
    source: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    weights: np.ndarray | torch.Tensor | None = None,
    with_scale: bool = False,
) -> SimilarityTransform:
    """Least-squares rigid (or similarity) transform taking source points onto target points (Umeyama 1991).

    Minimises sum_i w_i ||s R source_i + t - target_i||^2 over proper rotations R, t and (optionally) s > 0.

    Args:
        source: (N, D) points. target: (N, D) corresponding points. weights: (N,) non-negative, or None.
        with_scale: fit the scale s as well (similarity Procrustes); otherwise s = 1.
    """
    src, dst = as_numpy(source), as_numpy(target)
    w = np.ones(len(src)) if weights is None else as_numpy(weights)
    if src.shape != dst.shape or src.ndim != 2 or w.shape != (len(src),):
        raise TrackerError(f"alignment needs matching (N, D) point sets and (N,) weights, got "
                           f"{src.shape}, {dst.shape}, {w.shape}")
    w = w / w.sum()
    src_mean, dst_mean = w @ src, w @ dst
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = (dst_c * w[:, None]).T @ src_c  # (D, D)
    u, singular, vt = np.linalg.svd(covariance)
    # Flip the weakest axis if the best orthogonal fit is a reflection.
    signs = np.ones(len(singular))
    signs[-1] = -1.0 if np.linalg.det(u) * np.linalg.det(vt) < 0 else 1.0
    rotation = (u * signs) @ vt
    scale = float((singular * signs).sum() / (w @ (src_c ** 2).sum(1))) if with_scale else 1.0
    return SimilarityTransform(rotation, dst_mean - scale * rotation @ src_mean, scale)


def vertex_error_mm(
    pred_vertices: np.ndarray | torch.Tensor,
    gt_vertices: np.ndarray | torch.Tensor,
    vertex_indices: np.ndarray | Sequence[int] | None = None,
    alignment: Literal["none", "rigid", "similarity"] = "none",
) -> np.ndarray:
    """Mean per-vertex Euclidean error per frame, in millimetres.

    Args:
        pred_vertices, gt_vertices: (F, V, 3) or (V, 3), in metres.
        vertex_indices: (K,) region to evaluate (e.g. the FLAME face mask); all vertices when None.
        alignment: "none", "rigid" or "similarity": per frame, the prediction's region is first aligned
            to the ground truth's region (Umeyama), which removes pose (and scale) errors.
    Returns:
        (F,) errors in mm ((1,) for a single frame).
    """
    pred = as_numpy(pred_vertices)
    pred = pred.reshape(-1, *pred.shape[-2:])
    gt = as_numpy(gt_vertices).reshape(pred.shape)
    if vertex_indices is not None:
        idx = np.asarray(vertex_indices, dtype=np.int64)
        pred, gt = pred[:, idx], gt[:, idx]
    if alignment not in ("none", "rigid", "similarity"):
        raise TrackerError(f"unknown alignment '{alignment}' (use none, rigid or similarity)")
    if alignment != "none":
        pred = np.stack([umeyama_alignment(p, g, with_scale=alignment == "similarity").apply(p)
                         for p, g in zip(pred, gt, strict=True)])
    return np.linalg.norm(pred - gt, axis=-1).mean(-1) * M_TO_MM


def temporal_jitter_mm(
    vertices: np.ndarray | torch.Tensor,
    segments: Sequence[tuple[int, int]] | None = None,
    vertex_indices: np.ndarray | Sequence[int] | None = None,
) -> float:
    """Mean vertex acceleration ||v_t - 2 v_{t-1} + v_{t-2}|| over static segments, in mm per frame^2.

    Args:
        vertices: (F, V, 3) tracked vertices in metres.
        segments: half-open frame ranges [start, stop) in which the head is static; the whole sequence when
            None. Only accelerations with all three frames inside one segment count.
        vertex_indices: (K,) vertices to evaluate; all when None.
    """
    verts = as_numpy(vertices)
    if vertex_indices is not None:
        verts = verts[:, np.asarray(vertex_indices, dtype=np.int64)]
    accelerations = [
        np.linalg.norm(verts[start + 2:stop] - 2 * verts[start + 1:stop - 1] + verts[start:stop - 2], axis=-1)
        for start, stop in (segments if segments is not None else [(0, len(verts))])
        if stop - start >= 3
    ]
    if not accelerations:
        raise TrackerError("jitter needs a segment of at least 3 frames")
    return float(np.concatenate([a.reshape(-1) for a in accelerations]).mean() * M_TO_MM)


# ----------------------------------------------------------------------------------------------------------
# 2D errors and parameter errors
# ----------------------------------------------------------------------------------------------------------


def reprojection_error_px(
    pred_points: np.ndarray | torch.Tensor,
    gt_points: np.ndarray | torch.Tensor,
    visible: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray:
    """Mean 2D distance per frame, in pixels (e.g. projected vertices vs. tracked ground-truth points).

    Args:
        pred_points, gt_points: (F, N, 2) or (N, 2) pixel positions.
        visible: (F, N) or (N,) bool, points that count; all when None.
    Returns:
        (F,) mean error over the visible points of each frame (NaN for a frame with none).
    """
    pred = as_numpy(pred_points)
    pred = pred.reshape(-1, *pred.shape[-2:])
    dist = np.linalg.norm(pred - as_numpy(gt_points).reshape(pred.shape), axis=-1)  # (F, N)
    mask = np.ones(dist.shape, bool) if visible is None else as_numpy(visible).reshape(dist.shape) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return (dist * mask).sum(-1) / mask.sum(-1)


def landmark_nme(
    pred_landmarks: np.ndarray | torch.Tensor,
    gt_landmarks: np.ndarray | torch.Tensor,
    normaliser: np.ndarray | torch.Tensor | float | None = None,
    eye_corner_indices: tuple[int, int] = IBUG68_OUTER_EYE_CORNERS,
) -> np.ndarray:
    """Landmark NME per frame: mean point error divided by the inter-ocular distance (outer eye corners).

    Args:
        pred_landmarks, gt_landmarks: (F, L, 2) or (L, 2), pixels.
        normaliser: (F,) or scalar explicit normalising distance; when None, the ground-truth distance between
            the landmarks `eye_corner_indices` (36 and 45 for the 68-point iBUG order).
    Returns:
        (F,) NME as a fraction (multiply by 100 for %).
    """
    gt = as_numpy(gt_landmarks)
    gt = gt.reshape(-1, *gt.shape[-2:])
    errors = np.linalg.norm(as_numpy(pred_landmarks).reshape(gt.shape) - gt, axis=-1).mean(-1)
    if normaliser is None:
        left, right = eye_corner_indices
        normaliser = np.linalg.norm(gt[:, left] - gt[:, right], axis=-1)
    return errors / as_numpy(normaliser)


def axis_angle_to_matrix(axis_angle: np.ndarray) -> np.ndarray:
    """Rodrigues: (..., 3) axis-angle -> (..., 3, 3) rotation matrices."""
    angle = np.linalg.norm(axis_angle, axis=-1, keepdims=True)[..., None]  # (..., 1, 1)
    k = axis_angle / np.maximum(angle[..., 0], 1e-12)
    zero = np.zeros_like(k[..., 0])
    skew = np.stack([zero, -k[..., 2], k[..., 1], k[..., 2], zero, -k[..., 0], -k[..., 1], k[..., 0], zero],
                    axis=-1).reshape(*k.shape[:-1], 3, 3)
    return np.eye(3) + np.sin(angle) * skew + (1 - np.cos(angle)) * skew @ skew


def rotation_angle_deg(
    pred_axis_angle: np.ndarray | torch.Tensor, gt_axis_angle: np.ndarray | torch.Tensor
) -> np.ndarray:
    """Geodesic distance between rotations: the angle of R_pred^T R_gt, in degrees.

    Args:
        pred_axis_angle, gt_axis_angle: (..., 3) axis-angle vectors (radians), e.g. global or jaw pose.
    Returns:
        (...,) angles in [0, 180].
    """
    pred_rot = axis_angle_to_matrix(as_numpy(pred_axis_angle))
    rel = np.swapaxes(pred_rot, -1, -2) @ axis_angle_to_matrix(as_numpy(gt_axis_angle))
    # atan2 of (sin, cos) stays accurate near 0 degrees, where arccos of the trace loses half the digits.
    cos = (np.trace(rel, axis1=-2, axis2=-1) - 1.0) / 2.0
    axis_sin = np.stack([rel[..., 2, 1] - rel[..., 1, 2], rel[..., 0, 2] - rel[..., 2, 0],
                         rel[..., 1, 0] - rel[..., 0, 1]], axis=-1) / 2.0
    return np.degrees(np.arctan2(np.linalg.norm(axis_sin, axis=-1), cos))


def coefficient_error(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> np.ndarray:
    """L2 distance between coefficient vectors (expression, shape), per frame: (F, K) or (K,) -> (F,)."""
    pred_np = as_numpy(pred)
    pred_np = pred_np.reshape(-1, pred_np.shape[-1])
    return np.linalg.norm(pred_np - as_numpy(gt).reshape(pred_np.shape), axis=-1)


# ----------------------------------------------------------------------------------------------------------
# Photometric metrics
# ----------------------------------------------------------------------------------------------------------


def _image_and_mask(
    image: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor | None
) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) or (H, W, C) image -> (H, W, C) float array and (H, W) bool mask."""
    img = as_numpy(image)
    img = img[..., None] if img.ndim == 2 else img
    valid = np.ones(img.shape[:2], bool) if mask is None else as_numpy(mask).reshape(img.shape[:2]) > 0
    if not valid.any():
        raise TrackerError("the photometric mask selects no pixel")
    return img, valid


def psnr(
    pred_image: np.ndarray | torch.Tensor,
    gt_image: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
    max_value: float = 1.0,
) -> float:
    """PSNR in dB over the masked pixels: 10 log10(max^2 / MSE), MSE over pixels and channels.

    Args:
        pred_image, gt_image: (H, W) or (H, W, C), values in [0, max_value].
        mask: (H, W) bool or {0, 1}; the whole image when None.
    """
    pred, valid = _image_and_mask(pred_image, mask)
    gt, _ = _image_and_mask(gt_image, None)
    mse = float(((pred - gt)[valid] ** 2).mean())
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(max_value ** 2 / mse))


def ssim_map(
    pred_image: np.ndarray | torch.Tensor,
    gt_image: np.ndarray | torch.Tensor,
    max_value: float = 1.0,
    sigma: float = 1.5,
) -> np.ndarray:
    """Per-pixel SSIM (Wang et al. 2004) with a Gaussian window (sigma 1.5, 11 taps), channels averaged.

    Args:
        pred_image, gt_image: (H, W) or (H, W, C), values in [0, max_value].
    Returns:
        (H, W) SSIM map; image borders are reflected.
    """
    x, _ = _image_and_mask(pred_image, None)
    y, _ = _image_and_mask(gt_image, None)
    c1, c2 = (0.01 * max_value) ** 2, (0.03 * max_value) ** 2
    truncate = 5.0 / sigma  # a 5 px radius (11 taps), as in the reference implementation

    def blur(image: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), truncate=truncate, mode="reflect")

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return score.mean(-1)


def ssim(
    pred_image: np.ndarray | torch.Tensor,
    gt_image: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
    max_value: float = 1.0,
) -> float:
    """Mean SSIM over the masked pixels (windows near the mask border also see the pixels outside it).

    Args:
        pred_image, gt_image: (H, W) or (H, W, C). mask: (H, W); the whole image when None.
    """
    _, valid = _image_and_mask(pred_image, mask)
    return float(ssim_map(pred_image, gt_image, max_value)[valid].mean())


# ----------------------------------------------------------------------------------------------------------
# Dense correspondence (DensePose-style) on mesh geodesics
# ----------------------------------------------------------------------------------------------------------


def mesh_edge_graph(vertices: np.ndarray | torch.Tensor, faces: np.ndarray | torch.Tensor) -> sparse.csr_matrix:
    """Symmetric (V, V) sparse graph of the mesh edges weighted by their Euclidean length."""
    verts, tris = as_numpy(vertices), as_numpy(faces).astype(np.int64)
    edges = np.unique(np.sort(np.concatenate([tris[:, [0, 1]], tris[:, [1, 2]], tris[:, [2, 0]]]), axis=1), axis=0)
    lengths = np.linalg.norm(verts[edges[:, 0]] - verts[edges[:, 1]], axis=1)
    graph = sparse.coo_matrix((lengths, (edges[:, 0], edges[:, 1])), shape=(len(verts), len(verts)))
    return (graph + graph.T).tocsr()


def geodesic_distances(
    vertices: np.ndarray | torch.Tensor,
    faces: np.ndarray | torch.Tensor,
    sources: np.ndarray | Sequence[int],
    targets: np.ndarray | Sequence[int] | None = None,
) -> np.ndarray:
    """Approximate geodesic distances: shortest paths along mesh edges (Dijkstra), in mesh units.

    Edge paths overestimate true surface geodesics by a few percent on irregular triangulations; exact along
    straight edge chains. Vertices in another connected component (e.g. FLAME eyeballs) are at +inf.

    Args:
        sources: (S,) vertex indices. targets: (T,) vertex indices; all vertices when None.
    Returns:
        (S, T) or (S, V) distances.
    """
    dist = dijkstra(mesh_edge_graph(vertices, faces), directed=False, indices=np.asarray(sources, np.int64))
    return dist if targets is None else dist[:, np.asarray(targets, dtype=np.int64)]


def paired_geodesic_distances(
    vertices: np.ndarray | torch.Tensor,
    faces: np.ndarray | torch.Tensor,
    pred_vertex: np.ndarray | Sequence[int],
    gt_vertex: np.ndarray | Sequence[int],
    sources_per_batch: int = 256,
) -> np.ndarray:
    """Geodesic distance between matched vertices, pred_vertex[i] to gt_vertex[i]: (N,) in mesh units.

    Dijkstra runs once per distinct ground-truth vertex, in batches to bound memory.
    """
    pred_idx, gt_idx = np.asarray(pred_vertex, np.int64), np.asarray(gt_vertex, np.int64)
    graph = mesh_edge_graph(vertices, faces)
    unique_gt, inverse = np.unique(gt_idx, return_inverse=True)
    out = np.empty(len(gt_idx))
    for start in range(0, len(unique_gt), sources_per_batch):
        batch = unique_gt[start:start + sources_per_batch]
        dist = dijkstra(graph, directed=False, indices=batch)  # (B, V)
        rows = inverse - start
        in_batch = (rows >= 0) & (rows < len(batch))
        out[in_batch] = dist[rows[in_batch], pred_idx[in_batch]]
    return out


def nearest_vertex(query_coords: np.ndarray | torch.Tensor, vertex_coords: np.ndarray | torch.Tensor) -> np.ndarray:
    """Index of the vertex whose coordinates are nearest, e.g. per-pixel predicted canonical coordinates
    (N, D) matched against the canonical coordinates of the mesh vertices (V, D) -> (N,) int."""
    _, idx = cKDTree(as_numpy(vertex_coords)).query(as_numpy(query_coords), k=1)
    return idx


def correct_point_ratio(geodesic_errors: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Fraction of points whose geodesic error is <= each threshold: (N,), (K,) -> (K,)."""
    errors = as_numpy(geodesic_errors)
    return (errors[None, :] <= as_numpy(thresholds)[:, None]).mean(axis=1)


def geodesic_point_similarity(geodesic_errors: np.ndarray, kappa: float) -> float:
    """GPS = mean exp(-g^2 / (2 kappa^2)) over points (DensePose); kappa in the units of the errors."""
    errors = as_numpy(geodesic_errors)
    return float(np.exp(-errors ** 2 / (2.0 * kappa ** 2)).mean())


# ----------------------------------------------------------------------------------------------------------
# Binning and summaries
# ----------------------------------------------------------------------------------------------------------


def finite_median(values: np.ndarray | torch.Tensor | Sequence[float]) -> float:
    """Median of the finite values (NaN when there are none): per-frame metrics mark unmeasured frames NaN."""
    vals = as_numpy(values).reshape(-1)
    finite = vals[np.isfinite(vals)]
    return float(np.median(finite)) if finite.size else float("nan")


@dataclass(frozen=True)
class BinSummary:
    """Per-frame values falling into [lower, upper) (the last bin includes upper)."""

    lower: float
    upper: float
    count: int
    mean: float
    p95: float


def bin_by_abs_yaw(
    values: np.ndarray | torch.Tensor,
    yaw_deg: np.ndarray | torch.Tensor,
    edges: Sequence[float] = (0.0, 30.0, 45.0, 90.0),
) -> list[BinSummary]:
    """Summarise per-frame values by |yaw| bins: count, mean and 95th percentile (NaN for empty bins).

    Args:
        values: (F,) per-frame metric. yaw_deg: (F,) head yaw in degrees (sign ignored).
        edges: increasing bin edges; frames with |yaw| beyond the last edge are left out.
    """
    vals, yaw = as_numpy(values), np.abs(as_numpy(yaw_deg))
    summaries = []
    for i, (lower, upper) in enumerate(itertools.pairwise(edges)):
        last = i == len(edges) - 2
        inside = (yaw >= lower) & ((yaw <= upper) if last else (yaw < upper))
        selected = vals[inside]
        summaries.append(BinSummary(
            float(lower), float(upper), int(inside.sum()),
            float(selected.mean()) if len(selected) else float("nan"),
            float(np.percentile(selected, 95)) if len(selected) else float("nan"),
        ))
    return summaries


# ----------------------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimingStats:
    """Seconds per frame: mean, median, 95th percentile, and throughput in frames per second."""

    frames: int
    mean_s: float
    median_s: float
    p95_s: float
    fps: float


def timing_stats(seconds_per_frame: Sequence[float] | np.ndarray) -> TimingStats:
    """Summarise per-frame wall-clock times (seconds)."""
    secs = as_numpy(seconds_per_frame)
    if secs.size == 0:
        raise TrackerError("no frame timings to summarise")
    return TimingStats(len(secs), float(secs.mean()), float(np.median(secs)), float(np.percentile(secs, 95)),
                       float(len(secs) / secs.sum()) if secs.sum() > 0 else float("inf"))


@dataclass
class PeakMemory:
    """Filled in when a `track_peak_memory` block ends.

    python_heap_mb: peak of Python allocations in the block (tracemalloc; numpy buffers included, torch CPU
    tensors not). process_rss_mb: the process's peak resident size since it started (ru_maxrss; it cannot be
    reset, so it also covers what ran before the block). cuda_mb: peak CUDA memory allocated by torch in the
    block, None without CUDA. seconds: wall-clock duration of the block.
    """

    python_heap_mb: float = float("nan")
    process_rss_mb: float = float("nan")
    cuda_mb: float | None = None
    seconds: float = float("nan")


def process_peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 ** 2 if sys.platform == "darwin" else 1024.0)


@contextmanager
def track_peak_memory(device: torch.device | str | None = None) -> Iterator[PeakMemory]:
    """Measure peak memory and duration of a block: `with track_peak_memory("cuda") as peak: ...`.

    CUDA memory is tracked when `device` is a CUDA device (its peak counter is reset on entry).
    """
    result = PeakMemory()
    cuda = device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started_tracing = not tracemalloc.is_tracing()
    if started_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.perf_counter()
    try:
        yield result
    finally:
        if cuda:
            torch.cuda.synchronize(device)
            result.cuda_mb = torch.cuda.max_memory_allocated(device) / 1024.0 ** 2
        result.seconds = time.perf_counter() - start
        result.python_heap_mb = tracemalloc.get_traced_memory()[1] / 1024.0 ** 2
        if started_tracing:
            tracemalloc.stop()
        result.process_rss_mb = process_peak_rss_mb()
