"""Fitting FLAME to DenseMarks evidence: frame by frame, and the shared identity and focal length on keyframes.

A frame's fit (`DenseFitter.fit`) runs rounds of: refresh the gates at the current pose (visibility reused while
the mesh barely moves), take at most `densemarks.samples` of the kept correspondences (a fixed, spread order
over the candidates), and run Levenberg-Marquardt on the landmark stage's terms (re-weighted for this stage)
plus the correspondence term over those samples; it stops once a round moves the mesh by less than a pixel.
Its start is the best-agreeing of the landmark fit, the motion prediction and a pose computed from the matches
alone (RANSAC PnP), so neither detector failures nor fast motion leave it in a wrong basin.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from tracker.camera import Camera
from tracker.config import DenseMarksStageConfig, TrackerConfig
from tracker.densemarks.frames import DenseFrame, agreement, refresh_gates, rigid_from_matches
from tracker.energy.base import EnergyTerm, Observations, reweighted
from tracker.energy.dense import (
    CORR_TARGET,
    CORR_WEIGHT,
    CROP_PX,
    DenseCorrespondenceConfig,
    DenseCorrespondenceEnergy,
    DenseRenderEnergy,
)
from tracker.energy.head_size import HeadSizeEnergy
from tracker.fit.guard import GuardConfig, GuardReport, guard_refinement, landmark_shift
from tracker.fit.sequence import FOCAL_PRIOR, TrackResult, landmark_error_px, predict_next
from tracker.fit.solver import FRAME_FIELDS, LANDMARK_FIELDS, Problem, fit_adam, fit_lm
from tracker.flame.model import FlameModel, FlameParams

LANDMARK_AGREEMENT = 0.5
"""A frame's detection counts as overruled by the dense evidence (the guard lets such a frame move far from its
landmark fit) when the landmark fit agrees with the matches less than this fraction as well as the refined fit."""
SETTLED_PX = 0.5
"""A frame's rounds stop once one moves no sampled vertex by more than this many video pixels."""


def stage_terms(terms: Sequence[EnergyTerm], stage: DenseMarksStageConfig) -> list[EnergyTerm]:
    """The landmark stage's terms re-weighted for this stage: landmarks and the face outline (both detector
    evidence), priors and temporal by their stage factors."""
    return reweighted(terms, {"landmarks": stage.landmark_weight, "contour": stage.landmark_weight,
                              "priors": stage.prior_weight, "temporal": stage.temporal_weight})


@dataclass
class FrameFit:
    """One frame's refined parameters and the evidence behind them."""

    params: FlameParams
    inliers: int
    """Candidates whose correspondence is kept at the final pose."""
    start: str
    """Which start won: landmarks, motion, neighbour or matches (PnP from the correspondences alone)."""
    overruled: bool
    """The frame's landmarks were ignored as a detector failure."""


