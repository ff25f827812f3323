"""One tracking run: video -> landmarks -> FLAME fit -> outputs. The CLI (tracker/run.py) is a thin shell
around `track_video`."""

from __future__ import annotations

import logging
import platform
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import tracker
from tracker.camera import Camera
from tracker.config import TrackerConfig, config_to_dict
from tracker.densemarks.stage import run_densemarks_stage
from tracker.detect.base import SCHEME_IBUG68, SCHEME_MEDIAPIPE, LandmarkTrack, make_detector
from tracker.detect.sequence import detect_video
from tracker.energy.base import Observations
from tracker.energy.contour import POINTS_KEY as CONTOUR_POINTS
from tracker.energy.contour import WEIGHTS_KEY as CONTOUR_WEIGHTS
from tracker.energy.contour import ContourEnergy
from tracker.energy.landmarks import LandmarkEnergy, landmark_group_weights
from tracker.energy.photometric import Appearance, region_mesh
from tracker.energy.priors import PriorEnergy
from tracker.energy.temporal import TemporalEnergy
from tracker.errors import TrackerError
from tracker.fit.global_refine import refine_globally
from tracker.fit.photometric import run_photometric_stage, stage_crop
from tracker.fit.sequence import SequenceTracker, TrackResult
from tracker.fit.solver import FRAME_FIELDS, Problem
from tracker.flame.assets import DEFAULT_MODEL_NOTE, FlameBundle, load_flame_bundle
from tracker.flame.landmarks import LandmarkSet
from tracker.flame.model import FlameModel, FlameParams
from tracker.io.appearance import write_appearance
from tracker.io.export import FrameTable, flame_arrays, write_json, write_obj, write_params
from tracker.io.overlay_video import write_overlay_video
from tracker.io.report import write_report
from tracker.io.video import FrameSelection, probe_video, read_frames

SCHEME_OF_DETECTOR = {"mediapipe": SCHEME_MEDIAPIPE, "dlib": SCHEME_IBUG68, "fan": SCHEME_IBUG68}
PARTIAL_WRITE_EVERY = 25
"""Frames between rewrites of the partial npz during tracking."""
log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrackerError(f"--device {name} asked for, but CUDA is not available in this torch build/machine")
    return device


def landmark_problem(track: LandmarkTrack, model: FlameModel, landmarks: LandmarkSet, camera: Camera,
                     cfg: TrackerConfig, scheme: str) -> tuple[Observations, Problem]:
    """The landmark stage's observations (on the camera's device) and Problem (landmark, face-outline, prior
    and temporal terms): what every later stage refines."""
    outline = landmarks.outline is not None and cfg.energy.contour.weight > 0
    group_weights = landmark_group_weights(scheme, landmarks.detector_index, cfg.energy.landmarks,
                                           None if landmarks.sigma is None else landmarks.sigma.cpu())
    if outline:  # outline points slide along the silhouette instead of sitting on fixed vertices
        on_outline = torch.isin(landmarks.detector_index, landmarks.outline_index.cpu())
        group_weights = torch.where(on_outline, torch.zeros_like(group_weights), group_weights)
    obs = observations_from_track(track, landmarks, group_weights, camera.focal.device, outline)
    terms = [LandmarkEnergy(cfg.energy.landmarks), PriorEnergy(cfg.energy.priors, model),
             TemporalEnergy(cfg.energy.temporal)]
    if outline:
        terms.insert(1, ContourEnergy(cfg.energy.contour, model, landmarks.outline))
    return obs, Problem(model, landmarks, camera, terms, jacobian="differences")


