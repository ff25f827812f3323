"""Scoring a track of a real video, which has no 3D truth.

- Landmark NME against reference detectors: MediaPipe and dlib-68 are run on the same frames, and the tracked
  mesh's landmarks of each detector's scheme (FLAME embeddings) are projected and compared with them. The
  held-out NME is the one against the detector the tracker did not use (dlib for a MediaPipe track,
  MediaPipe for a dlib track); the other shows how closely the fit follows its own input. The detectors
  disagree a little by definition (jaw contour, lip line), so the numbers have a floor above zero; they rank
  configurations, they are not absolute accuracies. Compare held-out NMEs only between tracks made with the
  same detector (they are scored against the same reference).
- Photometric PSNR / SSIM in the face region (eval.photometric).
- Jaw outline (eval.real.jaw): dlib's jaw points 0-16 to the tracked mesh's projected jaw/cheek outline (point
  to curve) and its inner points 17-67 to the mesh's landmarks, in inter-ocular distances (`jaw_iod`,
  `inner51_iod`). dlib is held out for MediaPipe tracks; for dlib tracks the inner points are the fit's input.
- Jitter: mean vertex acceleration of the tracked face over runs of valid frames. Real heads move, so this
  mixes true motion with jitter; compare configurations on the same clip.
- Valid-frame ratio and speed come from the run's summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval.metrics import landmark_nme, temporal_jitter_mm
from eval.photometric import PhotometricOptions, frames_needed, photometric_scores
from eval.real.jaw import ContourMesh, jaw_scores
from eval.synthetic.evaluate import landmark_box_size
from eval.synthetic.uvmap import UvAtlas
from eval.tracked import TrackedSequence
from tracker.detect.base import SCHEME_IBUG68, SCHEME_MEDIAPIPE, LandmarkTrack, make_detector
from tracker.detect.sequence import detect_video
from tracker.fit.sequence import valid_runs
from tracker.flame.landmarks import LandmarkSet, load_landmark_set
from tracker.flame.model import FlameModel
from tracker.io.video import FrameSelection, read_frames

REFERENCE_DETECTORS = {"mediapipe": SCHEME_MEDIAPIPE, "dlib": SCHEME_IBUG68}
"""Detectors the tracked landmarks are scored against, with their landmark schemes."""
HELD_OUT = {"mediapipe": "dlib", "dlib": "mediapipe", "fan": "mediapipe"}
"""Tracking detector -> the reference detector it never saw."""


@dataclass
class VideoScores:
    """Per-frame metrics (T values, NaN where not measured) and per-video ones."""

    name: str
    per_frame: dict[str, np.ndarray]
    jitter_mm: float
    valid_ratio: float
    heldout_detector: str
    heldout_points: np.ndarray
    """(T, L, 2) the held-out detector's landmarks compared against (NaN where it found no face)."""


def detector_landmarks(video: Path, detector_name: str, selection: FrameSelection, cache_dir: Path) -> LandmarkTrack:
    """A reference detector's landmarks on the selected frames (cached per video and settings)."""
    detector = make_detector(detector_name)
    try:
        return detect_video(video, detector, selection, cache_dir=cache_dir)
    finally:
        if hasattr(detector, "close"):  # MediaPipe's native graph must be closed
            detector.close()


def landmark_agreement(reference: LandmarkTrack, tracked: TrackedSequence, vertices: torch.Tensor,
                       landmarks: LandmarkSet) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame NME (box-normalised) between the tracked mesh's landmarks of the reference's scheme and the
    reference detections, and those detections (T, L, 2); NaN where either side has no face."""
    row_of = {int(f): t for t, f in enumerate(reference.frame_indices)}
    rows = np.array([row_of.get(int(f), -1) for f in tracked.frame_index])
    found = (rows >= 0) & reference.valid[rows.clip(min=0)]
    points = np.where(found[:, None, None], reference.points[rows.clip(min=0)][:, landmarks.detector_index.numpy()],
                      np.nan)
    nme = np.full(len(rows), np.nan)
    scored = found & tracked.valid
    if scored.any():
        predicted = tracked.landmarks_2d(vertices, landmarks)
        nme[scored] = landmark_nme(predicted[scored], points[scored], normaliser=landmark_box_size(points[scored]))
    return nme, points


@torch.no_grad()
def score_video(video: Path, tracked: TrackedSequence, tracking_detector: str, model: FlameModel,
                assets_dir: Path, face_ids: np.ndarray, atlas: UvAtlas, selection: FrameSelection,
                cache_dir: Path, photometric: PhotometricOptions, outline: ContourMesh) -> VideoScores:
    """All metrics of one tracked real video. selection: the frames that were tracked; outline: where the
    model's jaw outline can lie (ContourMesh.build)."""
    vertices = tracked.vertices(model)
    per_frame: dict[str, np.ndarray] = {"valid": tracked.valid.astype(float)}
    points, landmark_sets = {}, {}
    for name, scheme in REFERENCE_DETECTORS.items():
        landmark_sets[name] = load_landmark_set(scheme, assets_dir, model.faces.cpu().numpy())
        reference = detector_landmarks(video, name, selection, cache_dir)
        per_frame[f"nme_vs_{name}"], points[name] = landmark_agreement(reference, tracked, vertices,
                                                                       landmark_sets[name])
    per_frame.update(jaw_scores(tracked, vertices, outline, landmark_sets["dlib"], points["dlib"]))
    heldout = HELD_OUT[tracking_detector]
    per_frame["nme_heldout"] = per_frame[f"nme_vs_{heldout}"]
    texture_rows, eval_rows = frames_needed(tracked.valid, photometric)
    wanted = {int(tracked.frame_index[t]): t for t in set(texture_rows.tolist()) | set(eval_rows.tolist())}
    frames = {wanted[f.index]: f.rgb for f in read_frames(video, selection) if f.index in wanted}
    psnr_values, ssim_values = photometric_scores(atlas, vertices, tracked.camera, frames, tracked.valid,
                                                  face_ids, photometric)
    runs = valid_runs(tracked.valid, min_length=3)
    face = torch.as_tensor(face_ids)
    jitter = temporal_jitter_mm(vertices[:, face], runs) if runs else float("nan")
    per_frame.update(psnr_db=psnr_values, ssim=ssim_values)
    return VideoScores(video.stem, per_frame, jitter, float(tracked.valid.mean()), heldout, points[heldout])
