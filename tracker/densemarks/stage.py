"""The DenseMarks stage: refine a landmark track with dense canonical-coordinate terms.

    result, info = run_densemarks_stage(problem, result, obs, frame_indices, frames, bundle, cfg, out_dir)

1. Predictor: the network when its weights are found (mode auto/on), or the evaluation-only oracle on synthetic
   sequences (`densemarks.oracle`).
2. Crops: square boxes around the tracked head, interpolated over frames without a fit.
3. Predictions: uvw maps per frame, cached per video (float16 + crop affine), so re-runs skip the network.
4. Canonical map and identity: the map is loaded (`densemarks.canonical_map`) or estimated from the landmark fits
   of the well-fitted frames; then the shared identity and focal length are re-estimated on keyframes with the
   correspondence term (tracker.densemarks.fitting), alternating, for an estimated map, with re-estimating the
   map from those keyframe fits. An estimated map is saved with a PNG.
5. Refinement, frame by frame in order (tracker.densemarks.fitting): each candidate vertex is matched once to
   the sub-pixel position with the nearest uvw; rounds of (gates at the current pose, Levenberg-Marquardt on
   sampled correspondences + the landmark stage's re-weighted terms). Frames without landmarks are fitted too
   and kept when enough correspondences hold; landmarks that contradict the dense evidence (detector failures
   near profile) are dropped for their frame. The image-stage guard (tracker.fit.guard) then returns frames the
   refinement moved far from their landmark fit without cause to that fit.
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
    estimate_canonical_map,
    frame_fit_weights,
    load_canonical_map,
    network_map_path,
    save_canonical_map,
    write_canonical_png,
)
from tracker.densemarks.fitting import (
    DenseFitter,
    build_fitter,
    guarded,
    refine_identity,
    refine_sequence_dense,
    rescale_to_camera,
)
from tracker.densemarks.frames import DenseFrame, prepare_frame
from tracker.densemarks.predict import CropBox, DenseMarksPredictor, UvwCache, UvwPrediction
from tracker.densemarks.weights import LICENSE, resolve_weights_path
from tracker.energy.base import Observations
from tracker.errors import MissingAssetError
from tracker.fit.sequence import TrackResult, choose_keyframes, evenly_spaced
from tracker.fit.solver import LANDMARK_FIELDS, Problem, fit_lm, torch_threads
from tracker.flame.assets import FlameBundle
from tracker.flame.model import FlameModel, FlameParams
from tracker.io.video import Frame

if TYPE_CHECKING:
    from tracker.densemarks.oracle import OracleDenseMarks

HEAD_EXCLUDED_REGIONS = ("neck", "boundary")
"""FLAME_masks regions left out of the crop box (the neck's lower edge is not part of the head)."""
MATCH_EXCLUDED_REGIONS = ("left_eyeball", "right_eyeball")
"""Regions without correspondences: eyeballs turn with the gaze, so their canonical position is ambiguous."""
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
    map_key: str = ""
    """Names the predictor's cube for per-network canonical maps (<maps_dir>/<map_key>.npz); '' for none."""
    check_video: Callable[[np.ndarray, int, int], None] = lambda _indices, _height, _width: None
    """check_video(frame indices, height, width) raises TrackerError when the source cannot serve this video
    (the oracle: another video than its ground truth's)."""


REFIT_FOCAL_CHANGE = 0.25
"""When the identity step moved the focal length by more than this fraction, every landmark fit is also re-fitted
to its landmarks under the new camera and identity, as one more start for its frame: a landmark fit merely moved
along its viewing ray (`rescale_to_camera`) keeps the expression and pose fitted under the wrong focal length
(fast synthetic motion, focal 43% short after the landmark stage: 4-10 frames ended far off without it)."""


def refit_landmark_track(problem: Problem, track: TrackResult, obs: Observations, iters: int,
                         chunk: int = 16) -> FlameParams:
    """The track's parameters with its fitted frames re-fitted to their landmarks (problem's landmark-stage terms,
    `iters` LM steps, `chunk` frames per solve) under problem's camera and the track's identity."""
    params = track.params.detach()
    fitted = np.flatnonzero(track.valid)
    for begin in range(0, len(fitted), chunk):
        rows = torch.as_tensor(fitted[begin:begin + chunk], device=obs.landmarks.device)
        refit = fit_lm(problem, params.frames(rows), obs.frames(rows), LANDMARK_FIELDS, iters, independent=True)[0]
        for name in LANDMARK_FIELDS:
            getattr(params, name)[rows] = getattr(refit, name)
    return params


def choose_source(cfg: DenseMarksStageConfig, model: FlameModel, device: torch.device) -> tuple[UvwSource | None, str]:
    """The predictor the configuration asks for, or None and why the stage does not run.

    mode off: None. oracle: the ground truth must be a synthetic sequence (TrackerError otherwise). auto: the
    network when its weights are given or already in the Hugging Face cache (nothing is downloaded). on: the
    network, downloading the weights if needed; missing weights are an error.
    """
    if cfg.mode == "off":
        return None, "densemarks.mode is off"
    if cfg.oracle:
        from tracker.densemarks.oracle import CALIBRATED_NOISE, OracleDenseMarks, OracleNoise, load_oracle_ground_truth

        noise = CALIBRATED_NOISE if cfg.oracle_noise == "calibrated" else OracleNoise()
        return oracle_source(OracleDenseMarks(model, load_oracle_ground_truth(cfg.oracle_ground_truth, device),
                                              noise)), ""
    try:
        path = resolve_weights_path(cfg.weights, offline=True if cfg.mode == "auto" and not cfg.weights else None)
    except MissingAssetError as error:
        if cfg.mode == "on" or cfg.weights:
            raise
        return None, f"DenseMarks weights not found ({error})"
    predictor = DenseMarksPredictor.from_weights(path, device, backend=cfg.backend, precision=cfg.precision)
    return UvwSource("network", predictor.model_id, predictor.crop_size, True,
                     lambda _index, rgb, box: predictor.predict(rgb, box),
                     {"weights": str(path), "weights_sha256": predictor.model_id, "license": LICENSE,
                      "backend": predictor.backend, "precision": predictor.precision},
                     map_key=f"densemarks-{predictor.model_id[:16]}"), ""


def oracle_source(oracle: OracleDenseMarks) -> UvwSource:
    """The evaluation-only oracle as a uvw source (it renders from ground truth: no pixels needed)."""
    return UvwSource("oracle", oracle.model_id, oracle.crop_size, False,
                     lambda index, _rgb, box: oracle.predict(index, box), {"oracle_noise": asdict(oracle.noise)},
                     check_video=oracle.check_video, map_key=oracle.map_key)


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
                          prediction: Callable[[int], UvwPrediction], source: UvwSource) -> tuple[CanonicalMap, dict]:
    """The configured map, else the predictor's per-network map when one was built (`network_map_path`), else
    one estimated from the landmark fits of this video's well-fitted frames (map_source "estimated")."""
    if cfg.canonical_map:
        return load_canonical_map(cfg.canonical_map, model.n_vertices), {"map_source": str(cfg.canonical_map)}
    network_map = network_map_path(cfg.maps_dir, source.map_key)
    if network_map is not None and network_map.is_file():
        return load_canonical_map(network_map, model.n_vertices), {"map_source": f"per-network {network_map}"}
    frames = map_frames(result, cfg.map_frames)
    if not len(frames):
        raise MissingAssetError("no well-fitted frame to estimate the DenseMarks canonical map from: pass "
                                "densemarks.canonical_map")
    cmap = estimate_canonical_map(model, camera, result.params.frames(torch.as_tensor(frames)),
                                  [prediction(int(t)) for t in frames], frame_fit_weights(result.lmk_error_px[frames]),
                                  options=map_options(cfg), metadata={"predictor": source.model_id})
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
    info: dict = {"ran": False, "predictor": source.kind, "model_id": source.model_id, "map_key": source.map_key,
                  "crop_size": source.crop_size, **source.info}
    if cfg.energy.dense_corr.weight <= 0:
        return result, {**info, "reason": "energy.dense_corr.weight is 0"}
    out_dir = Path(out_dir)
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    boxes = head_boxes(problem.model, problem.camera, result.params, result.valid, head_vertex_ids(bundle),
                       cfg.densemarks.crop_scale)
    if not boxes:
        return result, {**info, "reason": "no tracked frame to place a head crop on"}
    cache = UvwCache(Path(cfg.densemarks.cache_dir) if cfg.densemarks.cache_dir else out_dir / "cache" / "densemarks",
                     source.model_id, source.crop_size)
    info["cache_dir"] = str(cache.directory)
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
                                               source)
        info.update(map_info)
        estimated = map_info["map_source"] == "estimated"
        excluded = np.concatenate([bundle.masks[r] for r in MATCH_EXCLUDED_REGIONS if r in bundle.masks] or [[]])

        def setup(cmap: CanonicalMap) -> tuple[DenseFitter, Callable[[int], DenseFrame]]:
            fitter = build_fitter(problem, cmap.tensor(device), excluded.astype(np.int64), cfg)
            tree = cKDTree(cmap.coords)
            match_coords = cmap.coords[fitter.vertex_ids.cpu().numpy()]
            return fitter, lambda t: prepare_frame(prediction(t), tree, match_coords, cfg.energy.dense_render,
                                                   cfg.energy.dense_corr, device, fitter.render is not None)

        fitter, dense_frame = setup(cmap)
        working = result  # the landmark fits, moved to the stage's identity and camera as they change
        if cfg.densemarks.identity:
            # Identity and focal from keyframe correspondences; with a map estimated from this video, alternate
            # with re-estimating the map from those keyframe fits (the first map carries the landmark fits' error).
            # Frames without a landmark fit count too (posed from their matches): profiles show the most.
            tracked = np.ones_like(result.valid) if cfg.densemarks.track_lost else result.valid
            keyframes = choose_keyframes(tracked, cfg.densemarks.keyframes)
            key_obs = obs.frames(torch.as_tensor(keyframes, device=obs.landmarks.device))
            free_focal = cfg.densemarks.free_focal and cfg.camera.focal is None
            for round_ in range(max(cfg.densemarks.map_rounds, 1) if estimated else 1):
                key_params, used = refine_identity(fitter, working.params.frames(torch.as_tensor(keyframes)),
                                                   key_obs, [dense_frame(int(t)) for t in keyframes], free_focal,
                                                   estimated)
                info["identity_keyframes"] = int(used.sum())
                if not used.any():
                    break
                focal = float(problem.camera.focal)
                working = replace(working, params=rescale_to_camera(
                    replace(working.params, shape=key_params.shape), working.focal, focal), focal=focal)
                if estimated and round_ + 1 < cfg.densemarks.map_rounds:
                    cmap = estimate_canonical_map(problem.model, problem.camera, key_params,
                                                  [prediction(int(t)) for t in keyframes[used]],
                                                  options=map_options(cfg.densemarks),
                                                  metadata={"predictor": source.model_id})
                    fitter, dense_frame = setup(cmap)
        info["focal_px"] = round(float(problem.camera.focal), 2)
        if estimated:
            info.update(save_map_outputs(cmap, problem.model, working.params.shape, out_dir))
        seconds["identity_and_map"] = time.perf_counter() - start

        start = time.perf_counter()
        refits = (refit_landmark_track(problem, working, obs, cfg.fit.first_frame_iters)
                  if abs(working.focal / result.focal - 1) > REFIT_FOCAL_CHANGE else None)
        refined, evidence = refine_sequence_dense(fitter, working, obs, dense_frame, progress, refits)
        refined, report = guarded(fitter, problem, result, refined, obs, evidence, cfg.guard,
                                  cfg.fit.first_frame_iters)
        if report.sequence_fallback:  # the landmark track stands, with its own focal length
            problem.camera.focal = torch.as_tensor(result.focal, dtype=problem.camera.focal.dtype, device=device)
            info["focal_px"] = round(float(result.focal), 2)
        seconds["refine"] = time.perf_counter() - start
    info.update(evidence["counts"], guard=report.to_dict(), ran=True,
                seconds={k: round(v, 2) for k, v in seconds.items()})
    return refined, info
