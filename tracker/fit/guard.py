"""A guard for image stages (DenseMarks, photometric): a refinement may not make a frame worse than the landmark
stage left it. Two guards: `guard_refinement` (landmark shift and the stage's own support; DenseMarks) and
`guard_error_growth` (growth of the landmark error; photometric).

An image stage refines the landmark track with evidence of its own (dense correspondences, pixels). When that
evidence is wrong (a corrupted map, a prediction from another frame, a crop in the wrong place), the refined fit
follows it away from everything else. The guard compares, per frame, the refined fit with the landmark fit:

- a frame whose refined fit moved its projected landmarks far from where the landmark fit put them (more than
  `max_landmark_shift` of the face size), without the stage's own evidence having overruled the detection, or
  whose stage evidence is too thin (`supported` false), keeps the landmark fit;
- when most of the refined frames disagree with their landmark fit that way (overruled detections included:
  `max_failed_fraction`), the stage's evidence disagrees with the landmarks everywhere: the whole refinement is
  dropped, with a warning.

Frames the landmark stage never fitted (no detection) have nothing to fall back to: they stay refined when
supported and are dropped (invalid again) otherwise. `valid` is then true exactly for the frames that hold a fit.

    result, report = guard_refinement(before, after, shift, supported, overruled, GuardConfig())
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from tracker.camera import Camera
from tracker.energy.base import Observations
from tracker.fit.solver import FRAME_FIELDS, Problem
from tracker.flame.model import FlameParams

if TYPE_CHECKING:  # tracker.fit.sequence reads the configuration, which holds GuardConfig
    from tracker.config import PhotometricGuardConfig
    from tracker.fit.sequence import TrackResult


@dataclass
class GuardConfig:
    max_landmark_shift: float = 0.1
    """A refined frame is suspect when its projected landmarks moved more than this fraction of the face size
    (mean over landmarks) from the landmark fit's."""
    max_failed_fraction: float = 0.5
    """When more than this fraction of the refined frames with a landmark fit fail the guard, the stage's
    evidence is taken to be wrong for the whole sequence: every frame keeps its landmark fit."""


@dataclass
class GuardReport:
    """What the guard did (goes into the stage's summary)."""

    frames_checked: int
    """Refined frames that had a landmark fit to compare with."""
    frames_kept_landmark_fit: int
    """Of those, frames that fell back to the landmark fit."""
    frames_dropped: int
    """Frames without a landmark fit whose refinement was unsupported (left invalid)."""
    sequence_fallback: bool
    """The whole refinement was dropped (most frames failed)."""
    failed_frames: list[int]
    """Indices (in the track) of the frames that fell back or were dropped."""

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def landmark_shift(problem: Problem, before: FlameParams, after: FlameParams, obs: Observations,
                   before_camera: Camera | None = None, after_camera: Camera | None = None) -> np.ndarray:
    """(T,) mean distance between the landmarks projected from two fits of the same frames (each through its own
    camera, default the problem's), as a fraction of each frame's face size (obs.face_size)."""
    moved = (problem.evaluation(after, obs, camera=after_camera).landmarks_2d
             - problem.evaluation(before, obs, camera=before_camera).landmarks_2d)
    return (moved.norm(dim=-1).mean(-1) / obs.face_size.clamp(min=1.0)).cpu().numpy()