@dataclass
class DenseFitter:
    """Fits frames (and keyframe identities) with the dense correspondence term on top of the stage's terms."""

    problem: Problem
    """Model, landmarks, camera and the landmark stage's terms re-weighted for this stage."""
    corr_cfg: DenseCorrespondenceConfig
    vertex_ids: torch.Tensor
    """(K,) candidate vertices, matched in every frame."""
    order: torch.Tensor
    """(K,) positions into vertex_ids in sampling order (a fixed random permutation: samples spread out)."""
    stage: DenseMarksStageConfig
    free: tuple[str, ...]
    """Per-frame fields fitted."""
    render_size: int
    """Side of the fitting crop (visibility is rasterised there)."""
    render: DenseRenderEnergy | None = None
    """The render-and-compare term for the optional Adam steps (densemarks.iters)."""
    lr: float = 0.01
    """Adam learning rate of those steps."""

    @property
    def model(self) -> FlameModel:
        return self.problem.model

    @property
    def camera(self) -> Camera:
        return self.problem.camera

    def gates(self, frame: DenseFrame, params: FlameParams) -> int:
        return refresh_gates(frame, self.model, self.camera, params, self.vertex_ids, self.corr_cfg,
                             self.render_size)

    def agreement(self, frame: DenseFrame, params: FlameParams) -> float:
        return agreement(frame, self.model, self.camera, params, self.vertex_ids, self.corr_cfg, self.render_size)

    def rigid(self, frame: DenseFrame, params: FlameParams) -> FlameParams | None:
        return rigid_from_matches(frame, self.model, self.camera, params, self.vertex_ids, self.corr_cfg)

    def lm(self, problem: Problem, params: FlameParams, obs: Observations, iters: int,
           reference: FlameParams | None = None, **shared) -> tuple[FlameParams, torch.Tensor]:
        """Levenberg-Marquardt over the free fields (shared: fit_lm's identity and focal options); the contour
        landmarks are re-chosen only when the landmark term is on. Jacobians from the terms' own derivatives
        (exact, so the identity can travel along the weakly seen size/depth direction)."""
        rounds = 2 if any(term.name == "landmarks" for term in problem.terms) else 1
        return fit_lm(problem, params, obs, self.free, iters, reference, rounds=rounds, **shared)

    def correspondence_term(self, positions: torch.Tensor) -> DenseCorrespondenceEnergy:
        return DenseCorrespondenceEnergy(self.corr_cfg, self.model, self.vertex_ids[positions])

    def sampled(self, frame: DenseFrame) -> torch.Tensor:
        """Positions (into the candidates, sorted) of at most densemarks.samples kept correspondences."""
        kept = frame.extras[CORR_WEIGHT][0, self.order] > 0
        return self.order[kept][:self.stage.samples].sort().values

    def choose_start(self, frame: DenseFrame, candidates: dict[str, FlameParams]) -> tuple[str, dict[str, float]]:
        """The best-agreeing start among the candidates and a PnP pose from the matches (added to candidates as
        "matches"); returns its name and every candidate's agreement."""
        scores = {name: self.agreement(frame, params) for name, params in candidates.items()}
        rigid = self.rigid(frame, candidates[max(scores, key=scores.get)])
        if rigid is not None:
            candidates["matches"] = rigid
            scores["matches"] = self.agreement(frame, rigid)
        return max(scores, key=scores.get), scores

    def fit(self, start: FlameParams, obs: Observations, frame: DenseFrame,
            reference: FlameParams | None) -> tuple[FlameParams, int]:
        """Refined parameters of one frame from `start`, and its number of kept correspondences."""
        params = start
        for _ in range(self.stage.rounds):
            self.gates(frame, params)
            positions = self.sampled(frame)
            if not len(positions):
                break
            term = self.correspondence_term(positions)
            extras = {CORR_TARGET: frame.extras[CORR_TARGET][:, positions],
                      CORR_WEIGHT: torch.ones(1, len(positions), device=positions.device),
                      CROP_PX: frame.extras[CROP_PX]}
            problem = self.problem.with_terms([*self.problem.terms, term])
            before = self.camera.project(term.model(params).vertices)[0]
            params = self.lm(problem, params, replace(obs, extras=extras), self.stage.lm_iters, reference)[0]
            with torch.no_grad():
                moved = (self.camera.project(term.model(params).vertices)[0] - before).norm(dim=-1).max()
            if moved < SETTLED_PX:
                break
        inliers = self.gates(frame, params)
        if self.render is not None and self.stage.iters:
            problem = self.problem.with_terms([*self.problem.terms, self.correspondence_term(
                torch.arange(len(self.vertex_ids), device=self.vertex_ids.device)), self.render])
            params = fit_adam(problem, params, replace(obs, extras=frame.extras), self.free, self.stage.iters,
                              self.lr, reference)
            inliers = self.gates(frame, params)
        return params, inliers


def build_fitter(problem: Problem, canonical: torch.Tensor, excluded: np.ndarray, cfg: TrackerConfig) -> DenseFitter:
    """The stage's fitter: candidates drawn from all vertices but `excluded`, the landmark stage's terms
    re-weighted, and the render-and-compare term when its Adam steps are on."""
    from tracker.energy.dense import correspondence_vertices

    ids = correspondence_vertices(problem.model.n_vertices, cfg.energy.dense_corr.vertices, excluded, cfg.seed)
    device = canonical.device
    order = torch.as_tensor(np.random.default_rng(cfg.seed).permutation(len(ids)), device=device)
    stage, energy = cfg.densemarks, cfg.energy
    render = DenseRenderEnergy(energy.dense_render, canonical) \
        if stage.iters and energy.dense_render.weight > 0 else None
    # Eyeballs have no correspondences: without the landmark term the gaze stays as the landmark stage fitted it.
    free = tuple(f for f in LANDMARK_FIELDS if stage.landmark_weight > 0 or f != "eyes_pose") + \
        (("neck_pose",) if stage.free_neck else ())
    return DenseFitter(problem.with_terms(stage_terms(problem.terms, stage)), energy.dense_corr,
                       torch.as_tensor(ids, device=device), order, stage,
                       tuple(f for f in FRAME_FIELDS if f in free), energy.dense_render.resolution, render,
                       cfg.fit.lr)


