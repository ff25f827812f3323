"""The DenseMarks stage: refine a landmark track with dense canonical-coordinate terms.

    result, info = run_densemarks_stage(problem, result, obs, frame_indices, frames, bundle, cfg, out_dir)

1. Predictor: the network when its weights are found (mode auto/on), or the evaluation-only oracle on synthetic
   sequences (`densemarks.oracle`).
2. Crops: square boxes around the tracked head, interpolated over frames without a fit.
3. Predictions: uvw maps per frame, cached per video (float16 + crop affine), so re-runs skip the network.
4. Canonical map and identity: the map is loaded (`densemarks.canonical_map`) or estimated from the landmark fits
   of the well-fitted frames; then the shared identity is re-estimated on keyframes with the correspondence term,
   alternating with re-estimating the map from those keyframe fits. An estimated map is saved with a PNG.
5. Refinement, frame by frame in order: each sampled vertex is matched once to the pixel with the nearest uvw;
   rounds of (visibility gates at the current pose, Levenberg-Marquardt on landmark + prior + temporal +
   correspondence terms), then Adam with the render-and-compare term as well. Frames without landmarks are
   fitted from their predecessor and kept when enough correspondences hold; landmarks that contradict the dense
   evidence (detector failures near profile) are dropped for their frame.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.spatial import cKDTree

from tracker.camera import Camera
from tracker.config import DenseMarksStageConfig, TrackerConfig
from tracker.densemarks.canonical import (
    CanonicalMap,
    CanonicalMapOptions,
    crop_affine,
    estimate_canonical_map,
    frame_fit_weights,
    load_canonical_map,
    resize_uvw,
    save_canonical_map,
    vertex_visibility,
    write_canonical_png,
)
from tracker.densemarks.predict import CropBox, DenseMarksPredictor, UvwCache, UvwPrediction
from tracker.densemarks.weights import LICENSE, resolve_weights_path
from tracker.energy.base import EnergyTerm, Evaluation, Observations
from tracker.energy.dense import (
    CORR_TARGET,
    CORR_WEIGHT,
    CROP_PX,
    TO_CROP,
    UVW,
    VALID,
    DenseCorrespondenceConfig,
    DenseCorrespondenceEnergy,
    DenseRenderConfig,
    DenseRenderEnergy,
    correspondence_vertices,
    correspondence_weights,
    match_uvw,
    prediction_validity,
)
from tracker.errors import MissingAssetError
from tracker.fit.sequence import (
    FOCAL_PRIOR,
    TrackResult,
    choose_keyframes,
    evenly_spaced,
    landmark_error_px,
    predict_next,
)
from tracker.fit.solver import FRAME_FIELDS, LANDMARK_FIELDS, Problem, fit_adam, fit_lm, torch_threads
from tracker.flame.assets import FlameBundle
from tracker.flame.model import FlameModel, FlameParams
from tracker.io.video import Frame

if TYPE_CHECKING:
    from tracker.densemarks.oracle import OracleDenseMarks

HEAD_EXCLUDED_REGIONS = ("neck", "boundary")
"""FLAME_masks regions left out of the crop box (the neck's lower edge is not part of the head)."""
MATCH_EXCLUDED_REGIONS = ("left_eyeball", "right_eyeball")
"""Regions without correspondences: eyeballs turn with the gaze, so their canonical position is ambiguous."""
LANDMARK_AGREEMENT = 0.5
"""A frame's landmarks are ignored when fewer correspondences agree with their fit than this fraction of those
agreeing with the motion prediction (MediaPipe returns confident garbage near profile views)."""
MAP_FILE = "densemarks_canonical_map.npz"
MAP_PNG = "densemarks_canonical_map.png"


@dataclass(frozen=True)
class UvwSource:
    """Where uvw maps come from (network or oracle), behind one call."""

    kind: str
    """'network' or 'oracle'."""
    model_id: str
    """Identifies the predictor (weights sha256, oracle settings) for the prediction cache."""
    crop_size: int
    """Side of the predicted maps, pixels."""
    needs_frames: bool
    """Whether predict reads the frame's pixels (the oracle does not)."""
    predict: Callable[[int, np.ndarray | None, CropBox], UvwPrediction]
    """predict(video frame index, RGB frame or None, crop box)."""
    info: dict
    """What to report about the predictor (licence, weights)."""
    check_video: Callable[[np.ndarray, int, int], None] = lambda _indices, _height, _width: None
    """check_video(frame indices, height, width) raises TrackerError when the source cannot serve this video
    (the oracle: another video than its ground truth's)."""


def choose_source(cfg: DenseMarksStageConfig, model: FlameModel, device: torch.device) -> tuple[UvwSource | None, str]:
    """The predictor the configuration asks for, or None and why the stage does not run.

    mode off: None. oracle: the ground truth must be a synthetic sequence (TrackerError otherwise). auto: the
    network when its weights are given or already in the Hugging Face cache (nothing is downloaded). on: the
    network, downloading the weights if needed; missing weights are an error.
    """
    if cfg.mode == "off":
        return None, "densemarks.mode is off"
    if cfg.oracle:
        from tracker.densemarks.oracle import OracleDenseMarks, load_oracle_ground_truth

        return oracle_source(OracleDenseMarks(model, load_oracle_ground_truth(cfg.oracle_ground_truth, device))), ""
    try:
        path = resolve_weights_path(cfg.weights, offline=True if cfg.mode == "auto" and not cfg.weights else None)
    except MissingAssetError as error:
        if cfg.mode == "on" or cfg.weights:
            raise
        return None, f"DenseMarks weights not found ({error})"
    predictor = DenseMarksPredictor.from_weights(path, device)
    return UvwSource("network", predictor.model_id, predictor.crop_size, True,
                     lambda _index, rgb, box: predictor.predict(rgb, box),
                     {"weights": str(path), "weights_sha256": predictor.model_id, "license": LICENSE}), ""


def oracle_source(oracle: OracleDenseMarks) -> UvwSource:
    """The evaluation-only oracle as a uvw source (it renders from ground truth: no pixels needed)."""
    return UvwSource("oracle", oracle.model_id, oracle.crop_size, False,
                     lambda index, _rgb, box: oracle.predict(index, box), {"oracle_noise": asdict(oracle.noise)},
                     oracle.check_video)


# ---------------------------------------------------------------------------------------------------------------
# Crops and predictions
# ---------------------------------------------------------------------------------------------------------------


def head_vertex_ids(bundle: FlameBundle) -> torch.Tensor:
    """(S,) vertices that define the head's box: all but the neck regions."""
    excluded = np.concatenate([bundle.masks[r] for r in HEAD_EXCLUDED_REGIONS if r in bundle.masks] or [[]])
    return torch.from_numpy(np.setdiff1d(np.arange(bundle.model.n_vertices), excluded.astype(np.int64)))


@torch.no_grad()
def head_boxes(model: FlameModel, camera: Camera, params: FlameParams, valid: np.ndarray, vertex_ids: torch.Tensor,
               scale: float, smooth_frames: int = 5) -> list[CropBox]:
    """Square crop per frame around the projected head of each valid frame, `scale` times its bounding box;
    frames without a fit get boxes interpolated from their neighbours; centres and sizes are smoothed over
    `smooth_frames` frames. Returns [] when no frame is valid."""
    known = np.flatnonzero(valid)
    if not len(known):
        return []
    sub = model.restricted(vertex_ids.to(model.v_template.device))
    boxes = np.zeros((len(valid), 3))
    for start in range(0, len(known), 64):
        chunk = known[start:start + 64]
        pixels, _ = camera.project(sub(params.frames(torch.as_tensor(chunk))).vertices)
        low, high = pixels.amin(1), pixels.amax(1)
        side = (high - low).amax(-1) * scale
        boxes[chunk] = torch.cat([(low + high) / 2, side[:, None]], dim=1).cpu().numpy()
    frames = np.arange(len(valid))
    boxes = np.stack([np.interp(frames, known, boxes[known, k]) for k in range(3)], axis=1)
    if smooth_frames > 1 and len(valid) > 1:
        pad = smooth_frames // 2
        kernel = np.ones(smooth_frames) / smooth_frames
        boxes = np.stack([np.convolve(np.pad(boxes[:, k], pad, mode="edge"), kernel, "valid")
                          for k in range(3)], axis=1)[:len(valid)]
    return [CropBox(cx - side / 2, cy - side / 2, side) for cx, cy, side in boxes]


def predict_into_cache(source: UvwSource, cache: UvwCache, frame_indices: np.ndarray, boxes: list[CropBox],
                       frames: Callable[[], Iterable[Frame]], progress: Callable[[str], None] | None = None) -> int:
    """Predict every frame missing from the cache (decoding the video only when the source needs pixels);
    returns how many were predicted."""
    wanted = {int(index): t for t, index in enumerate(frame_indices) if int(index) not in cache}
    count = len(wanted)
    if source.needs_frames and wanted:
        for frame in frames():
            t = wanted.pop(frame.index, None)
            if t is not None:
                cache.put(frame.index, source.predict(frame.index, frame.rgb, boxes[t]))
                if progress:
                    progress("predict")
            if not wanted:
                break
    else:
        for index, t in list(wanted.items()):
            cache.put(index, source.predict(index, None, boxes[t]))
            wanted.pop(index)
            if progress:
                progress("predict")
    return count - len(wanted)


# ---------------------------------------------------------------------------------------------------------------
# Canonical map
# ---------------------------------------------------------------------------------------------------------------


def map_frames(result: TrackResult, count: int, max_error_factor: float = 2.0) -> np.ndarray:
    """Up to `count` valid frames spread over the video, leaving out fits worse than max_error_factor x the
    median landmark error."""
    errors = result.lmk_error_px
    good = np.flatnonzero(result.valid & np.isfinite(errors))
    if len(good):
        good = good[errors[good] <= max_error_factor * np.median(errors[good])]
    return evenly_spaced(good, count)


def initial_canonical_map(cfg: DenseMarksStageConfig, model: FlameModel, camera: Camera, result: TrackResult,
                          prediction: Callable[[int], UvwPrediction], model_id: str) -> tuple[CanonicalMap, dict]:
    """The configured map, or one estimated from the landmark fits of this video's well-fitted frames."""
    if cfg.canonical_map:
        return load_canonical_map(cfg.canonical_map, model.n_vertices), {"map_source": str(cfg.canonical_map)}
    frames = map_frames(result, cfg.map_frames)
    if not len(frames):
        raise MissingAssetError("no well-fitted frame to estimate the DenseMarks canonical map from: pass "
                                "densemarks.canonical_map")
    cmap = estimate_canonical_map(model, camera, result.params.frames(torch.as_tensor(frames)),
                                  [prediction(int(t)) for t in frames], frame_fit_weights(result.lmk_error_px[frames]),
                                  options=map_options(cfg), metadata={"predictor": model_id})
    return cmap, {"map_source": "estimated", "map_frames": len(frames)}


def map_options(cfg: DenseMarksStageConfig) -> CanonicalMapOptions:
    """Map estimation options from the stage configuration."""
    return CanonicalMapOptions(affine_prior=cfg.map_affine_prior)


def save_map_outputs(cmap: CanonicalMap, model: FlameModel, shape: torch.Tensor, out_dir: Path) -> dict:
    """Write the map (.npz) and its picture (.png) to out_dir; returns their paths for the report."""
    return {"map_path": str(save_canonical_map(out_dir / MAP_FILE, cmap)),
            "map_png": str(write_canonical_png(out_dir / MAP_PNG, model, cmap, shape)),
            "map_observed_fraction": round(float(cmap.observed.mean()), 4)}


# ---------------------------------------------------------------------------------------------------------------
# Per-frame observations
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DenseFrame:
    """One frame's dense observations: the extras the terms read, and what refreshing the gates needs."""

    extras: dict[str, torch.Tensor]
    """Term inputs with a leading frame axis of 1 (keys in tracker.energy.dense)."""
    match_distance: torch.Tensor
    """(K,) cube distance of each sampled vertex's match."""


def to_video_pixels(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Invert a (2, 3) video -> crop affine on (N, 2) crop points."""
    return (points - affine[:, 2]) @ np.linalg.inv(affine[:, :2]).T


def prepare_frame(prediction: UvwPrediction, canonical_tree: cKDTree, match_coords: np.ndarray,
                  render_cfg: DenseRenderConfig, corr_cfg: DenseCorrespondenceConfig,
                  device: torch.device) -> DenseFrame:
    """Term inputs from one prediction: the map at the fitting resolution with its validity and affine, and each
    sampled vertex's (K = len(match_coords)) nearest-uvw pixel in video pixels (gates still closed)."""
    side = prediction.uvw.shape[-1]
    uvw = resize_uvw(prediction.uvw, render_cfg.resolution)
    search_size = min(corr_cfg.search_resolution, side)
    search = resize_uvw(prediction.uvw, search_size)
    pixels, distance = match_uvw(search, prediction_validity(search, canonical_tree, render_cfg.valid_distance),
                                 match_coords)
    targets = to_video_pixels(crop_affine(prediction.frame_to_crop, search_size / side), pixels)

    def as_tensor(values) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, np.float32), device=device)

    extras = {
        UVW: as_tensor(uvw)[None],
        VALID: as_tensor(prediction_validity(uvw, canonical_tree, render_cfg.valid_distance))[None],
        TO_CROP: as_tensor(crop_affine(prediction.frame_to_crop, render_cfg.resolution / side))[None],
        CROP_PX: as_tensor([side / prediction.frame_to_crop[0, 0]]),
        CORR_TARGET: as_tensor(np.nan_to_num(targets))[None],
        CORR_WEIGHT: torch.zeros(1, len(match_coords), device=device),
    }
    return DenseFrame(extras, as_tensor(distance))


