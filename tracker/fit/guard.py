"""The guard of the image stages: a refinement may not carry a frame far away from its landmarks.

An image stage (photometric, DenseMarks) refines the landmark stage's fit of every frame. When its evidence is
wrong (maps that disagree with the frame, an appearance that does not explain it), the refined fit drifts away
from the detected landmarks. `guard_refinement` compares each frame's landmark reprojection error before and
after: a frame whose error grew by more than `max_shift` x its face size keeps its landmark-stage fit, and is
counted and reported; when more than `max_rejected` of the refined frames are rejected, the whole refinement
is dropped with a warning (a sequence where most frames fail is not to be trusted anywhere).

The allowance is a fraction of the face size, not of the landmark error: detectors and FLAME's landmark
embedding disagree by a few pixels even at the true parameters, so a refinement that is right can triple a
sub-pixel landmark error; a fit that moved by 5% of the face is wrong.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import torch

from tracker.config import GuardConfig
from tracker.fit.sequence import TrackResult
from tracker.fit.solver import FRAME_FIELDS


def guard_refinement(landmark_result: TrackResult, refined_result: TrackResult, face_size: np.ndarray,
                     cfg: GuardConfig | None = None, stage: str = "refinement") -> tuple[TrackResult, dict]:
    """Keep the landmark-stage fit of the frames a refinement carried away from their landmarks.

    landmark_result, refined_result: T frames each (lmk_error_px in video pixels, NaN where not fitted);
    face_size: (T,) face size in video pixels. The shared identity (and focal length) stay the refined ones
    unless the whole refinement is dropped.
    Returns the guarded result and a report: frames checked, rejected (count and video-row indices), whether
    the refinement was dropped.
    """
    cfg = cfg or GuardConfig()
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
