"""Reference rows that give a synthetic accuracy number its meaning, scored on the same frames as a track.

- `mean_face`: shape = 0 with the true pose, expression, jaw, eyes, eyelids and camera: what a tracker that
  knew everything but the identity would score. A fitted identity must beat it.
- `zero_expression`: the true shape with expression = 0 (true pose, jaw, eyes, eyelids, camera): the share of
  the error that expressions carry.
- `exact_landmarks`: the tracker's own landmark stage (keyframe identity and focal, frame-by-frame tracking,
  the same config as the track) fed the true mesh's landmarks of the detector's scheme projected exactly by the
  true camera, every point of every frame (a detector also predicts hidden points): the track with the
  detector removed. What it misses comes from the fitting, not from the detections.

`SequenceScorer` scores any of them, and the track itself, with the same metrics (`RowScores`): medians over
frames of the face-region vertex error after per-frame rigid alignment (also by |yaw| bin), of the 2D
reprojection of the face vertices the true camera sees, and of the camera-space error without alignment; the
focal length error; the jitter (vertex acceleration) of the face on frames where the head does not move, beside
the truth's own jitter on those frames (talking faces move while the head stays still); and the share of frames
the tracker reported lost. Every frame counts, lost ones included (the tracker fills them from neighbours).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from eval.metrics import finite_median, temporal_jitter_mm
from eval.synthetic.evaluate import vertex_scores, visible_vertices
from eval.synthetic.generate import GroundTruth
from eval.tracked import TrackedSequence, head_yaw_deg, resized_params
from tracker.camera import Camera
from tracker.config import TrackerConfig, config_to_dict
from tracker.detect.base import POINTS_PER_SCHEME, LandmarkTrack
from tracker.flame.assets import load_flame_bundle
from tracker.flame.landmarks import LandmarkSet
from tracker.flame.model import FlameModel
from tracker.pipeline import SCHEME_OF_DETECTOR, fit_known_track, landmark_problem, seed_everything

ROW_LABELS = {
    "tracker": "tracker",
    "mean_face": "mean face (shape 0), true pose, expression, camera",
    "zero_expression": "true shape, expression 0",
    "exact_landmarks": "landmark stage fed exact landmarks",
}
"""Row name -> what it is, in table order."""
YAW_BINS: dict[str, tuple[float, float]] = {"<30": (0.0, 30.0), "30-60": (30.0, 60.0), ">60": (60.0, 180.0)}
"""|yaw| bins (degrees, [lower, upper)) of the rigidly aligned face error."""
STILL_TOLERANCE = 1e-6
"""A frame's head pose equal to the previous one's within this (radians, metres) counts as not moving."""


def mean_face(gt: GroundTruth) -> TrackedSequence:
    """The truth with shape = 0."""
    params = gt.params.map(lambda t: t.clone())
    params.shape = torch.zeros_like(params.shape)
    return TrackedSequence(params, gt.camera, np.arange(gt.n_frames), np.ones(gt.n_frames, bool))


def zero_expression(gt: GroundTruth) -> TrackedSequence:
    """The truth with expression = 0 (jaw, eyes and eyelids stay true)."""
    params = gt.params.map(lambda t: t.clone())
    params.expr = torch.zeros_like(params.expr)
    return TrackedSequence(params, gt.camera, np.arange(gt.n_frames), np.ones(gt.n_frames, bool))


@torch.no_grad()
def exact_landmark_track(gt: GroundTruth, model: FlameModel, landmarks: LandmarkSet) -> LandmarkTrack:
    """The landmarks a perfect detector of `landmarks.scheme` would report: the true mesh's embedded points
    projected by the true camera, all of them in every frame (confidence 1; points the scheme does not embed
    are NaN, as for a detector whose points the tracker does not use)."""
    vertices = model(gt.params).vertices
    yaw = torch.from_numpy(head_yaw_deg(gt.params)).float()
    pixels = gt.camera.project(landmarks.full_positions(vertices, yaw))[0].numpy()
    T, n_points = gt.n_frames, POINTS_PER_SCHEME[landmarks.scheme]
    points = np.full((T, n_points, 2), np.nan, np.float32)
    confidence = np.zeros((T, n_points), np.float32)
    index = landmarks.detector_index.numpy()
    points[:, index], confidence[:, index] = pixels, 1.0
    return LandmarkTrack(landmarks.scheme, np.arange(T), np.arange(T) / gt.spec.fps, points, confidence,
                         np.ones(T, bool))


class _DiscardFrames:
    """Stands in for the tracker's output writer: the baseline keeps its result in memory only."""

    def add(self, *_args) -> None:
        pass


def fit_exact_landmarks(gt: GroundTruth, cfg: TrackerConfig, show_progress: bool = False) -> TrackedSequence:
    """The tracker's landmark stage (tracker.pipeline.fit_known_track, config `cfg`) on exact landmarks of the
    scheme of `cfg.detect.landmarks`; parameters sized like the ground truth's."""
    seed_everything(cfg.seed)
    scheme = SCHEME_OF_DETECTOR[cfg.detect.landmarks]
    bundle = load_flame_bundle(cfg.flame.path, cfg.flame.assets_dir, cfg.flame.n_shape, cfg.flame.n_expr, scheme,
                               cfg.flame.eyelids)
    truth = resized_params(gt.params, bundle.model.n_shape, bundle.model.n_expr)
    track = exact_landmark_track(replace(gt, params=truth), bundle.model, bundle.landmarks)
    device = torch.device(cfg.device)
    model, landmarks = bundle.model.to(device), bundle.landmarks.to(device)
    camera = Camera.from_image(gt.camera.height, gt.camera.width, cfg.camera.fov_prior_deg, cfg.camera.focal, device)
    problem = landmark_problem(track, model, landmarks, camera, cfg, scheme)[1]
    result = fit_known_track(problem, track, cfg, _DiscardFrames(), {}, show_progress)
    fitted_camera = Camera(problem.camera.focal.detach().cpu(), camera.center.cpu(), camera.height, camera.width)
    params = resized_params(result.params, gt.params.shape.shape[1], gt.params.expr.shape[1])
    return TrackedSequence(params, fitted_camera, track.frame_indices, result.valid.copy())