@torch.no_grad()
def refresh_gates(frame: DenseFrame, model: FlameModel, camera: Camera, params: FlameParams, vertex_ids: torch.Tensor,
                  corr_cfg: DenseCorrespondenceConfig, depth_tolerance_m: float) -> int:
    """Re-open the correspondence gates for the current pose (visibility, facing, image distance); returns the
    number kept."""
    extras = frame.extras
    vertices = model(params).vertices[0]
    visible, facing, _, _ = vertex_visibility(vertices, model.faces, camera, extras[TO_CROP][0], extras[UVW].shape[1],
                                              depth_tolerance_m)
    projected, _ = camera.project(vertices[vertex_ids])
    gate = correspondence_weights(extras[CORR_TARGET][0], frame.match_distance, projected, visible[vertex_ids],
                                  facing[vertex_ids], float(extras[CROP_PX][0]), corr_cfg)
    extras[CORR_WEIGHT] = gate[None]
    return int(gate.sum())


# ---------------------------------------------------------------------------------------------------------------
# Refinement
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DenseFitter:
    """Fits single frames with the dense terms added to a landmark problem."""

    lm_problem: Problem
    """Landmark, prior, temporal and correspondence terms (residuals without rendering: LM can use them)."""
    adam_problem: Problem
    """All terms, render-and-compare included."""
    vertex_ids: torch.Tensor
    """(K,) vertices of the correspondence term."""
    cfg: TrackerConfig
    free: tuple[str, ...]

    @property
    def stage(self) -> DenseMarksStageConfig:
        return self.cfg.densemarks

    def gates(self, frame: DenseFrame, params: FlameParams) -> int:
        return refresh_gates(frame, self.lm_problem.model, self.lm_problem.camera, params, self.vertex_ids,
                             self.cfg.energy.dense_corr, CanonicalMapOptions().depth_tolerance_m)

    def fit(self, start: FlameParams, obs: Observations, frame: DenseFrame,
            reference: FlameParams | None) -> tuple[FlameParams, int]:
        """Refined parameters of one frame and its number of kept correspondences."""
        params = start
        if self.cfg.energy.dense_corr.weight > 0:
            for _ in range(self.stage.rounds):
                self.gates(frame, params)
                params = fit_lm(self.lm_problem, params, obs, self.free, self.stage.lm_iters, reference)[0]
        inliers = self.gates(frame, params)
        if self.stage.iters and self.cfg.energy.dense_render.weight > 0:
            params = fit_adam(self.adam_problem, params, obs, self.free, self.stage.iters, self.cfg.fit.lr, reference)
            inliers = self.gates(frame, params)
        return params, inliers