# ---------------------------------------------------------------------------------------------------------------
# Identity and focal length
# ---------------------------------------------------------------------------------------------------------------


def rescale_to_camera(params: FlameParams, old_focal: float, new_focal: float) -> FlameParams:
    """Frames fitted under another focal length moved along their viewing rays so that they project about the
    same under the new one (translation scaled by the focal ratio)."""
    out = params.detach()
    out.translation = out.translation * (new_focal / old_focal)
    return out


def refine_identity(fitter: DenseFitter, params: FlameParams, obs: Observations, frames: list[DenseFrame],
                    free_focal: bool, hold_size: bool) -> tuple[FlameParams, np.ndarray]:
    """Keyframe parameters with the shared identity (and, with free_focal, the focal length, written into the
    fitter's camera) re-estimated from the correspondences: DenseMarks sees the whole head (profile, ears,
    skull), which pins the shape far better than face landmarks, and its perspective pins the focal.

    params, obs, frames: B keyframes. Each keyframe first gets its rigid pose from its matches when that agrees
    better; keyframes whose correspondences mostly fail the gates then (a wrong prediction) are left out. Returns
    the used keyframes' parameters and which of the B were used (none: nothing changed). hold_size keeps the
    head's size (`HeadSizeEnergy`), for maps estimated from this video's own fits.
    """
    stage = fitter.stage
    rows, used = [], np.zeros(len(frames), bool)
    for i, frame in enumerate(frames):
        candidates = {"landmarks": params.frames(slice(i, i + 1))}
        name, _ = fitter.choose_start(frame, candidates)
        rows.append(candidates[name])
        used[i] = fitter.gates(frame, rows[-1]) >= stage.min_inliers * len(fitter.vertex_ids)
    if used.sum() < 2:
        return params.frames(slice(0, 0)), np.zeros(len(frames), bool)
    frames = [frame for frame, keep in zip(frames, used) if keep]
    obs = obs.frames(torch.as_tensor(np.flatnonzero(used), device=obs.landmarks.device))
    params = FlameParams(shape=params.shape, **{n: torch.cat([getattr(r, n) for r, keep in zip(rows, used) if keep])
                                                for n in FRAME_FIELDS})
    positions = fitter.order[:stage.identity_vertices].sort().values
    term = fitter.correspondence_term(positions)
    terms = [*fitter.problem.terms, term] + ([HeadSizeEnergy(fitter.model, params.shape)] if hold_size else [])
    problem = fitter.problem.with_terms(terms)
    for _ in range(stage.identity_rounds):
        for i, frame in enumerate(frames):
            fitter.gates(frame, params.frames(slice(i, i + 1)))
        extras = {CORR_TARGET: torch.cat([f.extras[CORR_TARGET][:, positions] for f in frames]),
                  CORR_WEIGHT: torch.cat([f.extras[CORR_WEIGHT][:, positions] for f in frames]),
                  CROP_PX: torch.cat([f.extras[CROP_PX] for f in frames])}
        params, focal = fitter.lm(problem, params, replace(obs, extras=extras), stage.identity_iters,
                                  free_shape=True, free_focal=free_focal, focal_prior=FOCAL_PRIOR * len(frames))
        fitter.camera.focal = focal
    return params, used


# ---------------------------------------------------------------------------------------------------------------
# The sequence
# ---------------------------------------------------------------------------------------------------------------