def observations_from_track(track: LandmarkTrack, landmarks: LandmarkSet, group_weights: torch.Tensor,
                            device: torch.device, outline: bool = False) -> Observations:
    """Detected points in embedding order; missing frames/points get weight 0. With `outline`, the scheme's
    face-outline points go to extras for the sliding-contour term."""
    conf_all = track.confidence * track.valid[:, None]
    conf_all = np.where(np.isfinite(track.points).all(-1), conf_all, 0.0)
    points_all = np.nan_to_num(track.points)
    idx = landmarks.detector_index.numpy()
    pts, conf = points_all[:, idx], conf_all[:, idx]
    finite = conf > 0
    lo = np.where(finite[..., None], pts, np.inf).min(1)
    hi = np.where(finite[..., None], pts, -np.inf).max(1)
    size = np.where(track.valid, np.linalg.norm(hi - lo, axis=-1), 1.0)
    size = np.where(np.isfinite(size) & (size > 1), size, 1.0)
    to = lambda a: torch.as_tensor(np.asarray(a, np.float32), device=device)
    extras = {}
    if outline:
        out = landmarks.outline_index.cpu().numpy()
        extras = {CONTOUR_POINTS: to(points_all[:, out]), CONTOUR_WEIGHTS: to(conf_all[:, out])}
    return Observations(to(pts), to(conf) * group_weights.to(device)[None], to(size), extras=extras)


@dataclass
class RunSummary:
    """What a run did; written as summary.json and printed at the end."""

    video: str
    out_dir: str
    frames: int
    valid_frames: int
    invalid_frame_indices: list[int]
    reinitialised_frames: int
    seconds: dict[str, float] = field(default_factory=dict)
    seconds_per_frame: dict[str, float] = field(default_factory=dict)
    lmk_error_px_mean: float = float("nan")
    lmk_error_px_p95: float = float("nan")
    focal_px: float = float("nan")
    focal: dict = field(default_factory=dict)
    """How the focal length was found: px, fov_deg, source (given | estimated from the keyframes | prior, when
    they left it uncertain) and log_std (the estimate's standard deviation in log focal)."""
    outputs: dict[str, str] = field(default_factory=dict)
    stages: dict = field(default_factory=dict)
    """Each refinement stage's status, {name: {"ran": bool, "reason": why not, ...}}; DenseMarks adds its
    predictor, licence, map and timings."""
    flame_model: dict = field(default_factory=dict)
    """The head model used: name, file, sha256, licence, whether it is the shipped default (not FLAME)."""
    complete: bool = True


class OutputWriter:
    """Collects finished frames and rewrites the npz every few frames (and at the end)."""

    def __init__(self, out_dir: Path, camera: Camera, fps: float, metadata: dict, track: LandmarkTrack):
        self.path = out_dir / "flame_params.npz"
        self.camera, self.fps, self.metadata, self.track = camera, fps, metadata, track
        self.done: dict[int, tuple] = {}

    def add(self, t: int, params, err: float, _reinit: bool) -> None:
        self.done[t] = (params, err)
        if len(self.done) % PARTIAL_WRITE_EVERY == 0:
            self.write_partial()

    def write_partial(self) -> None:
        """Finished frames only, marked incomplete."""
        if not self.done:
            return
        ts = sorted(self.done)
        params = [self.done[t][0] for t in ts]
        stacked = FlameParams(shape=params[0].shape,
                              **{n: torch.cat([getattr(p, n) for p in params]) for n in FRAME_FIELDS})
        table = FrameTable(stacked, self.track.frame_indices[ts], self.track.timestamps[ts],
                           np.ones(len(ts), bool), np.array([self.done[t][1] for t in ts], np.float32))
        write_params(self.path, table, self.camera, self.fps, {**self.metadata, "complete": False})

    def write_final(self, table: FrameTable) -> None:
        write_params(self.path, table, self.camera, self.fps, {**self.metadata, "complete": True})

    @contextmanager
    def keep_partial_on_failure(self) -> Iterator[None]:
        """On any failure or interrupt inside the block, write the finished frames, then re-raise."""
        try:
            yield
        except BaseException:
            self.write_partial()
            raise


