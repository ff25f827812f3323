"""One tracking run: video -> landmarks -> FLAME fit -> outputs. The CLI (tracker/run.py) is a thin shell
around `track_video`."""

from __future__ import annotations

import logging
import platform
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import tracker
from tracker.camera import Camera, check_focal
from tracker.config import TrackerConfig, config_to_dict
from tracker.densemarks.stage import run_densemarks_stage
from tracker.detect.base import SCHEME_IBUG68, SCHEME_MEDIAPIPE, LandmarkTrack, make_detector
from tracker.detect.sequence import detect_video
from tracker.detect.stream import KnownTrack, LandmarkStream
from tracker.energy.base import Observations
from tracker.energy.contour import POINTS_KEY as CONTOUR_POINTS
from tracker.energy.contour import WEIGHTS_KEY as CONTOUR_WEIGHTS
from tracker.energy.contour import ContourEnergy
from tracker.energy.landmarks import LandmarkEnergy, landmark_group_weights
from tracker.energy.photometric import Appearance, region_mesh
from tracker.energy.priors import PriorEnergy
from tracker.energy.temporal import TemporalEnergy
from tracker.errors import TrackerError, quote, stop_if_signalled
from tracker.fit.bridge import bridge_gaps
from tracker.fit.photometric import run_photometric_stage, stage_crop
from tracker.fit.sequence import SequenceTracker, TrackResult, evenly_spaced
from tracker.fit.smooth import smooth_track
from tracker.fit.solver import Problem
from tracker.flame.assets import DEFAULT_MODEL_NOTE, FlameBundle, load_flame_bundle
from tracker.flame.landmarks import LandmarkSet
from tracker.flame.model import FlameModel
from tracker.io.appearance import write_appearance
from tracker.io.export import FrameTable, write_obj
from tracker.io.files import RunFolder, printable, write_json
from tracker.io.overlay_video import write_overlay_video
from tracker.io.params_writer import OnDisk, OutputWriter
from tracker.io.report import write_report
from tracker.io.video import DecodeReport, FrameSelection, probe_video, read_frames
from tracker.render.albedo_model import albedo_model_path