def refine_sequence_dense(fitter: DenseFitter, result: TrackResult, obs: Observations,
                          dense_frame: Callable[[int], DenseFrame],
                          progress: Callable[[str], None] | None = None,
                          refits: FlameParams | None = None) -> tuple[TrackResult, dict]:
    """Refine every frame, in order (temporal reference: the refined predecessors the dense evidence supports).

    `result` holds the landmark fits under the stage's identity and camera (frames without landmarks hold a
    neighbour's values); frames without landmarks are fitted too when densemarks.track_lost, and become valid
    when at least min_inliers of the candidates keep a correspondence. Returns the refined track (before the
    guard) and, per frame, whether the dense evidence supports it and whether its landmarks were overruled.
    `refits`: the landmark fits re-fitted under the stage's camera, one more start per fitted frame (the stage
    gives them when its identity step moved the focal length far).
    """
    stage = fitter.stage
    T = len(result.valid)
    K = len(fitter.vertex_ids)
    refined: list[FlameParams] = []
    valid = np.zeros(T, bool)
    errors = np.full(T, np.nan, np.float32)
    inlier_fraction = np.full(T, np.nan, np.float32)
    overruled = np.zeros(T, bool)
    starts: dict[str, int] = {}
    prev = prev2 = None
    for t in range(T):
        landmark_fit = result.params.frames(slice(t, t + 1))
        if not (result.valid[t] or stage.track_lost):
            refined.append(landmark_fit)
            prev = prev2 = None
            if progress:
                progress("refine")
            continue
        frame = dense_frame(t)
        frame_obs = replace(obs.frames(slice(t, t + 1)), extras=frame.extras)
        reference = predict_next(prev, prev2) if prev is not None else None
        candidates = {"landmarks": landmark_fit} if result.valid[t] else {}
        if refits is not None and result.valid[t]:
            candidates["refit"] = refits.frames(slice(t, t + 1))
        if reference is not None:
            candidates["motion"] = reference
        if not candidates:
            candidates["neighbour"] = landmark_fit  # a gap's fill: the nearest landmark fit
        start, scores = fitter.choose_start(frame, candidates)
        params, inliers = fitter.fit(candidates[start], frame_obs, frame, reference)
        # Detections the matches contradict (MediaPipe's confident garbage near profile) may be left behind.
        landmark_agreement = max(scores["landmarks"], scores.get("refit", 0.0)) if result.valid[t] else 0.0
        overruled[t] = result.valid[t] and landmark_agreement < LANDMARK_AGREEMENT * fitter.agreement(frame, params)
        starts[start] = starts.get(start, 0) + 1
        inlier_fraction[t] = inliers / max(K, 1)
        valid[t] = result.valid[t] or inlier_fraction[t] >= stage.min_inliers
        if valid[t] and bool((frame_obs.landmark_weights > 0).any()):
            errors[t] = float(landmark_error_px(fitter.problem, params, frame_obs)[0])
        refined.append(params)
        # An unsupported frame (wrong or empty maps) breaks the motion chain like a missing one: extrapolating
        # its refinement would pull the next frames after it.
        prev2, prev = (prev, params) if inlier_fraction[t] >= stage.min_inliers else (None, None)
        if progress:
            progress("refine")
    stacked = FlameParams(shape=result.params.shape,
                          **{n: torch.cat([getattr(p, n) for p in refined]) for n in FRAME_FIELDS})
    after = replace(result, params=stacked, valid=valid, lmk_error_px=errors)
    supported = np.nan_to_num(inlier_fraction) >= stage.min_inliers
    counts = {"frames_refined": int(np.isfinite(inlier_fraction).sum()),
              "frames_without_landmarks_tracked": int((valid & ~result.valid).sum()),
              "landmark_detections_overruled": int(overruled.sum()), "starts": starts,
              "inlier_fraction_mean": round(float(np.nanmean(inlier_fraction)), 4) if np.isfinite(inlier_fraction).any()
              else None}
    return after, {"counts": counts, "supported": supported, "overruled": overruled}


def guarded(fitter: DenseFitter, landmark_problem: Problem, before: TrackResult, after: TrackResult,
            obs: Observations, evidence: dict, guard: GuardConfig,
            iters: int) -> tuple[TrackResult, GuardReport]:
    """The refined track through the image-stage guard (tracker.fit.guard): frames that moved far from their
    landmark fit without the dense evidence overruling the detection fall back to their landmark fit, re-fitted
    to the landmarks (landmark_problem's terms, `iters` steps) under the stage's identity and camera."""
    before_camera = Camera(torch.as_tensor(before.focal, dtype=fitter.camera.focal.dtype,
                                           device=fitter.camera.focal.device),
                           fitter.camera.center, fitter.camera.height, fitter.camera.width)
    shift = landmark_shift(fitter.problem, before.params, after.params, obs, before_camera, fitter.camera)

    def refit(index: np.ndarray) -> FlameParams:
        rows = torch.as_tensor(index, device=obs.landmarks.device)
        start = rescale_to_camera(replace(before.params.frames(rows), shape=after.params.shape), before.focal,
                                  float(fitter.camera.focal))
        return fit_lm(landmark_problem, start, obs.frames(rows), LANDMARK_FIELDS, iters)[0]

    return guard_refinement(before, after, shift, evidence["supported"], evidence["overruled"], guard,
                            "DenseMarks", refit)