def build_metadata(cfg: TrackerConfig, bundle: FlameBundle, video: Path, detector_settings: dict) -> dict:
    return {
        "tool": "tracker", "tool_version": tracker.__version__, "torch_version": torch.__version__,
        "video": str(video), "flame_file": str(bundle.flame_file), "flame_sha256": bundle.model.sha256,
        "flame_assets_dir": str(bundle.assets_dir), "flame_vertices": bundle.model.n_vertices,
        "flame_name": bundle.model.name, "flame_model": bundle.model_record,
        "n_shape": bundle.model.n_shape, "n_expr": bundle.model.n_expr,
        "eyelid_blendshapes": bundle.model.has_eyelids, "landmark_scheme": bundle.landmarks.scheme,
        "detector": detector_settings, "config": config_to_dict(cfg), "machine": platform.platform(),
        "conventions": "world = FLAME(shape, expr, [rotation, neck_pose, jaw_pose, eyes_pose], eyelids) + "
                       "translation; pixel = K (R X + t) / depth, OpenCV axes, pixel centres at integers",
    }


def track_video(video: str | Path, cfg: TrackerConfig, show_progress: bool = True) -> RunSummary:
    """Track one video with the given configuration and write all outputs; returns the summary."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    video = Path(video)
    info = probe_video(video)
    out_dir = Path(cfg.output.dir) / video.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    selection = FrameSelection(cfg.video.start, cfg.video.max_frames, cfg.video.stride)
    timings: dict[str, float] = {}

    scheme = SCHEME_OF_DETECTOR[cfg.detect.landmarks]
    bundle = load_flame_bundle(cfg.flame.path, cfg.flame.assets_dir, cfg.flame.n_shape, cfg.flame.n_expr,
                               scheme, cfg.flame.eyelids)
    if bundle.is_default:
        print(DEFAULT_MODEL_NOTE, flush=True)
    model = bundle.model.to(device)
    landmarks = bundle.landmarks.to(device)

    with _timed(timings, "detection"):
        track, detector_settings = detect_landmarks(video, cfg, selection, info.n_frames, out_dir, show_progress)
    if len(track) == 0:
        raise TrackerError(f"{video}: no frames selected (start {cfg.video.start} is past the end?)")

    camera = Camera.from_image(info.height, info.width, cfg.camera.fov_prior_deg, cfg.camera.focal, device)
    obs, problem = landmark_problem(track, model, landmarks, camera, cfg, scheme)
    metadata = build_metadata(cfg, bundle, video, detector_settings)
    writer = OutputWriter(out_dir, camera, info.fps, metadata, track)

    with writer.keep_partial_on_failure():
        result, focal = fit_landmarks(problem, obs, track, cfg, writer, timings, show_progress)
    stage_energy = {"landmarks": frame_energy(problem, result, obs)}
    # The landmark track is complete and safe on disk before the (slower) image stages refine it.
    writer.write_final(FrameTable(result.params, track.frame_indices, track.timestamps, result.valid,
                                  result.lmk_error_px, stage_energy))
    outputs = {"params": str(writer.path)}

    frames = lambda: read_frames(video, selection)
    with _timed(timings, "densemarks"):
        result, writer.metadata["densemarks"] = densemarks_stage(problem, result, obs, track, frames, bundle, cfg,
                                                                 out_dir, show_progress)
    if writer.metadata["densemarks"].get("ran"):
        stage_energy["densemarks"] = frame_energy(problem, result, obs)
    textured = None  # the photometric stage's appearance and regions, for the overlay
    photometric = {"ran": False, "reason": "photometric.enabled is off"}
    if cfg.photometric.enabled:
        with _timed(timings, "photometric"):
            result, files, appearance = photometric_stage(problem, result, obs, frames, (info.height, info.width),
                                                          bundle, cfg, out_dir, show_progress)
        outputs.update(files)
        photometric = {"ran": appearance is not None, "reason": "" if appearance else "no frame has a landmark fit"}
        if appearance is not None:
            textured = (appearance, region_mesh(model, bundle.masks, cfg.energy.photometric.regions))
            stage_energy["photometric"] = frame_energy(problem, result, obs)
    stages = {"densemarks": writer.metadata["densemarks"], "photometric": photometric}
    writer.metadata["stages"] = {name: bool(status.get("ran")) for name, status in stages.items()}
    table = FrameTable(result.params, track.frame_indices, track.timestamps, result.valid, result.lmk_error_px,
                       stage_energy)
    writer.write_final(table)

    with _timed(timings, "outputs"):
        if cfg.output.save_meshes:
            outputs["meshes"] = str(_save_meshes(out_dir / "meshes", model, result, track))
        if cfg.output.video:
            outputs["overlay_video"] = str(write_overlay_video(
                out_dir / "overlay.mp4", read_frames(video, selection), model, landmarks, camera, result, obs,
                info.fps, show_progress, textured))
        if cfg.output.report:
            outputs["report"] = str(write_report(out_dir / "report.png", flame_arrays(table, camera, info.fps),
                                                 title=video.name))

    summary = _summarise(video, out_dir, track, result, timings, camera, outputs)
    summary.focal = {**focal, "px": float(camera.focal)}
    summary.stages = stages
    summary.flame_model = bundle.model_record
    write_json(out_dir / "summary.json", summary.__dict__)
    return summary


def detect_landmarks(video: Path, cfg: TrackerConfig, selection: FrameSelection, n_frames: int, out_dir: Path,
                     show_progress: bool) -> tuple[LandmarkTrack, dict]:
    """Landmarks of the selected frames (cached per video) and the detector's settings."""
    detector = make_detector(cfg.detect.landmarks, **_detector_options(cfg))
    try:
        with tqdm(total=_expected_frames(n_frames, selection), desc="landmarks", unit="frame",
                  disable=not show_progress) as bar:
            track = detect_video(video, detector, selection, use_cache=cfg.detect.cache,
                                 on_frame=lambda *_: bar.update(1))
        return track, detector.settings()
    finally:
        if hasattr(detector, "close"):  # MediaPipe's native graph must be closed before exit
            detector.close()