SCHEME_OF_DETECTOR = {"mediapipe": SCHEME_MEDIAPIPE, "dlib": SCHEME_IBUG68, "fan": SCHEME_IBUG68}
log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise TrackerError(f"--device {quote(name, 40)} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrackerError(f"--device {name} asked for, but CUDA is not available in this torch build/machine")
    return device


def landmark_problem(track: LandmarkTrack, model: FlameModel, landmarks: LandmarkSet, camera: Camera,
                     cfg: TrackerConfig, scheme: str) -> tuple[Observations, Problem]:
    """The landmark stage's observations (on the camera's device) and Problem (landmark, face-outline, prior
    and temporal terms): what every later stage refines."""
    obs = observations_from_track(track, landmarks, landmark_weights(landmarks, scheme, cfg), camera.focal.device,
                                  uses_outline(landmarks, cfg))
    return obs, landmark_terms_problem(model, landmarks, camera, cfg)


def uses_outline(landmarks: LandmarkSet, cfg: TrackerConfig) -> bool:
    """Whether the scheme's face-outline points slide along the silhouette (ContourEnergy) instead of sitting on
    fixed vertices."""
    return landmarks.outline is not None and cfg.energy.contour.weight > 0


def landmark_weights(landmarks: LandmarkSet, scheme: str, cfg: TrackerConfig) -> torch.Tensor:
    """(L,) per-landmark weights of the landmark term: group weights, inverse-variance where the embedding is
    calibrated, zero for the outline points that the face-outline term fits instead."""
    weights = landmark_group_weights(scheme, landmarks.detector_index.cpu(), cfg.energy.landmarks,
                                     None if landmarks.sigma is None else landmarks.sigma.cpu())
    if uses_outline(landmarks, cfg):
        on_outline = torch.isin(landmarks.detector_index.cpu(), landmarks.outline_index.cpu())
        weights = torch.where(on_outline, torch.zeros_like(weights), weights)
    return weights


def landmark_terms_problem(model: FlameModel, landmarks: LandmarkSet, camera: Camera, cfg: TrackerConfig) -> Problem:
    """The landmark stage's Problem: landmark, face-outline, prior and temporal terms; per-frame Jacobians from
    the terms' own derivatives (a third of the time central differences of one batched evaluation take)."""
    terms = [LandmarkEnergy(cfg.energy.landmarks), PriorEnergy(cfg.energy.priors, model),
             TemporalEnergy(cfg.energy.temporal)]
    if uses_outline(landmarks, cfg):
        terms.insert(1, ContourEnergy(cfg.energy.contour, model, landmarks.outline))
    return Problem(model, landmarks, camera, terms, jacobian="analytic")


def observations_from_track(track: LandmarkTrack, landmarks: LandmarkSet, group_weights: torch.Tensor,
                            device: torch.device, outline: bool = False) -> Observations:
    """Detected points in embedding order; missing frames/points get weight 0. With `outline`, the scheme's
    face-outline points also go to extras for the sliding-contour term."""
    conf_all = track.confidence * track.valid[:, None]
    conf_all = np.where(np.isfinite(track.points).all(-1), conf_all, 0.0)
    points_all = np.nan_to_num(track.points)
    idx = landmarks.detector_index.cpu().numpy()  # the landmark set may live on the GPU
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
    bridged_frames: int = 0
    """Frames without landmarks fitted from optical flow across a short detector gap (`bridged` in the npz)."""
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
    """Every stage finished and every selected frame the video declares was decoded."""
    incomplete_reason: str = ""
    """Why `complete` is false (e.g. the video is truncated)."""
    input: dict = field(default_factory=dict)
    """The tracked video stream (stream index, size as displayed, rotation, frame rate, timing) and how decoding
    went (frames decoded and declared, why it stopped, frames rescaled)."""
    invalid_reasons: dict[str, int] = field(default_factory=dict)
    """How many frames are invalid for each reason ("no face found", "non-finite translation", ...)."""


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
    """Track one video with the given configuration and write all outputs; returns the summary.

    Inputs are all checked (output folder, video, focal length, FLAME and its assets) before anything is
    created; an exception that stops the run carries what is on disk (tracker.io.params_writer.OnDisk)."""
    video, on_disk = Path(video), OnDisk()
    run_folder = RunFolder(cfg.output.dir, video)  # refuses an unusable --out before any work
    with on_disk.attached_to_errors(), run_folder.removed_if_refused(lambda: on_disk.frames):
        return _track_video(video, cfg, show_progress, run_folder, on_disk)


def _track_video(video: Path, cfg: TrackerConfig, show_progress: bool, run_folder: RunFolder,
                 on_disk: OnDisk) -> RunSummary:
    started = time.perf_counter()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    selection = FrameSelection(cfg.video.start, cfg.video.max_frames, cfg.video.stride, cfg.video.stream)
    info = probe_video(video, selection.stream)
    check_focal(cfg.camera.focal, info.width, info.height)
    if cfg.photometric.enabled and cfg.photometric.albedo_model:
        albedo_model_path(cfg.photometric.albedo_model)
    timings: dict[str, float] = {}

    scheme = SCHEME_OF_DETECTOR[cfg.detect.landmarks]
    bundle = load_flame_bundle(cfg.flame.path, cfg.flame.assets_dir, cfg.flame.n_shape, cfg.flame.n_expr,
                               scheme, cfg.flame.eyelids)
    if bundle.is_default:
        print(DEFAULT_MODEL_NOTE, flush=True)
    model = bundle.model.to(device)
    landmarks = bundle.landmarks.to(device)
    out_dir = run_folder.open()  # inputs accepted: now the folder is made, the previous run's outputs go

    camera = Camera.from_image(info.height, info.width, cfg.camera.fov_prior_deg, cfg.camera.focal, device)
    problem = landmark_terms_problem(model, landmarks, camera, cfg)
    detector = make_detector(cfg.detect.landmarks, **_detector_options(cfg))
    try:
        metadata = build_metadata(cfg, bundle, video, detector.settings())
        expected = _expected_frames(info.n_frames, selection)
        # The keyframe pass runs beside the per-frame pass, with a detector of its own.
        with LandmarkStream(video, detector, selection, keyframe_positions(expected, cfg.fit.keyframes),
                            use_cache=cfg.detect.cache,
                            keyframe_detector=lambda: make_detector(cfg.detect.landmarks,
                                                                    **_detector_options(cfg))) as stream:
            decoding = stream.report
            metadata["input"] = {**info.describe(), **decoding.describe()}
            # The writer reads frame indices and times off the stream, which grows as frames are detected.
            writer = OutputWriter(out_dir, camera, info.fps, metadata, stream, on_disk)
            with writer.keep_partial_on_failure():
                result, focal = fit_landmarks(problem, stream, scheme, cfg, writer, timings, expected,
                                              show_progress)
            track = stream.track()
            timings["detection"] = stream.detect_seconds
    finally:
        if hasattr(detector, "close"):  # MediaPipe's native graph must be closed before exit
            detector.close()
    if len(track) == 0:
        raise TrackerError(f"{video}: no frames selected (start {cfg.video.start} is past the end?)")
    obs = landmark_problem(track, model, landmarks, camera, cfg, scheme)[0]
    metadata["input"] = {**info.describe(), **decoding.describe()}
    stage_energy = {"landmarks": frame_energy(problem, result, obs)}
    # The landmark track is safe on disk before the (slower) image stages refine it.
    writer.write(FrameTable(result.params, track.frame_indices, track.timestamps, result.valid, result.lmk_error_px,
                            stage_energy=stage_energy), complete=False)
    outputs = {"params": str(writer.path)}

    frames = lambda: read_frames(video, selection)
    with _timed(timings, "bridge"):
        result, bridged, bridge = bridge_gaps(problem, result, obs, frames, bundle.masks, cfg.bridge)
    with _timed(timings, "densemarks"):
        result, writer.metadata["densemarks"] = densemarks_stage(problem, result, obs, track, frames, bundle, cfg,
                                                                 out_dir, show_progress)
    if writer.metadata["densemarks"].get("ran"):
        stage_energy["densemarks"] = frame_energy(problem, result, obs)
    textured = None  # the photometric stage's appearance and regions, for the overlay
    photometric = {"ran": False, "reason": "photometric.enabled is off"}
    if cfg.photometric.enabled:
        with _timed(timings, "photometric"):
            result, files, appearance, report = photometric_stage(problem, result, obs, frames,
                                                                  (info.height, info.width), bundle, cfg, out_dir,
                                                                  show_progress)
        outputs.update(files)
        photometric = {"ran": appearance is not None, "reason": "" if appearance else "no frame has a landmark fit",
                       **report}
        if appearance is not None:
            textured = (appearance, region_mesh(model, bundle.masks, cfg.energy.photometric.regions))
            stage_energy["photometric"] = frame_energy(problem, result, obs)
    stages = {"bridge": bridge, "densemarks": writer.metadata["densemarks"], "photometric": photometric}
    writer.metadata["stages"] = {name: bool(status.get("ran")) for name, status in stages.items()}
    table = FrameTable(result.params, track.frame_indices, track.timestamps, result.valid, result.lmk_error_px,
                       stage_energy=stage_energy, bridged=bridged)
    written = writer.write(table, complete=False)

    with _timed(timings, "outputs"):
        if cfg.output.save_meshes:
            outputs["meshes"] = str(_save_meshes(out_dir / "meshes", model, result, track))
        if cfg.output.video:
            outputs["overlay_video"] = str(write_overlay_video(
                out_dir / "overlay.mp4", read_frames(video, selection), model, landmarks, camera, result, obs,
                info.rate / selection.stride, show_progress, textured))
        if cfg.output.report:
            outputs["report"] = str(write_report(out_dir / "report.png", written, title=printable(video.name)))

    # Every stage finished: the last write says whether the result covers the whole selection.
    stop_if_signalled()
    arrays = writer.write(table, complete=decoding.complete)
    summary = _summarise(video, out_dir, arrays, result, timings, time.perf_counter() - started, camera, outputs)
    summary.stages, summary.flame_model, summary.input = stages, bundle.model_record, writer.metadata["input"]
    summary.focal = {**focal, "px": float(camera.focal)}  # an image stage may have re-estimated it
    summary.complete, summary.incomplete_reason = decoding.complete, "" if decoding.complete else decoding.stopped
    write_json(out_dir / "summary.json", summary.__dict__)
    return summary


def detect_landmarks(video: Path, cfg: TrackerConfig, selection: FrameSelection, n_frames: int, out_dir: Path,
                     show_progress: bool, decoding: DecodeReport | None = None) -> tuple[LandmarkTrack, dict]:
    """Landmarks of the selected frames (cached per video) and the detector's settings."""
    detector = make_detector(cfg.detect.landmarks, **_detector_options(cfg))
    try:
        with tqdm(total=_expected_frames(n_frames, selection), desc="landmarks", unit="frame",
                  disable=not show_progress) as bar:
            track = detect_video(video, detector, selection, use_cache=cfg.detect.cache,
                                 on_frame=lambda *_: bar.update(1), report=decoding)
        return track, detector.settings()
    finally:
        if hasattr(detector, "close"):  # MediaPipe's native graph must be closed before exit
            detector.close()


KEYFRAME_CANDIDATES = 15
"""Keyframe candidates detected first per identity keyframe: the identity takes the keyframes that span the
head poses among them (`choose_keyframes`). 15 rather than 3: hold-out fast motion 3.70 -> 3.30 mm, the other
hold-out sequences within 0.05 mm; the candidates cost one extra detection each."""


def keyframe_positions(expected_frames: int | None, count: int) -> np.ndarray:
    """Positions in the selection of the identity keyframe candidates, spread evenly over the expected frame
    count (none when the container does not tell the count: the identity then waits for the whole track)."""
    return evenly_spaced(np.arange(expected_frames or 0), KEYFRAME_CANDIDATES * count)


def fit_known_track(problem: Problem, track: LandmarkTrack, cfg: TrackerConfig, writer: OutputWriter,
                    timings: dict, show_progress: bool) -> TrackResult:
    """The landmark stage on a track known beforehand (e.g. exact landmarks), exactly as a run fits a streamed
    one (`fit_landmarks`)."""
    keys = keyframe_positions(len(track), cfg.fit.keyframes)
    return fit_landmarks(problem, KnownTrack(track, keys), track.scheme, cfg, writer, timings, len(track),
                         show_progress)[0]


def fit_landmarks(problem: Problem, stream: LandmarkStream | KnownTrack, scheme: str, cfg: TrackerConfig,
                  writer: OutputWriter, timings: dict, expected_frames: int | None,
                  show_progress: bool) -> tuple[TrackResult, dict]:
    """Identity and focal on keyframes, then frame-by-frame tracking while the stream is still detecting (when
    fewer than half the keyframes show a face, the identity waits for the whole track and takes its keyframes
    from the valid frames, as a sequential run would), then the pose smoothing (`tracker.fit.smooth`). Returns
    the track and how the focal length was found (`Identity.focal_report`)."""
    fitter = SequenceTracker(problem, cfg)
    landmarks = problem.landmarks
    weights, outline = landmark_weights(landmarks, scheme, cfg), uses_outline(landmarks, cfg)
    device = problem.camera.focal.device
    observe = lambda track: observations_from_track(track, landmarks, weights, device, outline)
    focal = {"px": float(problem.camera.focal), "source": "given" if cfg.camera.focal else "prior", "log_std": None}

    def identity_from(obs: Observations, valid: np.ndarray) -> torch.Tensor:
        nonlocal focal
        identity = fitter.estimate_identity(obs, valid)
        problem.camera.focal, focal = identity.focal, identity.focal_report(problem.camera)
        return identity.shape

    with tqdm(total=expected_frames, desc="tracking", unit="frame", disable=not show_progress) as bar:
        with _timed(timings, "identity"):
            keys = stream.keyframes()
            if keys.valid.sum() >= max(1, min(len(keys), cfg.fit.keyframes) // 2):
                frames = ((observe(LandmarkTrack.from_detections(keys.scheme, [f.index], [f.timestamp],
                                                                 [f.landmarks])), f.landmarks is not None)
                          for f in stream)
                shape = identity_from(observe(keys), keys.valid)
            else:
                for _ in stream:  # the whole track first
                    pass
                track = stream.track()
                obs = observe(track)
                frames = ((obs.frames(slice(t, t + 1)), bool(track.valid[t])) for t in range(len(track)))
                shape = torch.zeros(1, problem.model.n_shape, device=device)
                if track.valid.any():
                    shape = identity_from(obs, track.valid)
        with _timed(timings, "fitting"):
            result = fitter.track_frames(frames, shape, on_frame=writer.add, progress=lambda: bar.update(1))
    with _timed(timings, "fitting"):
        result = smooth_track(problem, result, observe(stream.track()), cfg.fit.smooth_rotation,
                              cfg.fit.smooth_translation, cfg.fit.smooth_robust)
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
                      show_progress: bool) -> tuple[TrackResult, dict, Appearance | None, dict]:
    """Photometric refinement on a face crop; writes the texture and lighting next to the parameters.
    Returns the refined track, the written files, the appearance (None when no frame had a fit) and the stage's
    report (identity change, guard)."""
    if not result.valid.any():
        return result, {}, None, {}
    crop = stage_crop(obs, result.valid, frame_size, cfg.photometric.resolution, cfg.photometric.crop_margin)
    # The crops go to a file the OS pages in and out (a temporary one, gone when closed), not into memory: 0.2 MB
    # a frame at the default resolution would make memory grow with the length of the video.
    with tempfile.TemporaryFile(dir=out_dir) as storage:
        images = np.memmap(storage, np.uint8, "w+", shape=(len(result.valid), crop.size, crop.size, 3))
        count = 0
        for frame in frames():
            if count == len(images):
                break
            images[count] = crop.image(frame.rgb)
            count += 1
        if count != len(images):
            raise TrackerError(f"{count} frames decoded for the photometric stage, {len(images)} tracked: the video "
                               "changed while it was read?")
        with tqdm(total=len(result.valid), desc="photometric", unit="frame", disable=not show_progress) as bar:
            result, appearance, report = run_photometric_stage(problem, result, obs, images, crop, bundle, cfg,
                                                               progress=lambda: bar.update(1))
        del images
    files = {name: str(path) for name, path in write_appearance(out_dir, appearance).items()}
    return result, files, appearance, report


ENERGY_CHUNK = 128
"""Frames evaluated at once by `frame_energy`: its memory stays flat in the number of frames (all 1000 frames of a
clip at once took 0.9 GB)."""


@torch.no_grad()
def frame_energy(problem: Problem, result: TrackResult, obs: Observations) -> np.ndarray:
    """(T,) landmark + prior energy of each frame's parameters (NaN where invalid): one yardstick measured after
    every stage (each stage's own objective has other terms and scales), for the report's stage curves."""
    T = len(result.valid)
    energy = np.empty(T, np.float32)
    for start in range(0, T, ENERGY_CHUNK):
        rows = torch.arange(start, min(start + ENERGY_CHUNK, T), device=obs.landmarks.device)
        chunk = problem.energy(result.params.frames(rows), obs.frames(rows), shared_frames=T)
        energy[start:start + len(rows)] = chunk.cpu().numpy()
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


def _summarise(video: Path, out_dir: Path, arrays: dict[str, np.ndarray], result: TrackResult, timings: dict,
               total: float, camera: Camera, outputs: dict) -> RunSummary:
    """The summary of what was written (`arrays`: flame_params.npz as written, invariants enforced); `total`: wall
    seconds of the whole run (stage seconds overlap: detection runs beside the fit)."""
    valid, T = arrays["valid"], len(arrays["valid"])
    errors = arrays["lmk_error_px"][valid & ~arrays["bridged"]]  # bridged frames have no landmarks
    reasons, counts = np.unique(arrays["invalid_reason"][~valid], return_counts=True)
    return RunSummary(
        video=str(video), out_dir=str(out_dir), frames=T, valid_frames=int(valid.sum()),
        invalid_frame_indices=[int(i) for i in arrays["frame_index"][~valid]],
        bridged_frames=int((valid & arrays["bridged"]).sum()),
        invalid_reasons={str(r): int(c) for r, c in zip(reasons, counts)},
        reinitialised_frames=int(result.reinitialised.sum()),
        seconds={k: round(v, 3) for k, v in timings.items()},
        seconds_per_frame={**{k: round(v / T, 4) for k, v in timings.items()}, "total": round(total / T, 4)},
        lmk_error_px_mean=float(errors.mean()) if len(errors) else float("nan"),
        lmk_error_px_p95=float(np.percentile(errors, 95)) if len(errors) else float("nan"),
        focal_px=float(camera.focal), outputs=outputs,
    )