def landmark_stage_key(cfg: TrackerConfig) -> str:
    """What the landmark stage's result depends on (the config less outputs, frame range and later stages):
    equal keys give equal exact-landmark fits."""
    values = config_to_dict(cfg)
    for unused in ("output", "video", "photometric", "densemarks"):
        values.pop(unused, None)
    return json.dumps(values, sort_keys=True, default=str)


def head_still_runs(gt: GroundTruth, min_length: int = 3) -> list[tuple[int, int]]:
    """Half-open frame ranges, at least min_length long, over which the head pose (rotation, neck,
    translation) does not change; the face may (a static talking head)."""
    p = gt.params
    pose = torch.cat([p.rotation, p.neck_pose, p.translation], dim=1).double().numpy()
    still = np.abs(np.diff(pose, axis=0)).max(1) <= STILL_TOLERANCE  # frame t+1 equals frame t
    runs, start = [], 0
    for t in range(1, gt.n_frames + 1):
        if t == gt.n_frames or not still[t - 1]:
            if t - start >= min_length:
                runs.append((start, t))
            start = t
    return runs


@dataclass
class RowScores:
    """One row of the comparison (medians over all frames of the sequence)."""

    name: str
    v2v_rigid_mm: float
    """Face-region vertex error after per-frame rigid alignment, median over frames (mm)."""
    v2v_rigid_by_yaw: dict[str, float]
    """The same, median within each |yaw| bin of YAW_BINS (NaN for an empty bin)."""
    reproj_px: float
    """2D error of the face vertices the true camera sees, each mesh through its own camera, median (px)."""
    focal_error_pct: float
    """Focal length relative to the true one, minus 1 (%)."""
    v2v_mm: float
    """Face-region vertex error in camera space, no alignment, median (mm)."""
    jitter_mm: float
    """Mean face-vertex acceleration over the frames where the head does not move (mm/frame^2)."""
    truth_jitter_mm: float
    """The truth's own acceleration over those frames (0 unless the face moves)."""
    lost_pct: float
    """Frames the tracker reported without a face (%)."""
    per_frame: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "per_frame"}


class SequenceScorer:
    """Scores tracks of one synthetic sequence; the truth's vertices and visibility are computed once."""

    @torch.no_grad()
    def __init__(self, gt: GroundTruth, model: FlameModel, face_ids: np.ndarray):
        self.gt, self.model = gt, model
        self.face = torch.as_tensor(face_ids)
        vertices = model(gt.params).vertices
        self.gt_face = vertices[:, self.face]
        self.seen = visible_vertices(vertices, model.faces, gt.camera)[:, face_ids]
        self.yaw = np.abs(gt.yaw_deg)
        self.runs = head_still_runs(gt)
        self.truth_jitter = temporal_jitter_mm(self.gt_face, self.runs) if self.runs else float("nan")

    @torch.no_grad()
    def score(self, name: str, tracked: TrackedSequence) -> RowScores:
        if len(tracked.frame_index) != self.gt.n_frames:
            raise ValueError(f"{name}: {len(tracked.frame_index)} frames tracked, the truth has {self.gt.n_frames}")
        pred_face = tracked.vertices(self.model)[:, self.face]
        per_frame = vertex_scores(self.gt_face, self.gt.camera, pred_face, tracked.camera, self.seen)
        rigid = per_frame["v2v_rigid_mm"]
        by_yaw = {label: finite_median(rigid[(self.yaw >= lo) & (self.yaw < hi)])
                  for label, (lo, hi) in YAW_BINS.items()}
        return RowScores(
            name=name, v2v_rigid_mm=finite_median(rigid), v2v_rigid_by_yaw=by_yaw,
            reproj_px=finite_median(per_frame["reproj_px"]),
            focal_error_pct=100.0 * float(tracked.camera.focal / self.gt.camera.focal - 1.0),
            v2v_mm=finite_median(per_frame["v2v_mm"]),
            jitter_mm=temporal_jitter_mm(pred_face, self.runs) if self.runs else float("nan"),
            truth_jitter_mm=self.truth_jitter, lost_pct=100.0 * float(1.0 - tracked.valid.mean()),
            per_frame={**per_frame, "valid": tracked.valid.astype(float), "yaw_deg": self.gt.yaw_deg},
        )

    def baseline_rows(self, exact_landmarks: TrackedSequence | None) -> list[RowScores]:
        """Mean face, zero expression and (when given) the exact-landmark fit, in ROW_LABELS order."""
        rows = [self.score("mean_face", mean_face(self.gt)), self.score("zero_expression", zero_expression(self.gt))]
        if exact_landmarks is not None:
            rows.append(self.score("exact_landmarks", exact_landmarks))
        return rows