def fit_landmarks(problem: Problem, obs: Observations, track: LandmarkTrack, cfg: TrackerConfig,
                  writer: OutputWriter, timings: dict, show_progress: bool) -> tuple[TrackResult, dict]:
    """Identity and focal on keyframes, frame-by-frame tracking, optional global refinement. Returns the track
    and how the focal length was found (Identity.focal_report)."""
    fitter = SequenceTracker(problem, cfg)
    device = obs.landmarks.device
    with _timed(timings, "identity"):
        shape = torch.zeros(1, problem.model.n_shape, device=device)
        focal = {"px": float(problem.camera.focal), "source": "given" if cfg.camera.focal else "prior",
                 "log_std": None}
        if track.valid.any():
            identity = fitter.estimate_identity(obs, track.valid)
            shape, problem.camera.focal = identity.shape, identity.focal
            focal = identity.focal_report(problem.camera)
    with _timed(timings, "fitting"):
        with tqdm(total=len(track), desc="fitting", unit="frame", disable=not show_progress) as bar:
            result = fitter.track(obs, track.valid, shape, on_frame=writer.add, progress=lambda: bar.update(1))
        if cfg.fit.global_iters > 0:
            with tqdm(total=int(track.valid.sum()), desc="global refinement", unit="frame",
                      disable=not show_progress) as bar:
                result = refine_globally(problem, result, obs, cfg.fit.global_iters, cfg.fit.global_window,
                                         cfg.fit.lr, progress=bar.update)
    return result, focal


def densemarks_stage(problem: Problem, result: TrackResult, obs: Observations, track: LandmarkTrack, frames,
                     bundle: FlameBundle, cfg: TrackerConfig, out_dir: Path,
                     show_progress: bool) -> tuple[TrackResult, dict]:
    """DenseMarks refinement when configured and its weights (or the evaluation oracle) are available."""
    if cfg.densemarks.mode == "off":
        return result, {"ran": False, "reason": "densemarks.mode is off"}
    bars: dict[str, tqdm] = {}  # one per step ("predict", "refine"), opened when the step starts

    def progress(step: str) -> None:
        if step not in bars:
            for bar in bars.values():  # the previous step is over
                bar.close()
            bars[step] = tqdm(total=len(track), desc=f"densemarks {step}", unit="frame", disable=not show_progress)
        bars[step].update(1)

    try:
        return run_densemarks_stage(problem, result, obs, track.frame_indices, frames, bundle, cfg, out_dir,
                                    progress=progress)
    finally:
        for bar in bars.values():
            bar.close()