def build_fitter(problem: Problem, canonical: torch.Tensor, bundle: FlameBundle, cfg: TrackerConfig) -> DenseFitter:
    """The dense terms (as configured) on top of `problem`'s terms."""
    excluded = np.concatenate([bundle.masks[r] for r in MATCH_EXCLUDED_REGIONS if r in bundle.masks] or [[]])
    ids = correspondence_vertices(problem.model.n_vertices, cfg.energy.dense_corr.vertices, excluded.astype(np.int64),
                                  cfg.seed)
    vertex_ids = torch.as_tensor(ids, device=canonical.device)
    energy = cfg.energy
    corr = [DenseCorrespondenceEnergy(energy.dense_corr, problem.model, vertex_ids)] if energy.dense_corr.weight else []
    render = [DenseRenderEnergy(energy.dense_render, canonical)] if energy.dense_render.weight else []
    base: list[EnergyTerm] = list(problem.terms)
    free = tuple(LANDMARK_FIELDS) + (("neck_pose",) if cfg.densemarks.free_neck else ())
    return DenseFitter(problem.with_terms(base + corr), problem.with_terms(base + corr + render), vertex_ids, cfg,
                       tuple(f for f in FRAME_FIELDS if f in free))


def head_size(model: FlameModel, shape: torch.Tensor) -> torch.Tensor:
    """() RMS distance of the neutral head's vertices from their centroid for identity shape (1, n_shape)."""
    vertices = model.v_template + model.dirs[:, :, :model.n_shape] @ shape[0]
    return (vertices - vertices.mean(0)).square().sum(-1).mean().sqrt()


