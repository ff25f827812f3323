"""Scoring a track of a synthetic sequence against its exact ground truth.

Per frame: face-region vertex error in mm without alignment and after rigid alignment (eval.metrics), 2D
reprojection error of the face vertices the ground-truth camera sees, 68-landmark NME, expression / jaw /
head rotation / gaze / eyelid errors, and photometric consistency (eval.photometric). Per sequence: jitter
(vertex acceleration) of the tracked face on the static segments, where the truth does not move at all.
Every frame counts, including those the tracker reported invalid (it fills them from neighbours): a missed
face is an error the user sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from eval.metrics import (
    coefficient_error,
    landmark_nme,
    reprojection_error_px,
    rotation_angle_deg,
    temporal_jitter_mm,
    vertex_error_mm,
)
from eval.photometric import PhotometricOptions, frames_needed, photometric_scores
from eval.synthetic.generate import GroundTruth
from eval.synthetic.uvmap import UvAtlas, depth_buffer, scaled_camera
from eval.tracked import TrackedSequence, head_rotation
from tracker.camera import Camera
from tracker.flame.landmarks import LandmarkSet
from tracker.flame.lbs import matrix_to_axis_angle
from tracker.flame.model import FlameModel
from tracker.io.video import read_frames

VISIBILITY_TOLERANCE_M = 0.004
"""A vertex counts as seen when it lies at most this far behind the rendered depth."""
VISIBILITY_SCALE = 0.5
"""The depth buffer for vertex visibility is rendered at this fraction of the image size (speed)."""


@dataclass
class SequenceScores:
    """Per-frame metrics (arrays of T values, NaN where not measured) and per-sequence ones."""

    name: str
    per_frame: dict[str, np.ndarray]
    jitter_mm: float
    valid_ratio: float
    static_frames: int
    segment_kinds: list[str]
    """Kind of each segment; per_frame["segment"] holds each frame's segment index."""
    focal_error_pct: float
    """Estimated focal length relative to the true one, percent (depth scales with it)."""


def landmark_box_size(points: np.ndarray) -> np.ndarray:
    """(T, L, 2) -> (T,) sqrt(width * height) of the landmarks' bounding box: an NME normaliser that stays
    meaningful in profile views, where the inter-ocular distance vanishes."""
    extent = points.max(1) - points.min(1)
    return np.sqrt(extent[:, 0] * extent[:, 1])


@torch.no_grad()
def visible_vertices(vertices: torch.Tensor, faces: torch.Tensor, camera: Camera) -> np.ndarray:
    """(T, V) bool: vertices in front of the depth buffer of their own frame (not hidden by the head)."""
    camera = scaled_camera(camera, VISIBILITY_SCALE)
    seen = []
    for verts in vertices:
        pixels, depth = camera.project(verts)
        zbuffer = depth_buffer(verts, faces, camera)
        col, row = pixels[:, 0].floor().long(), pixels[:, 1].floor().long()
        inside = (col >= 0) & (col < camera.width) & (row >= 0) & (row < camera.height)
        seen_depth = zbuffer[row.clamp(0, camera.height - 1), col.clamp(0, camera.width - 1)]
        seen.append((inside & (seen_depth > 0) & (depth <= seen_depth + VISIBILITY_TOLERANCE_M)).numpy())
    return np.stack(seen)