def photometric_stage(problem: Problem, result: TrackResult, obs: Observations, frames, frame_size: tuple[int, int],
                      bundle: FlameBundle, cfg: TrackerConfig, out_dir: Path,
                      show_progress: bool) -> tuple[TrackResult, dict, Appearance | None]:
    """Photometric refinement on a face crop; writes the texture and lighting next to the parameters.
    Returns the refined track, the written files and the appearance (None when no frame had a fit)."""
    if not result.valid.any():
        return result, {}, None
    crop = stage_crop(obs, result.valid, frame_size, cfg.photometric.resolution, cfg.photometric.crop_margin)
    images = np.stack([crop.image(frame.rgb) for frame in frames()])
    with tqdm(total=len(result.valid), desc="photometric", unit="frame", disable=not show_progress) as bar:
        result, appearance = run_photometric_stage(problem, result, obs, images, crop, bundle, cfg,
                                                   progress=lambda: bar.update(1))
    return result, {name: str(path) for name, path in write_appearance(out_dir, appearance).items()}, appearance


@torch.no_grad()
def frame_energy(problem: Problem, result: TrackResult, obs: Observations) -> np.ndarray:
    """(T,) landmark + prior energy of each frame's parameters (NaN where invalid): one yardstick measured after
    every stage (each stage's own objective has other terms and scales), for the report's stage curves."""
    energy = problem.energy(result.params, obs).cpu().numpy().astype(np.float32)
    return np.where(result.valid, energy, np.nan)


@contextmanager
def _timed(timings: dict, name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        timings[name] = timings.get(name, 0.0) + elapsed
        log.info("%s: %.2f s", name, elapsed)


def _detector_options(cfg: TrackerConfig) -> dict:
    if cfg.detect.landmarks == "mediapipe" and cfg.detect.mediapipe_model:
        return {"model_path": cfg.detect.mediapipe_model}
    return {}


def _expected_frames(n_frames: int, selection: FrameSelection) -> int | None:
    if n_frames <= 0:
        return None
    n = max(0, (n_frames - selection.start + selection.stride - 1) // selection.stride)
    return min(n, selection.max_frames) if selection.max_frames else n


@torch.no_grad()
def _save_meshes(folder: Path, model, result: TrackResult, track: LandmarkTrack) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    faces = model.faces.cpu().numpy()
    for t in range(len(track)):
        if result.valid[t]:
            verts = model(result.params.frames(slice(t, t + 1))).vertices[0].cpu().numpy()
            write_obj(folder / f"{int(track.frame_indices[t]):06d}.obj", verts, faces)
    return folder


def _summarise(video: Path, out_dir: Path, track: LandmarkTrack, result: TrackResult, timings: dict,
               camera: Camera, outputs: dict) -> RunSummary:
    T = len(track)
    errors = result.lmk_error_px[result.valid]
    total = sum(timings.values())
    return RunSummary(
        video=str(video), out_dir=str(out_dir), frames=T, valid_frames=int(result.valid.sum()),
        invalid_frame_indices=[int(i) for i in track.frame_indices[~result.valid]],
        reinitialised_frames=int(result.reinitialised.sum()),
        seconds={k: round(v, 3) for k, v in timings.items()},
        seconds_per_frame={**{k: round(v / T, 4) for k, v in timings.items()}, "total": round(total / T, 4)},
        lmk_error_px_mean=float(errors.mean()) if len(errors) else float("nan"),
        lmk_error_px_p95=float(np.percentile(errors, 95)) if len(errors) else float("nan"),
        focal_px=float(camera.focal), outputs=outputs,
    )