class HeadSizeEnergy:
    """Holds the neutral head's size at that of a reference identity while the identity is re-estimated.

    A single camera sees size and distance only together, and an estimated canonical map is itself only known up
    to an affine transform, so dense terms can trade head size against depth; the landmark stage's size (set by
    the shape prior) is kept. Residual (B, 1): the relative size change, shared out over the frames.
    """

    name = "head_size"

    def __init__(self, model: FlameModel, reference_shape: torch.Tensor, weight: float = 1e4):
        self.model = model
        self.reference = head_size(model, reference_shape).detach()
        self.weight = weight

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        batch = ev.params.batch_size
        change = head_size(self.model, ev.params.shape) / self.reference - 1
        return (self.weight / batch) ** 0.5 * change.expand(batch, 1)


def refine_identity(fitter: DenseFitter, result: TrackResult, obs: Observations,
                    dense_frame: Callable[[int], DenseFrame], keyframes: np.ndarray) -> FlameParams:
    """Keyframe parameters with the shared identity re-estimated by the correspondence term: DenseMarks sees the
    whole head (profile, ears, skull), which pins the shape far better than face landmarks do; the head's size
    stays that of the landmark identity (`HeadSizeEnergy`). With densemarks.free_focal (and no configured
    focal) the focal length is re-estimated too and written into the problem's camera, which every later step
    shares."""
    frames = [dense_frame(int(t)) for t in keyframes]
    index = torch.as_tensor(keyframes, device=obs.landmarks.device)
    params = result.params.frames(index)
    problem = fitter.lm_problem
    problem = problem.with_terms([*problem.terms, HeadSizeEnergy(problem.model, result.params.shape)])
    free_focal = fitter.stage.free_focal and fitter.cfg.camera.focal is None
    for _ in range(fitter.stage.rounds):
        for i, frame in enumerate(frames):
            fitter.gates(frame, params.frames(slice(i, i + 1)))
        extras = {key: torch.cat([frame.extras[key] for frame in frames]) for key in frames[0].extras}
        params, focal = fit_lm(problem, params, replace(obs.frames(index), extras=extras), fitter.free,
                               fitter.stage.lm_iters, free_shape=True, free_focal=free_focal,
                               focal_prior=FOCAL_PRIOR * len(keyframes))
        problem.camera.focal = focal
    return params


