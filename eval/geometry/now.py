"""The NoW benchmark protocol (Sanyal et al., CVPR 2019; github.com/soubhiksanyal/now_evaluation).

Per image: crop the ground-truth scan to a sphere around the face (from its 7 landmarks), align the
predicted mesh to the scan by a similarity transform on the 7 landmark pairs, refine that transform by
minimising the squared scan-to-mesh distances, and report each cropped scan vertex's distance to the
predicted mesh surface (scan units: millimetres). Errors of all images are pooled for the median, mean,
std and the cumulative error curve.

Differences to the reference code: the refinement minimises the same least-squares objective with
Gauss-Newton steps safeguarded by closed-form ICP steps instead of chumpy's dogleg solver, distances are
exact point-to-triangle distances computed here (no psbody/C++ build), and the landmark alignment never
reflects. The metrical variant fits a rigid transform to predictions scaled to millimetres.

The 7 landmarks, in file order: the outer and inner corner of one eye, the inner and outer corner of the
other (0-3), the bottom of the nose (4) and the two mouth corners (5, 6).

Command line: python -m eval.geometry NOW_ROOT PREDICTIONS_DIR (see eval/geometry/__main__.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.geometry.dataset import GeometryDataset, load_now_prediction
from eval.geometry.mesh_distance import SurfaceIndex, SurfaceProjection
from eval.geometry.mesh_io import load_mesh
from eval.metrics import SimilarityTransform, axis_angle_to_matrix, umeyama_alignment
from tracker.errors import TrackerError


@dataclass(frozen=True)
class NowOptions:
    """crop_*: the face sphere of the reference code. metrical: rigid fit (no scale) of predictions
    multiplied by `prediction_to_scan_scale` (1000 for metres -> mm). refine: run the scan-to-mesh refinement,
    stopping after `max_iterations` or when the mean squared distance improves by less than `tolerance`
    (relative)."""

    crop_radius_factor: float = 1.4
    crop_centre_factor: float = 0.3
    metrical: bool = False
    prediction_to_scan_scale: float = 1000.0
    refine: bool = True
    max_iterations: int = 100
    tolerance: float = 1e-6


@dataclass(frozen=True)
class NowSampleResult:
    """distances_mm: (M,) distance of each cropped scan vertex to the aligned prediction's surface.
    transform: prediction -> scan frame."""

    distances_mm: np.ndarray
    transform: SimilarityTransform


@dataclass(frozen=True)
class ErrorSummary:
    """Statistics of pooled scan-to-mesh distances in mm; count: number of distances."""

    median: float
    mean: float
    std: float
    count: int


def now_face_crop(scan_vertices: np.ndarray, scan_landmarks: np.ndarray, options: NowOptions = NowOptions()
                  ) -> np.ndarray:
    """Scan vertices inside NoW's face sphere: (N, 3), (7, 3) -> (N,) bool.

    The centre sits 30% of the way from the nose bottom to the midpoint of the inner eye corners; the
    radius is 1.4 times the mean of the outer-eye-corner distance and that nose length.
    """
    lmk = np.asarray(scan_landmarks, dtype=np.float64)
    nose_bottom, nose_bridge = lmk[4], (lmk[1] + lmk[2]) / 2.0
    centre = nose_bottom + options.crop_centre_factor * (nose_bridge - nose_bottom)
    radius = options.crop_radius_factor * (np.linalg.norm(lmk[0] - lmk[3]) +
                                           np.linalg.norm(nose_bridge - nose_bottom)) / 2.0
    return np.linalg.norm(np.asarray(scan_vertices) - centre, axis=1) <= radius


def _mean_squared_distance(scan_points: np.ndarray, surface: SurfaceIndex, transform: SimilarityTransform
                           ) -> tuple[float, SurfaceProjection]:
    """Objective of the refinement and the closest points, found in the mesh frame (scan mapped by T^-1)."""
    in_mesh_frame = (scan_points - transform.translation) @ transform.rotation / transform.scale
    projection = surface.project(in_mesh_frame)
    return float(np.mean((projection.distances * transform.scale) ** 2)), projection


def _gauss_newton_step(scan_points: np.ndarray, surface: SurfaceIndex, projection: SurfaceProjection,
                       transform: SimilarityTransform, with_scale: bool) -> SimilarityTransform:
    """One Gauss-Newton step on sum_i d_i^2, each distance linearised along its direction u_i.

    The mesh point y_i = T(closest_i) moves by the update y -> c + e^ds Rot(w)(y - c) + dt (c: scan centroid),
    so d_i changes by u_i . (w x (y_i - c) + ds (y_i - c) + dt). u_i is the face normal when d_i ~ 0.
    """
    closest = transform.apply(projection.points)  # (M, 3) in the scan frame
    offset = closest - scan_points
    dist = np.linalg.norm(offset, axis=1, keepdims=True)
    tri = surface.triangles[projection.face_index]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]) @ transform.rotation.T
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), np.finfo(float).tiny)
    has_direction = dist > 1e-9 * dist.max()
    u = np.where(has_direction, offset / np.where(has_direction, dist, 1.0), normals)
    centre = scan_points.mean(axis=0)
    arm = closest - centre
    columns = [np.cross(arm, u), u] + ([(u * arm).sum(1, keepdims=True)] if with_scale else [])
    jacobian = np.concatenate(columns, axis=1)  # (M, 6 or 7)
    step = np.linalg.lstsq(jacobian, -(u * offset).sum(1), rcond=None)[0]
    rotation = axis_angle_to_matrix(step[:3])
    scale = float(np.exp(step[6])) if with_scale else 1.0
    return SimilarityTransform(
        rotation=rotation @ transform.rotation,
        translation=centre + scale * rotation @ (transform.translation - centre) + step[3:6],
        scale=scale * transform.scale,
    )


def refine_alignment(
    scan_points: np.ndarray,
    surface: SurfaceIndex,
    initial: SimilarityTransform,
    with_scale: bool,
    max_iterations: int = 100,
    tolerance: float = 1e-6,
) -> SimilarityTransform:
    """Minimise mean_i dist(scan_i, T(mesh))^2 over similarity (or rigid) transforms T, starting at `initial`.

    Args:
        scan_points: (M, 3) target points. surface: the untransformed predicted mesh.
        initial: starting prediction -> scan transform.
    Each iteration tries a Gauss-Newton step (fast near the optimum) and falls back on the closed-form ICP
    step (refit T on the current closest-point pairs), which never increases the objective. Stops when the
    relative improvement drops below `tolerance` or the fit is exact to round-off.
    """
    transform = initial
    objective, projection = _mean_squared_distance(scan_points, surface, transform)
    # Below a billionth of the scan's size, distances are float64 round-off: a perfect fit.
    round_off = (1e-9 * np.linalg.norm(scan_points - scan_points.mean(axis=0), axis=1).max()) ** 2
    for _ in range(max_iterations):
        if objective <= round_off:
            break
        candidate = _gauss_newton_step(scan_points, surface, projection, transform, with_scale)
        candidate_objective, candidate_projection = _mean_squared_distance(scan_points, surface, candidate)
        if candidate_objective > objective:
            candidate = umeyama_alignment(projection.points, scan_points, with_scale=with_scale)
            candidate_objective, candidate_projection = _mean_squared_distance(scan_points, surface, candidate)
        converged = candidate_objective >= objective * (1.0 - tolerance)
        if candidate_objective <= objective:
            transform, objective, projection = candidate, candidate_objective, candidate_projection
        if converged:
            break
    return transform


def now_scan_to_mesh_errors(
    scan_vertices: np.ndarray,
    scan_landmarks: np.ndarray,
    pred_vertices: np.ndarray,
    pred_faces: np.ndarray,
    pred_landmarks: np.ndarray,
    options: NowOptions = NowOptions(),
) -> NowSampleResult:
    """NoW error of one prediction.

    Args:
        scan_vertices: (N, 3) ground-truth scan in mm. scan_landmarks: (7, 3) on the scan, NoW order.
        pred_vertices: (V, 3) predicted mesh (any unit unless metrical). pred_faces: (F, 3).
        pred_landmarks: (7, 3) the same 7 points on the prediction, same frame as pred_vertices.
    """
    scan = np.asarray(scan_vertices, dtype=np.float64)[now_face_crop(scan_vertices, scan_landmarks, options)]
    if len(scan) == 0:
        raise TrackerError("the NoW face crop holds no scan vertex: are the scan landmarks in the scan's frame?")
    pre_scale = options.prediction_to_scan_scale if options.metrical else 1.0
    vertices = pre_scale * np.asarray(pred_vertices, dtype=np.float64)
    landmarks = pre_scale * np.asarray(pred_landmarks, dtype=np.float64)
    transform = umeyama_alignment(landmarks, scan_landmarks, with_scale=not options.metrical)
    surface = SurfaceIndex(vertices, pred_faces)
    if options.refine:
        transform = refine_alignment(scan, surface, transform, with_scale=not options.metrical,
                                     max_iterations=options.max_iterations, tolerance=options.tolerance)
    _, projection = _mean_squared_distance(scan, surface, transform)
    distances = projection.distances * transform.scale
    # Report the transform of the prediction as given (the pre-scale folded in).
    return NowSampleResult(distances, SimilarityTransform(transform.rotation, transform.translation,
                                                          transform.scale * pre_scale))


def _pool(distances_mm: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """One array, or a list of per-image arrays, as one flat array."""
    if isinstance(distances_mm, np.ndarray):
        return distances_mm.ravel()
    return np.concatenate([np.ravel(d) for d in distances_mm]) if len(distances_mm) else np.zeros(0)


def summarise_errors(distances_mm: np.ndarray | Sequence[np.ndarray]) -> ErrorSummary:
    """Median, mean and std of the pooled distances (an array or a list of per-image arrays)."""
    pooled = _pool(distances_mm)
    if pooled.size == 0:
        raise TrackerError("no distances to summarise")
    return ErrorSummary(float(np.median(pooled)), float(pooled.mean()), float(pooled.std()), int(pooled.size))


def cumulative_error_curve(
    distances_mm: np.ndarray | Sequence[np.ndarray], max_error_mm: float = 8.0, num_thresholds: int = 801
) -> tuple[np.ndarray, np.ndarray]:
    """Percentage of pooled distances <= each threshold: thresholds (T,) in mm and percentages (T,)."""
    pooled = np.sort(_pool(distances_mm))
    thresholds = np.linspace(0.0, max_error_mm, num_thresholds)
    return thresholds, 100.0 * np.searchsorted(pooled, thresholds, side="right") / pooled.size


@dataclass(frozen=True)
class NowReport:
    """summary over all evaluated samples; per_sample: sample id -> (median, mean) in mm; missing: sample ids
    without a prediction."""

    summary: ErrorSummary
    per_sample: dict[str, tuple[float, float]]
    missing: list[str]
    distances_mm: list[np.ndarray]


def evaluate_now(dataset: GeometryDataset, predictions_dir: str | Path, options: NowOptions = NowOptions()
                 ) -> NowReport:
    """Run the protocol over a dataset whose predictions lie in NoW's layout under `predictions_dir`."""
    per_sample, missing, all_distances = {}, [], []
    scan_path, scan_vertices = None, None
    for sample in dataset:
        prediction = load_now_prediction(predictions_dir, sample.sample_id)
        if prediction is None:
            missing.append(sample.sample_id)
            continue
        if sample.scan_path != scan_path:  # images come grouped by subject: read each scan once
            scan_path, (scan_vertices, _) = sample.scan_path, load_mesh(sample.scan_path)
        result = now_scan_to_mesh_errors(scan_vertices, sample.scan_landmarks, *prediction, options=options)
        per_sample[sample.sample_id] = (float(np.median(result.distances_mm)), float(result.distances_mm.mean()))
        all_distances.append(result.distances_mm)
    if not all_distances:
        raise TrackerError(f"no prediction found under {predictions_dir} for any of {len(missing)} samples "
                           "(expected SUBJECT/CHALLENGE/IMAGE.obj and .npy)")
    return NowReport(summarise_errors(all_distances), per_sample, missing, all_distances)
