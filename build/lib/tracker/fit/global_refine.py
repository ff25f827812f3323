"""Optional joint refinement over all frames: windows of consecutive frames are optimised together with a
second-difference smoothness term, which removes the jitter that frame-by-frame tracking leaves."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from tracker.energy.base import Observations
from tracker.energy.temporal import SmoothnessConfig, SmoothnessEnergy
from tracker.fit.sequence import TrackResult, landmark_error_px
from tracker.fit.solver import LANDMARK_FIELDS, Problem, fit_adam


def refine_globally(problem: Problem, result: TrackResult, obs: Observations, iters: int, window: int, lr: float,
                    smoothness: SmoothnessConfig | None = None,
                    progress: Callable[[int], None] | None = None) -> TrackResult:
    """Jointly refine runs of consecutive valid frames, `window` frames at a time (windows overlap by a
    quarter so that their seams are smooth too). Invalid frames split runs and are left as they are."""
    terms = [t for t in problem.terms if t.name != "temporal"] + [SmoothnessEnergy(smoothness or SmoothnessConfig())]
    joint = problem.with_terms(terms)
    params = result.params.detach()
    step = max(1, window - window // 4)
    for run in _valid_runs(result.valid):
        for start in range(run.start, run.stop, step):
            idx = torch.arange(start, min(start + window, run.stop), device=obs.landmarks.device)
            if len(idx) < 3:
                continue
            fitted = fit_adam(joint, params.frames(idx), obs.frames(idx), LANDMARK_FIELDS, iters, lr)
            for name in LANDMARK_FIELDS:
                getattr(params, name)[idx] = getattr(fitted, name)
            if progress:
                progress(len(idx))
            if start + window >= run.stop:
                break
    errors = result.lmk_error_px.copy()
    valid_idx = np.flatnonzero(result.valid)
    if len(valid_idx):
        sel = torch.as_tensor(valid_idx, device=obs.landmarks.device)
        errors[valid_idx] = landmark_error_px(problem, params.frames(sel), obs.frames(sel)).cpu().numpy()
    return replace(result, params=params, lmk_error_px=errors.astype(np.float32))


def _valid_runs(valid: np.ndarray) -> list[range]:
    """Maximal runs of consecutive True entries."""
    runs, start = [], None
    for t, v in enumerate(list(valid) + [False]):
        if v and start is None:
            start = t
        elif not v and start is not None:
            runs.append(range(start, t))
            start = None
    return runs