def refine_sequence_dense(fitter: DenseFitter, result: TrackResult, obs: Observations,
                          dense_frame: Callable[[int], DenseFrame | None],
                          progress: Callable[[str], None] | None = None) -> tuple[TrackResult, dict]:
    """Refine every frame that has dense observations, in order (temporal reference: the refined predecessors).

    Each frame starts from its landmark fit or the constant-velocity prediction from its refined predecessors,
    whichever more correspondences agree with; frames without landmarks (fitted when densemarks.track_lost)
    become valid when at least min_inliers of the sampled vertices keep a correspondence.
    """
    stage = fitter.stage
    T = len(result.valid)
    K = len(fitter.vertex_ids)
    refined: list[FlameParams] = []
    valid = result.valid.copy()
    errors = result.lmk_error_px.copy()
    inlier_fraction = np.full(T, np.nan, np.float32)
    rejected = np.zeros(T, bool)
    prev = prev2 = None
    for t in range(T):
        landmark_fit = result.params.frames(slice(t, t + 1))
        frame = dense_frame(t) if (result.valid[t] or (stage.track_lost and prev is not None)) else None
        if frame is None:
            refined.append(landmark_fit)
            prev = prev2 = None
        else:
            frame_obs = obs.frames(slice(t, t + 1))
            frame_obs = replace(frame_obs, extras=frame.extras)  # the same dict: gate refreshes reach the terms
            reference = predict_next(prev, prev2) if prev is not None else None
            # Landmark fits fail at steep yaw: start from whichever of it and the motion prediction more
            # correspondences agree with (the landmark fit on ties). Landmarks whose own fit far fewer
            # correspondences agree with are detector failures: the frame is fitted without them.
            agree = [fitter.gates(frame, landmark_fit) if result.valid[t] else -1,
                     fitter.gates(frame, reference) if reference is not None else -1]
            start = landmark_fit if agree[0] >= agree[1] else reference
            if 0 <= agree[0] < LANDMARK_AGREEMENT * agree[1]:
                frame_obs = replace(frame_obs, landmark_weights=torch.zeros_like(frame_obs.landmark_weights))
                rejected[t] = True
            params, inliers = fitter.fit(start, frame_obs, frame, reference)
            inlier_fraction[t] = inliers / max(K, 1)
            if result.valid[t] or inlier_fraction[t] >= stage.min_inliers:
                valid[t] = True
                has_landmarks = bool((frame_obs.landmark_weights > 0).any())
                errors[t] = float(landmark_error_px(fitter.lm_problem, params, frame_obs)[0]) if has_landmarks \
                    else np.nan
                refined.append(params)
                prev2, prev = prev, params
            else:
                refined.append(landmark_fit)
                prev = prev2 = None
        if progress:
            progress("refine")
    stacked = FlameParams(shape=result.params.shape,
                          **{n: torch.cat([getattr(p, n) for p in refined]) for n in FRAME_FIELDS})
    counts = {"frames_refined": int(np.isfinite(inlier_fraction).sum()),
              "frames_without_landmarks_tracked": int((valid & ~result.valid).sum()),
              "landmark_detections_rejected": int(rejected.sum()),
              "inlier_fraction_mean": round(float(np.nanmean(inlier_fraction)), 4) if np.isfinite(inlier_fraction).any()
              else None}
    return replace(result, params=stacked, valid=valid, lmk_error_px=np.asarray(errors, np.float32)), counts


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def run_densemarks_stage(problem: Problem, result: TrackResult, obs: Observations, frame_indices: np.ndarray,
                         frames: Callable[[], Iterable[Frame]], bundle: FlameBundle, cfg: TrackerConfig,
                         out_dir: str | Path, progress: Callable[[str], None] | None = None,
                         source: UvwSource | None = None) -> tuple[TrackResult, dict]:
    """Refine a landmark track with DenseMarks; returns the refined track (or `result` unchanged when the stage
    does not run) and what to report (info["ran"], predictor, licence, map source, timings, ...).

    problem: the landmark stage's problem (its model, camera and terms are reused); obs: the landmark
    observations of all T frames; frame_indices: (T,) video index of each tracked frame; frames(): re-decodes
    the selected frames at full resolution (called only when the network has frames to predict); progress(step)
    is called once per predicted frame ("predict") and once per frame of the refinement ("refine"); source: a
    uvw source to use instead of the configured one (evaluation: an oracle with chosen degradations).
    """
    device = problem.model.v_template.device
    reason = ""
    if source is None:
        source, reason = choose_source(cfg.densemarks, problem.model, device)
    if source is None:
        return result, {"ran": False, "reason": reason}
    source.check_video(np.asarray(frame_indices), problem.camera.height, problem.camera.width)
    info: dict = {"ran": False, "predictor": source.kind, "model_id": source.model_id, **source.info}
    if cfg.energy.dense_corr.weight <= 0 and cfg.energy.dense_render.weight <= 0:
        return result, {**info, "reason": "energy.dense_corr.weight and energy.dense_render.weight are both 0"}
    out_dir = Path(out_dir)
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    boxes = head_boxes(problem.model, problem.camera, result.params, result.valid, head_vertex_ids(bundle),
                       cfg.densemarks.crop_scale)
    if not boxes:
        return result, {**info, "reason": "no tracked frame to place a head crop on"}
    cache = UvwCache(Path(cfg.densemarks.cache_dir) if cfg.densemarks.cache_dir else out_dir / "cache" / "densemarks",
                     source.model_id, source.crop_size)
    info["frames_predicted"] = predict_into_cache(source, cache, frame_indices, boxes, frames, progress)
    seconds["predict"] = time.perf_counter() - start

    def prediction(t: int) -> UvwPrediction:
        stored = cache.get(int(frame_indices[t]))
        if stored is None:  # the cache was emptied under us
            raise MissingAssetError(f"DenseMarks prediction of frame {frame_indices[t]} vanished from "
                                    f"{cache.directory}: run again")
        return stored

    # Mesh-sized tensors: one thread is fastest (extra threads only add synchronisation, worse on busy CPUs).
    with torch_threads(1):
        start = time.perf_counter()
        cmap, map_info = initial_canonical_map(cfg.densemarks, problem.model, problem.camera, result, prediction,
                                               source.model_id)
        info.update(map_info)

        def setup(cmap: CanonicalMap) -> tuple[DenseFitter, Callable[[int], DenseFrame]]:
            fitter = build_fitter(problem, cmap.tensor(device), bundle, cfg)
            tree = cKDTree(cmap.coords)
            match_coords = cmap.coords[fitter.vertex_ids.cpu().numpy()]
            return fitter, lambda t: prepare_frame(prediction(t), tree, match_coords, cfg.energy.dense_render,
                                                   cfg.energy.dense_corr, device)

        fitter, dense_frame = setup(cmap)
        if cfg.densemarks.identity and cfg.energy.dense_corr.weight > 0:
            # Alternate identity (keyframes, dense correspondences) and map (re-estimated from those fits): the
            # map made from landmark fits carries their shape error, which the better identity then removes.
            keyframes = choose_keyframes(result.valid, cfg.fit.keyframes)
            for _ in range(cfg.densemarks.map_rounds):
                key_params = refine_identity(fitter, result, obs, dense_frame, keyframes)
                result = replace(result, params=replace(result.params, shape=key_params.shape),
                                 focal=float(problem.camera.focal))
                if not cfg.densemarks.canonical_map:
                    cmap = estimate_canonical_map(problem.model, problem.camera, key_params,
                                                  [prediction(int(t)) for t in keyframes],
                                                  options=map_options(cfg.densemarks),
                                                  metadata={"predictor": source.model_id})
                    fitter, dense_frame = setup(cmap)
        info["focal_px"] = round(float(problem.camera.focal), 2)
        if not cfg.densemarks.canonical_map:
            info.update(save_map_outputs(cmap, problem.model, result.params.shape, out_dir))
        seconds["identity_and_map"] = time.perf_counter() - start

        start = time.perf_counter()
        refined, counts = refine_sequence_dense(fitter, result, obs, dense_frame, progress)
        seconds["refine"] = time.perf_counter() - start
    info.update(counts, ran=True, seconds={k: round(v, 2) for k, v in seconds.items()})
    return refined, info
