"""Tracking a sequence from per-frame landmarks: identity and focal on keyframes, then frame by frame with
a warm start from the previous frame, re-initialising a frame from its own landmarks when its error jumps."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from tracker.camera import Camera
from tracker.config import TrackerConfig
from tracker.energy.base import Observations
from tracker.energy.head_size import HeadSizeEnergy
from tracker.errors import stop_if_signalled
from tracker.fit.init import neutral_landmarks, rigid_from_landmarks, rough_head_angles, solve_rigid
from tracker.fit.solver import FRAME_FIELDS, LANDMARK_FIELDS, Problem, fit_lm, log_focal_std, torch_threads
from tracker.flame.model import FlameParams

KEYFRAME_MAX_ANGLE_DEG = 45.0
"""Largest rough yaw or pitch of a keyframe."""
WINDOW_DEGREE = 2
"""Degree of the polynomial in time that a window's frames are pulled towards (quadratic: constant
acceleration over a window of a few frames)."""
FOCAL_PRIOR = 1e-5
"""Weight pulling log(focal / initial focal) to 0: landmarks constrain the focal length only weakly."""


@dataclass
class Identity:
    """What the keyframes say about the whole video: the person's shape and the camera's focal length."""

    shape: torch.Tensor
    """(1, n_shape) identity coefficients."""
    focal: torch.Tensor
    """() focal length in pixels."""
    focal_source: str
    """given (camera.focal) | estimated (from the keyframes) | prior (the keyframes did not constrain it)."""
    focal_log_std: float
    """Uncertainty of the estimate (standard deviation of log focal); NaN when given."""
    keyframes: np.ndarray
    """Indices of the keyframes."""

    def focal_report(self, camera: Camera) -> dict:
        """The focal length as summary.json reports it."""
        fov = 2 * math.degrees(math.atan(0.5 * max(camera.height, camera.width) / float(self.focal)))
        return {"px": float(self.focal), "fov_deg": round(fov, 2), "source": self.focal_source,
                "log_std": None if math.isnan(self.focal_log_std) else round(self.focal_log_std, 4)}


@dataclass
class TrackResult:
    params: FlameParams
    """Stacked parameters of all T frames (invalid frames hold their nearest valid neighbour's values)."""
    focal: float
    """Focal length in pixels."""
    valid: np.ndarray
    """(T,) bool: a face was detected and fitted."""
    lmk_error_px: np.ndarray
    """(T,) mean landmark reprojection error in pixels (NaN where invalid)."""
    reinitialised: np.ndarray
    """(T,) bool: the frame was re-initialised from its own landmarks."""


def landmark_error_px(problem: Problem, params: FlameParams, obs: Observations,
                      camera: Camera | None = None) -> torch.Tensor:
    """(B,) confidence-weighted mean distance between projected and detected landmarks, pixels."""
    with torch.no_grad():
        ev = problem.evaluation(params, obs, camera=camera)
        dist = (ev.landmarks_2d - obs.landmarks).norm(dim=-1)
        w = (obs.landmark_weights > 0).float()
        return (dist * w).sum(-1) / w.sum(-1).clamp(min=1)


def evenly_spaced(candidates: np.ndarray, count: int) -> np.ndarray:
    """Up to `count` entries of `candidates` spread evenly over it (first and last included)."""
    if len(candidates) <= count:
        return candidates
    return candidates[np.round(np.linspace(0, len(candidates) - 1, count)).astype(int)]


def choose_keyframes(valid: np.ndarray, count: int, angles: np.ndarray | None = None) -> np.ndarray:
    """Up to `count` valid frame indices that span the head poses seen (sorted).

    angles: (T, 2) rough yaw and pitch per frame in degrees (NaN where unknown); without them, or where
    fewer than `count` frames have them, frames are spread evenly over the sequence. With them, greedy
    farthest-point sampling in (yaw, pitch) from the most frontal frame: views from different sides are what
    separate identity from pose and depth from focal length. Views turned beyond KEYFRAME_MAX_ANGLE_DEG are
    left out: detectors guess the hidden half of a face there.
    """
    candidates = np.flatnonzero(valid)
    if angles is None or len(candidates) <= count:
        return evenly_spaced(candidates, count)
    seen = angles[candidates]
    known = candidates[np.isfinite(seen).all(1) & (np.abs(seen) <= KEYFRAME_MAX_ANGLE_DEG).all(1)]
    if len(known) < count:
        return evenly_spaced(candidates, count)
    points = angles[known]
    chosen = [int(np.argmin(np.linalg.norm(points, axis=1)))]
    distance = np.linalg.norm(points - points[chosen[0]], axis=1)
    while len(chosen) < count:
        pick = int(np.argmax(distance))
        chosen.append(pick)
        distance = np.minimum(distance, np.linalg.norm(points - points[pick], axis=1))
    return np.sort(known[chosen])


class SequenceTracker:
    """Landmark-driven tracking of one video (the stage later stages refine)."""

    def __init__(self, problem: Problem, cfg: TrackerConfig):
        self.problem = problem
        self.cfg = cfg
        self.model = problem.model

    def _pnp_init(self, obs: Observations, shape: torch.Tensor) -> FlameParams:
        """Parameters for each frame of obs from its own landmarks (neutral expression)."""
        B = obs.landmarks.shape[0]
        params = FlameParams.zeros(B, self.model.n_shape, self.model.n_expr, shape.device)
        params.shape = shape.detach().clone()
        for b in range(B):
            try:
                rot, trans = rigid_from_landmarks(self.model, self.problem.landmarks, self.problem.camera,
                                                  obs.landmarks[b].cpu().numpy(),
                                                  obs.landmark_weights[b].cpu().numpy(), shape)
            except ValueError:  # degenerate landmarks: start facing the camera at a plausible distance
                rot, trans = np.zeros(3, np.float32), np.array([0, 0, -0.6], np.float32)
            params.rotation[b] = torch.from_numpy(rot)
            params.translation[b] = torch.from_numpy(trans)
        return params

    def estimate_identity(self, obs: Observations, valid: np.ndarray) -> Identity:
        """Shared shape and focal from keyframes that span the head poses seen.

        The focal length is estimated jointly with the identity unless the config gives it; when the keyframes
        leave it uncertain (a frontal video: perspective and face depth explain the same pixels), the prior
        field of view is used instead and the identity is fitted again under it.
        """
        angles = rough_head_angles(self.model, self.problem.landmarks, self.problem.camera,
                                   obs.landmarks.cpu().numpy(), obs.landmark_weights.cpu().numpy() * valid[:, None])
        keys = choose_keyframes(valid, self.cfg.fit.keyframes, angles)
        shape = torch.zeros(1, self.model.n_shape, device=obs.landmarks.device)
        key_obs = obs.frames(torch.as_tensor(keys, device=obs.landmarks.device))
        init = self._pnp_init(key_obs, shape)
        prior_focal = self.problem.camera.focal.detach().clone()
        iters, prior = self.cfg.fit.shape_iters, FOCAL_PRIOR * len(keys)
        # A single camera sees size only together with distance: without a held size the identity takes up
        # whatever size the detector's biases suggest, and only the prior knows better (the mean head's).
        problem = (self.problem.with_terms([*self.problem.terms, HeadSizeEnergy(self.model, shape)])
                   if self.cfg.fit.hold_head_size else self.problem)
        with torch_threads(1):
            # Pose first with the mean shape, then everything together.
            init, _ = fit_lm(self.problem, init, key_obs, LANDMARK_FIELDS, max(5, iters // 3))
            if self.cfg.camera.focal is not None:
                params, focal = fit_lm(problem, init, key_obs, LANDMARK_FIELDS, iters, free_shape=True)
                return Identity(params.shape, focal, "given", float("nan"), keys)
            params, focal = fit_lm(problem, init, key_obs, LANDMARK_FIELDS, iters, free_shape=True,
                                   free_focal=True, focal_prior=prior)
            self.problem.camera.focal = focal
            spread = log_focal_std(problem, params, key_obs, LANDMARK_FIELDS, prior)
            if spread <= self.cfg.camera.max_focal_log_std:
                return Identity(params.shape, focal, "estimated", spread, keys)
            self.problem.camera.focal = prior_focal
            params, focal = fit_lm(problem, init, key_obs, LANDMARK_FIELDS, iters, free_shape=True)
        return Identity(params.shape, focal, "prior", spread, keys)

    def track(self, obs: Observations, valid: np.ndarray, shape: torch.Tensor,
              on_frame: Callable[[int, FlameParams, float, bool], None] | None = None,
              progress: Callable[[], None] | None = None) -> TrackResult:
        """Fit every valid frame in order; on_frame(t, params, error_px, reinitialised) after each."""
        frames = ((obs.frames(slice(t, t + 1)), bool(valid[t])) for t in range(len(valid)))
        return self.track_frames(frames, shape, on_frame, progress)

    def track_frames(self, frames: Iterable[tuple[Observations, bool]], shape: torch.Tensor,
                     on_frame: Callable[[int, FlameParams, float, bool], None] | None = None,
                     progress: Callable[[], None] | None = None) -> TrackResult:
        """`track` fed frame by frame: (one frame's observations, whether it has a face) as they arrive.

        Consecutive frames with a face are fitted `fit.window` at a time (`_fit_window`); a frame without one
        ends the run, and the next run starts from its own landmarks."""
        results: list[FlameParams | None] = []
        errors: list[float] = []
        reinit: list[bool] = []
        recent: list[float] = []  # landmark errors of the frames fitted so far
        chain: list[FlameParams] = []  # the run's last two fitted frames (what predicts the next)
        window: list[tuple[int, Observations]] = []

        def fit_window() -> None:
            if not window:
                return
            fitted, errs, again = self._fit_window(Observations.cat([o for _, o in window]), shape, chain, recent)
            for (t, _), params, err, was_reinit in zip(window, fitted, errs, again, strict=True):
                results[t], errors[t], reinit[t] = params, err, was_reinit
                if on_frame:
                    on_frame(t, params, err, was_reinit)
                if progress:
                    progress()
            window.clear()

        for t, (o, valid_t) in enumerate(frames):
            stop_if_signalled()
            results.append(None)
            errors.append(np.nan)
            reinit.append(False)
            if valid_t:
                window.append((t, o))
                if len(window) >= self.cfg.fit.window:
                    fit_window()
                continue
            fit_window()
            chain.clear()  # a gap: the next frame starts from its own landmarks
            if progress:
                progress()
        fit_window()
        valid = np.array([r is not None for r in results], bool)
        return TrackResult(self._stack(results, shape), float(self.problem.camera.focal), valid,
                           np.array(errors, np.float32), np.array(reinit, bool))

    def _fit_window(self, obs: Observations, shape: torch.Tensor, chain: list[FlameParams],
                    recent: list[float]) -> tuple[list[FlameParams], list[float], list[bool]]:
        """Fit B consecutive frames that follow `chain` (the run's last fitted frames; empty at a run's start,
        when the first frame is fitted from its own landmarks). Returns each frame's parameters, landmark
        error and whether it was re-initialised (its error jumped and a fit from its own landmarks did
        better); updates chain and recent (the errors so far)."""
        fit = self.cfg.fit
        B = obs.landmarks.shape[0]
        starts_run = not chain
        fitted: list[FlameParams] = []
        with torch_threads(1):
            if starts_run:
                fitted.append(self._fit_fresh(obs.frames(slice(0, 1)), shape))
            ahead = B - len(fitted)
            if ahead:
                params = self._fit_ahead((chain + fitted)[-2:], obs.frames(slice(B - ahead, B)), shape)
                fitted += [params.frames(slice(k, k + 1)) for k in range(ahead)]
            errs = landmark_error_px(self.problem, FlameParams.cat(fitted), obs).tolist()
            reinit = [False] * B
            for k in range(B):
                baseline = float(np.median(recent[-30:])) if recent else None
                if (k or not starts_run) and baseline is not None and errs[k] > fit.reinit_factor * max(baseline, 1.0):
                    one = obs.frames(slice(k, k + 1))
                    fresh = self._fit_fresh(one, shape)
                    fresh_err = float(landmark_error_px(self.problem, fresh, one)[0])
                    if fresh_err < errs[k]:
                        fitted[k], errs[k], reinit[k] = fresh, fresh_err, True
                recent.append(errs[k])
                chain[:] = ([] if reinit[k] else chain[-1:]) + [fitted[k]]
        return fitted, errs, reinit

    def _fit_ahead(self, known: list[FlameParams], obs: Observations, shape: torch.Tensor) -> FlameParams:
        """The B frames of obs that follow `known` (the last one or two fitted frames, oldest first).

        One frame (sequential tracking) starts from the constant-velocity prediction, which the temporal term
        also pulls it to. Several are solved side by side as independent problems: the prediction is a start
        only for the next one, so each later frame starts from its own landmarks' rigid pose (PnP) with the
        prediction's expression, first without the temporal term; then `fit.window_iters` iterations pull
        every frame towards a quadratic in time through the window's fits and the known frames: smooth motion
        costs nothing, jitter does.
        """
        fit = self.cfg.fit
        B = obs.landmarks.shape[0]
        predicted = predict_next(known[-1], known[-2] if len(known) > 1 else None)
        if B == 1:
            # One round: the prediction is close enough for its silhouette matches to hold.
            return fit_lm(self.problem, predicted, obs, LANDMARK_FIELDS, fit.frame_iters, reference=predicted,
                          rounds=fit.frame_rounds, independent=True)[0]
        start = self._rigid_starts(FlameParams.cat([predicted] * B), obs, shape)
        start = fit_lm(self.problem, start, obs, LANDMARK_FIELDS, fit.frame_iters, rounds=fit.frame_rounds,
                       independent=True)[0]
        reference = smooth_in_time(FlameParams.cat([*known, start]), WINDOW_DEGREE).frames(slice(len(known), None))
        return fit_lm(self.problem, start, obs, LANDMARK_FIELDS, fit.window_iters, reference=reference,
                      rounds=fit.frame_rounds, independent=True)[0]

    def _rigid_starts(self, params: FlameParams, obs: Observations, shape: torch.Tensor) -> FlameParams:
        """params with the rotation and translation of frames 1..B-1 from their own landmarks (PnP with the
        neutral head of identity `shape`) where PnP succeeds."""
        params = params.map(torch.clone)
        object_points, root = neutral_landmarks(self.model, self.problem.landmarks, shape)
        points, weights = obs.landmarks.cpu().numpy(), obs.landmark_weights.cpu().numpy()
        for k in range(1, params.batch_size):
            try:
                rotation, translation = solve_rigid(object_points, root, self.problem.landmarks, self.problem.camera,
                                                    points[k], weights[k].copy())
            except ValueError:
                continue
            params.rotation[k] = torch.from_numpy(rotation).to(params.rotation)
            params.translation[k] = torch.from_numpy(translation).to(params.translation)
        return params

    def _fit_fresh(self, o: Observations, shape: torch.Tensor) -> FlameParams:
        init = self._pnp_init(o, shape)
        return fit_lm(self.problem, init, o, LANDMARK_FIELDS, self.cfg.fit.first_frame_iters)[0]

    def _stack(self, results: list[FlameParams | None], shape: torch.Tensor) -> FlameParams:
        """All frames stacked; invalid frames copy the nearest valid frame (all-zero pose when none is)."""
        filled = fill_gaps(results)
        if not filled:
            return FlameParams.zeros(len(results), self.model.n_shape, self.model.n_expr, shape.device)
        fields = {n: torch.cat([getattr(p, n) for p in filled]) for n in FRAME_FIELDS}
        return FlameParams(shape=shape.detach(), **fields)


def smooth_in_time(run: FlameParams, degree: int) -> FlameParams:
    """Every per-frame field of the consecutive frames `run` replaced by its least-squares polynomial of
    `degree` in time (lower when there are too few frames)."""
    T = run.batch_size
    time = torch.linspace(-1, 1, T, dtype=run.expr.dtype, device=run.expr.device)
    basis = torch.stack([time ** d for d in range(min(degree, T - 1) + 1)], dim=1)  # (T, D)
    hat = basis @ torch.linalg.pinv(basis)  # (T, T): projection onto the polynomials
    out = run.map(lambda t: t)
    for name in FRAME_FIELDS:
        setattr(out, name, hat @ getattr(run, name))
    return out


def predict_next(prev: FlameParams, prev2: FlameParams | None) -> FlameParams:
    """Constant-velocity prediction of the next frame (the previous frame when only one is known).

    It is both the warm start and the temporal term's reference, so smooth motion is not penalised (no lag)
    while jitter and sudden jumps are.
    """
    if prev2 is None:
        return prev
    predicted = prev.map(lambda t: t)
    for name in FRAME_FIELDS:
        setattr(predicted, name, 2 * getattr(prev, name) - getattr(prev2, name))
    return predicted


def valid_runs(valid: np.ndarray, min_length: int = 1) -> list[tuple[int, int]]:
    """Half-open [start, stop) ranges of consecutive True values, at least min_length long."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(valid).astype(int), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True) if b - a >= min_length]


def fill_gaps(results: list[FlameParams | None]) -> list[FlameParams]:
    """Replace None entries with the nearest non-None neighbour (earlier wins ties); [] if all are None."""
    known = [i for i, r in enumerate(results) if r is not None]
    if not known:
        return []
    known_arr = np.asarray(known)
    out = []
    for i, r in enumerate(results):
        out.append(r if r is not None else results[int(known_arr[np.argmin(np.abs(known_arr - i))])])
    return out
