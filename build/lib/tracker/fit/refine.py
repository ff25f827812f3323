"""Image-based refinement of a landmark track: each frame is re-fitted with the problem's terms (image terms
included: photometric, DenseMarks), warm-started from its landmark fit, in order, with the temporal term
referring to the refined previous frames."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import numpy as np
import torch

from tracker.energy.base import Observations
from tracker.fit.sequence import TrackResult, landmark_error_px, predict_next
from tracker.fit.solver import FRAME_FIELDS, Problem, fit_adam
from tracker.flame.model import FlameParams


def refine_sequence(problem: Problem, result: TrackResult, frame_obs: Callable[[int], Observations],
                    free: Sequence[str], iters: int, lr: float,
                    progress: Callable[[], None] | None = None) -> TrackResult:
    """Refine every valid frame of `result`; frame_obs(t) gives frame t's observations (images loaded lazily).

    Returns a new TrackResult (landmark errors recomputed).
    """
    T = len(result.valid)
    refined: list[FlameParams] = []
    errors = result.lmk_error_px.copy()
    prev = prev2 = None
    for t in range(T):
        start = result.params.frames(slice(t, t + 1))
        if not result.valid[t]:
            refined.append(start)
            prev = prev2 = None
        else:
            obs = frame_obs(t)
            reference = predict_next(prev, prev2) if prev is not None else None
            params = fit_adam(problem, start, obs, free, iters, lr, reference=reference)
            errors[t] = float(landmark_error_px(problem, params, obs)[0])
            refined.append(params)
            prev2, prev = prev, params
        if progress:
            progress()
    stacked = FlameParams(shape=result.params.shape,
                          **{n: torch.cat([getattr(p, n) for p in refined]) for n in FRAME_FIELDS})
    return replace(result, params=stacked, lmk_error_px=np.asarray(errors, np.float32))
