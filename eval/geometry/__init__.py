"""Geometry benchmarks for users who have the data: NoW scan-to-mesh errors and multi-view reprojection.

Modules: mesh_io (OBJ/PLY/landmark files), mesh_distance (exact point-to-surface distances), dataset
(GeometryDataset protocol, NoW layout), now (the NoW protocol; command line: `python -m eval.geometry`), multiview
(calibrated-camera reprojection error and silhouette IoU).
"""

from eval.geometry.dataset import GeometryDataset, GeometrySample, NowDataset, load_now_prediction, save_now_prediction
from eval.geometry.mesh_distance import SurfaceIndex, SurfaceProjection, closest_points_on_mesh
from eval.geometry.multiview import (
    PinholeCamera,
    multiview_reprojection_errors,
    multiview_silhouette_ious,
    project_points,
    render_silhouette,
    silhouette_iou,
)
from eval.geometry.now import (
    ErrorSummary,
    NowOptions,
    NowSampleResult,
    cumulative_error_curve,
    evaluate_now,
    now_scan_to_mesh_errors,
    summarise_errors,
)

__all__ = [
    "ErrorSummary", "GeometryDataset", "GeometrySample", "NowDataset", "NowOptions", "NowSampleResult",
    "PinholeCamera", "SurfaceIndex", "SurfaceProjection", "closest_points_on_mesh", "cumulative_error_curve",
    "evaluate_now", "load_now_prediction", "multiview_reprojection_errors", "multiview_silhouette_ious",
    "now_scan_to_mesh_errors", "project_points", "render_silhouette", "save_now_prediction", "silhouette_iou",
    "summarise_errors",
]