def guard_refinement(before: TrackResult, after: TrackResult, shift: np.ndarray, supported: np.ndarray,
                     overruled: np.ndarray | None = None, cfg: GuardConfig = GuardConfig(),
                     stage: str = "image stage",
                     refit: Callable[[np.ndarray], FlameParams] | None = None) -> tuple[TrackResult, GuardReport]:
    """The refined track with unsafe frames replaced by the landmark fit (see the module docstring).

    before: the landmark stage's track; after: the refined track (same frames); shift: (T,) landmark shift of
    each frame (`landmark_shift`; NaN counts as far); supported: (T,) the stage's own evidence is sufficient
    (e.g. enough dense inliers); overruled: (T,) frames whose detection the stage found to be a detector failure
    on its own evidence (they may move far). refit(frames) gives the landmark fits of those frames under the
    refined track's identity and camera, for a stage that changed them (default: `before`'s frames as they
    are). With a sequence fallback the result is `before` itself (its identity and focal included).
    """
    T = len(before.valid)
    overruled = np.zeros(T, bool) if overruled is None else np.asarray(overruled, bool)
    supported = np.asarray(supported, bool)
    compared = before.valid & after.valid
    far = np.nan_to_num(np.asarray(shift, np.float64), nan=np.inf) > cfg.max_landmark_shift
    disagree = compared & (~supported | far)
    suspect = disagree & (~supported | ~overruled)
    unsupported_new = after.valid & ~before.valid & ~supported
    checked = int(compared.sum())
    # Overruled detections may move a frame, but they still count as disagreement for the whole sequence: a
    # stage whose evidence overrules most detections is more likely wrong than the detector.
    if checked and disagree.sum() > cfg.max_failed_fraction * checked:
        warnings.warn(f"{stage}: {int(disagree.sum())} of {checked} refined frames moved far from the landmark fit "
                      "or lacked support: its evidence disagrees with the landmarks, so the landmark track is kept",
                      stacklevel=2)
        failed = np.flatnonzero(suspect | unsupported_new)
        return before, GuardReport(checked, checked, int(unsupported_new.sum()), True, failed.tolist())
    restore = before.valid & (suspect | ~after.valid)
    drop = unsupported_new
    params = after.params
    if restore.any():
        index = np.flatnonzero(restore)
        fallback = refit(index) if refit is not None else before.params.frames(torch.as_tensor(index))
        params = scatter_frames(params, index, fallback)
    if drop.any():  # invalid frames hold a neighbour's values, as the landmark stage left them
        index = np.flatnonzero(drop)
        params = scatter_frames(params, index, before.params.frames(torch.as_tensor(index)))
    valid = (after.valid & ~drop) | restore
    errors = np.where(restore, before.lmk_error_px, np.where(drop, np.nan, after.lmk_error_px)).astype(np.float32)
    report = GuardReport(checked, int(suspect.sum()), int(drop.sum()), False,
                         np.flatnonzero(suspect | drop).tolist())
    return replace(after, params=params, valid=valid, lmk_error_px=errors), report


def scatter_frames(base: FlameParams, index: np.ndarray, values: FlameParams) -> FlameParams:
    """A copy of `base` (T frames) whose frames `index` (N,) hold `values` (N frames)."""
    out = base.detach()
    rows = torch.as_tensor(index, device=base.expr.device)
    for name in FRAME_FIELDS:
        getattr(out, name)[rows] = getattr(values, name).to(getattr(out, name))
    return out


def guard_error_growth(landmark_result: TrackResult, refined_result: TrackResult, face_size: np.ndarray,
                     cfg: PhotometricGuardConfig | None = None, stage: str = "refinement") -> tuple[TrackResult, dict]:
    """The photometric stage's guard: keep the landmark-stage fit of the frames whose landmark error grew by more
    than cfg.max_shift x the face size (detectors and FLAME's embedding disagree by a few pixels even at the true
    parameters, so the allowance is a fraction of the face, not of the error); drop the whole refinement when more
    than cfg.max_rejected of the frames are rejected.

    landmark_result, refined_result: T frames each (lmk_error_px in video pixels, NaN where not fitted);
    face_size: (T,) face size in video pixels. The shared identity (and focal length) stay the refined ones
    unless the whole refinement is dropped.
    Returns the guarded result and a report: frames checked, rejected (count and video-row indices), whether
    the refinement was dropped.
    """
    if cfg is None:
        from tracker.config import PhotometricGuardConfig
        cfg = PhotometricGuardConfig()
    before, after = landmark_result.lmk_error_px, refined_result.lmk_error_px
    checked = refined_result.valid & landmark_result.valid & np.isfinite(after) & np.isfinite(before)
    limit = before + cfg.max_shift * np.asarray(face_size, np.float32)
    rejected = checked & ~(after <= limit)
    report = {"checked": int(checked.sum()), "rejected": int(rejected.sum()),
              "rejected_frames": [int(t) for t in np.flatnonzero(rejected)], "dropped": False}
    if checked.any() and rejected.sum() > cfg.max_rejected * checked.sum():
        warnings.warn(f"{stage}: {int(rejected.sum())} of {int(checked.sum())} refined frames moved far from "
                      "their landmarks; keeping the landmark-stage track", stacklevel=2)
        report["dropped"] = True
        return landmark_result, report
    if not rejected.any():
        return refined_result, report
    index = torch.as_tensor(rejected, device=refined_result.params.expr.device)
    params = refined_result.params.detach()
    for name in FRAME_FIELDS:
        getattr(params, name)[index] = getattr(landmark_result.params, name)[index].to(getattr(params, name))
    errors = np.where(rejected, before, after).astype(np.float32)
    return replace(refined_result, params=params, lmk_error_px=errors), report