@torch.no_grad()
def vertex_scores(gt_verts: torch.Tensor, gt_camera: Camera, pred_verts: torch.Tensor, pred_camera: Camera,
                  seen: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame errors of a region's vertices (T, K, 3 world, metres): `v2v_mm` without alignment (the
    camera-space error: world and camera differ by a fixed rotation), `v2v_rigid_mm` after per-frame rigid
    alignment, and `reproj_px`, the 2D error over the vertices the true camera sees (seen: (T, K) bool), each
    mesh projected by its own camera."""
    return {
        "v2v_mm": vertex_error_mm(pred_verts, gt_verts),
        "v2v_rigid_mm": vertex_error_mm(pred_verts, gt_verts, alignment="rigid"),
        "reproj_px": reprojection_error_px(pred_camera.project(pred_verts)[0], gt_camera.project(gt_verts)[0], seen),
    }


def rotation_error_deg(pred: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    """Angle between (T, 3, 3) rotation matrices, degrees."""
    return rotation_angle_deg(matrix_to_axis_angle(pred.float()), matrix_to_axis_angle(gt.float()))


@torch.no_grad()
def score_sequence(gt: GroundTruth, tracked: TrackedSequence, model: FlameModel, face_ids: np.ndarray,
                   landmarks68: LandmarkSet, atlas: UvAtlas, video: str,
                   photometric: PhotometricOptions) -> SequenceScores:
    """All metrics of one tracked synthetic sequence. video: the frames the tracker saw (for PSNR/SSIM)."""
    T = gt.n_frames
    rows = tracked.frame_index
    if len(rows) != T or not np.array_equal(rows, np.arange(T)):
        raise ValueError(f"{gt.spec.name}: the track covers frames {rows.min()}..{rows.max()} ({len(rows)}), "
                         f"the ground truth 0..{T - 1}: score whole sequences only")
    gt_verts = model(gt.params).vertices
    pred_verts = tracked.vertices(model)
    face = torch.as_tensor(face_ids)
    per_frame: dict[str, np.ndarray] = {
        "yaw_deg": gt.yaw_deg,
        "segment": gt.segment.astype(float),
        "valid": tracked.valid.astype(float),
    }
    seen = visible_vertices(gt_verts, model.faces, gt.camera)[:, face_ids]
    per_frame.update(vertex_scores(gt_verts[:, face], gt.camera, pred_verts[:, face], tracked.camera, seen))
    gt_tracked = TrackedSequence(gt.params, gt.camera, np.arange(T), np.ones(T, bool))
    gt_lmk = gt_tracked.landmarks_2d(gt_verts, landmarks68)
    pred_lmk = tracked.landmarks_2d(pred_verts, landmarks68)
    per_frame["nme68"] = landmark_nme(pred_lmk, gt_lmk, normaliser=landmark_box_size(gt_lmk))
    p, g = tracked.params, gt.params
    per_frame["expr_l2"] = coefficient_error(p.expr, g.expr)
    per_frame["jaw_deg"] = rotation_angle_deg(p.jaw_pose, g.jaw_pose)
    per_frame["rot_deg"] = rotation_error_deg(head_rotation(p), head_rotation(g))
    per_frame["gaze_deg"] = (rotation_angle_deg(p.eyes_pose[:, :3], g.eyes_pose[:, :3]) +
                             rotation_angle_deg(p.eyes_pose[:, 3:], g.eyes_pose[:, 3:])) / 2
    per_frame["eyelid_abs"] = (p.eyelids - g.eyelids).abs().mean(1).numpy()
    usable = np.ones(T, bool)
    texture_rows, eval_rows = frames_needed(usable, photometric)
    wanted = set(texture_rows.tolist()) | set(eval_rows.tolist())
    frames = {f.index: f.rgb for f in read_frames(video) if f.index in wanted}
    per_frame["psnr_db"], per_frame["ssim"] = photometric_scores(
        atlas, pred_verts, tracked.camera, frames, usable, face_ids, photometric)
    segments = [(a, b) for a, b in gt.static_segments() if b - a >= 3]
    jitter = temporal_jitter_mm(pred_verts[:, face], segments) if segments else float("nan")
    focal_error = 100.0 * float(tracked.camera.focal / gt.camera.focal - 1.0)
    return SequenceScores(gt.spec.name, per_frame, jitter, float(tracked.valid.mean()), int(gt.static.sum()),
                          [s.kind for s in gt.spec.segments], focal_error)
