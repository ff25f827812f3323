"""Typed configuration: nested dataclasses, every field documented, loadable from YAML in configs/.

Each energy term owns its config dataclass (in its module under tracker/energy/); `EnergyConfig` has one field
per term, so adding a term touches that module and one line here.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tracker.energy.contour import ContourEnergyConfig
from tracker.energy.dense import DenseCorrespondenceConfig, DenseRenderConfig
from tracker.energy.landmarks import LandmarkEnergyConfig
from tracker.energy.photometric import PhotometricConfig
from tracker.energy.priors import PriorConfig
from tracker.energy.temporal import TemporalConfig
from tracker.errors import TrackerError
from tracker.resources import configs_dir

CONFIG_DIR = configs_dir()


@dataclass
class FlameConfig:
    path: str | None = None
    """FLAME model file (.pkl/.npz); None: $FLAME_MODEL, a FLAME file in flame_assets/, then the shipped default."""
    assets_dir: str | None = None
    """Folder with landmark embeddings, masks, eyelids; None: $TRACKER_FLAME_ASSETS, model's folder, flame_assets/."""
    n_shape: int = 100
    """Identity coefficients fitted (clipped to what the file holds)."""
    n_expr: int = 50
    """Expression coefficients fitted (clipped to what the file holds)."""
    eyelids: bool = True
    """Use eyelid blendshapes when l_eyelid.npy / r_eyelid.npy are present."""


@dataclass
class CameraConfig:
    focal: float | None = None
    """Fixed focal length in pixels; None estimates it on keyframes."""
    fov_prior_deg: float = 30.0
    """Field of view over the longer image side, degrees, assumed where the video does not constrain the focal
    length (and where its estimate starts)."""
    max_focal_log_std: float = 0.1
    """Largest uncertainty (standard deviation of log focal) at which the estimated focal length is used;
    above it the prior field of view is."""


@dataclass
class VideoConfig:
    start: int = 0
    """First frame index to track."""
    max_frames: int | None = None
    """Track at most this many frames (after stride)."""
    stride: int = 1
    """Track every n-th frame."""


@dataclass
class DetectConfig:
    landmarks: str = "mediapipe"
    """Landmark detector: mediapipe | dlib | fan."""
    mediapipe_model: str | None = None
    """MediaPipe face_landmarker .task file; None: $TRACKER_MEDIAPIPE_MODEL, then the one in flame_assets/."""
    cache: bool = True
    """Cache detections per video so a re-run skips detection."""


@dataclass
class EnergyConfig:
    landmarks: LandmarkEnergyConfig = field(default_factory=LandmarkEnergyConfig)
    """2D landmark reprojection term."""
    contour: ContourEnergyConfig = field(default_factory=ContourEnergyConfig)
    """Face-outline points matched to the mesh's silhouette (sliding contour)."""
    priors: PriorConfig = field(default_factory=PriorConfig)
    """Priors on shape, expression, pose."""
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    """Temporal smoothness of pose and expression."""
    photometric: PhotometricConfig = field(default_factory=PhotometricConfig)
    """Render-and-compare colour term."""
    dense_render: DenseRenderConfig = field(default_factory=DenseRenderConfig)
    """DenseMarks render-and-compare in canonical-cube space."""
    dense_corr: DenseCorrespondenceConfig = field(default_factory=DenseCorrespondenceConfig)
    """DenseMarks nearest-canonical-coordinate 2D-3D correspondences."""


@dataclass
class FitConfig:
    keyframes: int = 8
    """Frames used to estimate shared identity and focal length."""
    shape_iters: int = 30
    """Levenberg-Marquardt iterations of the keyframe (identity, focal) stage."""
    frame_iters: int = 5
    """Levenberg-Marquardt iterations per frame when warm-started from the previous frame."""
    frame_rounds: int = 1
    """Solver rounds per warm-started frame (each re-matches the outline points to the silhouette first)."""
    first_frame_iters: int = 20
    """Levenberg-Marquardt iterations for a frame started from its own landmarks (first frame, re-init)."""
    lr: float = 0.01
    """Adam learning rate of the image-based stages (per-parameter multipliers in fit/solver.py)."""
    reinit_factor: float = 3.0
    """Re-initialise a frame from its own landmarks when its error exceeds this times the running median."""
    global_iters: int = 0
    """Steps of the optional joint refinement over all frames (0 = off)."""
    global_window: int = 64
    """Frames per chunk in the global refinement."""


@dataclass
class PhotometricStageConfig:
    enabled: bool = False
    """Run the photometric stage after landmark tracking."""
    renderer: str = "torch"
    """Rasteriser backend: torch | pytorch3d | nvdiffrast."""
    resolution: int = 256
    """Longer side of the images compared in the photometric stage."""
    iters: int = 20
    """Photometric optimiser steps per frame."""
    texture_size: int = 256
    """Albedo texture resolution."""
    texture_keyframe_iters: int = 200
    """Steps fitting texture and lighting on keyframes."""
    uv_obj: str | None = None
    """head_template.obj with FLAME UVs; None: the FLAME assets folder."""
    albedo: str = "texture"
    """Albedo model: texture (in FLAME's UV layout, needs uv_obj) | vertex (per-vertex colours)."""
    keyframes: int = 8
    """Frames (spread over the sequence) on which albedo and lighting are estimated."""
    appearance_refine_frames: int = 16
    """Frames (spread over the sequence) on which albedo and lighting are refined after the per-frame pass,
    with the refined poses (0 = keep the keyframe estimate)."""
    appearance_refine_iters: int = 100
    """Steps of that refinement, starting from the keyframe estimate."""
    appearance_lr: float = 0.03
    """Adam learning rate of the albedo and lighting fit."""
    albedo_smoothness: float = 0.02
    """Weight of the albedo's total variation (texture) or edge differences (vertex colours)."""
    albedo_symmetry: float = 0.0
    """Weight of the texture's left-right symmetry prior (0 = off)."""
    pyramid_levels: int = 3
    """Coarse-to-fine levels of the per-frame refinement, each half the size of the next (1 = full size only)."""
    lr: float = 0.004
    """Adam learning rate of the per-frame refinement (small: frames start at their landmark fit)."""
    crop_margin: float = 0.3
    """Margin of the compared square around the sequence's landmarks, as a fraction of their extent per side."""


@dataclass
class DenseMarksStageConfig:
    mode: str = "auto"
    """auto (on when weights are found) | on | off."""
    weights: str | None = None
    """model.safetensors of DenseMarks; None: the Hugging Face cache."""
    canonical_map: str | None = None
    """Per-vertex canonical cube coordinates (.npy); None: estimate from the video's well-fitted frames."""
    cache_dir: str | None = None
    """Where uvw predictions are cached; None: next to the outputs."""
    oracle: bool = False
    """Use the evaluation-only oracle predictor (synthetic data only; refused on real videos)."""
    oracle_ground_truth: str | None = None
    """Ground-truth npz of the synthetic sequence (metadata synthetic: true) that the oracle renders from."""
    crop_scale: float = 1.5
    """Side of the square head crop over the side of the tracked head's bounding box."""
    map_frames: int = 60
    """Most frames (spread over the video, weighted by fit quality) used to estimate the canonical map."""
    map_affine_prior: float = 20.0
    """Pull of an estimated map towards an affine image of the FLAME template (support units; 0 = free map)."""
    identity: bool = True
    """Re-estimate the shared identity on keyframes with the correspondence term before refining frames."""
    map_rounds: int = 2
    """Alternations of identity (keyframes) and canonical-map re-estimation (from those keyframe fits)."""
    free_focal: bool = True
    """Re-estimate the focal length with the identity: whole-head correspondences show perspective that face
    landmarks barely do (ignored when camera.focal is given)."""
    rounds: int = 3
    """Correspondence rounds per frame: visibility gates refreshed, then Levenberg-Marquardt steps."""
    lm_iters: int = 4
    """Levenberg-Marquardt iterations per round (landmark, prior, temporal and correspondence terms)."""
    iters: int = 20
    """Adam steps per frame with all terms (render-and-compare included) after the rounds (0 = skip)."""
    free_neck: bool = True
    """Fit the neck rotation too (DenseMarks sees the neck, landmarks do not)."""
    track_lost: bool = True
    """Also fit frames without landmarks from their predecessor, with the dense terms."""
    min_inliers: float = 0.1
    """Fraction of the sampled vertices with a kept correspondence needed to accept a frame without landmarks."""


@dataclass
class OutputConfig:
    dir: str = "output"
    """Output root; results go to <dir>/<video stem>/."""
    video: bool = True
    """Write the overlay video."""
    save_meshes: bool = False
    """Write per-frame meshes (.obj)."""
    report: bool = True
    """Write report.png: per-frame landmark error, head pose, expression, energy after each stage."""


@dataclass
class TrackerConfig:
    seed: int = 0
    """Random seed (everything is deterministic given it)."""
    device: str = "cpu"
    """Torch device: cpu | cuda | cuda:N."""
    flame: FlameConfig = field(default_factory=FlameConfig)
    """The FLAME model and its side assets."""
    camera: CameraConfig = field(default_factory=CameraConfig)
    """Intrinsics: fixed or estimated focal length."""
    video: VideoConfig = field(default_factory=VideoConfig)
    """Which frames to track."""
    detect: DetectConfig = field(default_factory=DetectConfig)
    """Landmark detection."""
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    """Energy terms and their weights."""
    fit: FitConfig = field(default_factory=FitConfig)
    """Optimisation schedule of the landmark stage and the global refinement."""
    photometric: PhotometricStageConfig = field(default_factory=PhotometricStageConfig)
    """The photometric stage."""
    densemarks: DenseMarksStageConfig = field(default_factory=DenseMarksStageConfig)
    """The DenseMarks stage."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """What is written where."""


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check a YAML value against a field's type annotation (ints pass as floats)."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, type(int | None)) \
        else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        raise TrackerError(f"config key {key} must not be empty")
    for option in options:
        if typing.get_origin(option) is list and isinstance(value, list):
            (item,) = typing.get_args(option)
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option in (int, str, bool) and type(value) is option:
            return value
    names = "/".join(getattr(o, "__name__", str(o)) for o in options)
    raise TrackerError(f"config key {key} must be {names}, got {value!r}")


def update_dataclass(obj: Any, values: dict, prefix: str = "") -> Any:
    """Apply a nested dict onto a dataclass instance; unknown keys and wrong types are errors."""
    if not isinstance(values, dict):
        raise TrackerError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping")
    hints = typing.get_type_hints(type(obj))
    known = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise TrackerError(f"unknown config key {name!r} (known here: {', '.join(sorted(known))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            update_dataclass(current, value, f"{name}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], name))
    return obj


def validate(cfg: TrackerConfig) -> None:
    """Range checks that YAML types cannot express."""
    checks = [
        (cfg.flame.n_shape >= 0 and cfg.flame.n_expr >= 0, "flame.n_shape/n_expr must be >= 0"),
        (cfg.video.start >= 0, "video.start must be >= 0"),
        (cfg.video.stride >= 1, "video.stride must be >= 1"),
        (cfg.video.max_frames is None or cfg.video.max_frames >= 1, "video.max_frames must be >= 1"),
        (cfg.camera.focal is None or cfg.camera.focal > 0, "camera.focal must be > 0"),
        (0 < cfg.camera.fov_prior_deg < 170, "camera.fov_prior_deg must be in (0, 170)"),
        (cfg.camera.max_focal_log_std > 0, "camera.max_focal_log_std must be > 0"),
        (cfg.fit.keyframes >= 1, "fit.keyframes must be >= 1"),
        (cfg.fit.frame_iters >= 1 and cfg.fit.first_frame_iters >= 1, "fit iterations must be >= 1"),
        (cfg.fit.frame_rounds >= 1, "fit.frame_rounds must be >= 1"),
        (cfg.fit.lr > 0, "fit.lr must be > 0"),
        (cfg.fit.reinit_factor > 1, "fit.reinit_factor must be > 1"),
        (cfg.detect.landmarks in ("mediapipe", "dlib", "fan"), "detect.landmarks must be mediapipe|dlib|fan"),
        (cfg.photometric.renderer in ("torch", "pytorch3d", "nvdiffrast"),
         "photometric.renderer must be torch|pytorch3d|nvdiffrast"),
        (cfg.photometric.resolution >= 32, "photometric.resolution must be >= 32"),
        (cfg.photometric.appearance_refine_frames >= 0 and cfg.photometric.appearance_refine_iters >= 0,
         "photometric.appearance_refine_frames and appearance_refine_iters must be >= 0"),
        (cfg.photometric.lr > 0 and cfg.photometric.appearance_lr > 0, "photometric learning rates must be > 0"),
        (cfg.photometric.crop_margin >= 0, "photometric.crop_margin must be >= 0"),
        (cfg.densemarks.mode in ("auto", "on", "off"), "densemarks.mode must be auto|on|off"),
        (cfg.densemarks.map_rounds >= 0 and cfg.densemarks.map_affine_prior >= 0,
         "densemarks.map_rounds and map_affine_prior must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise TrackerError(f"bad config: {message}")
    for term in dataclasses.fields(cfg.energy):
        if getattr(cfg.energy, term.name).weight < 0:
            raise TrackerError(f"bad config: energy.{term.name}.weight must be >= 0")


def read_yaml(path: str | Path, what: str = "config file") -> tuple[Path, Any]:
    """(resolved path, contents) of a YAML file given as a path or a name in configs/; TrackerError (naming it
    `what`) when it is missing or not YAML."""
    path = Path(path)
    if not path.is_file() and (CONFIG_DIR / path).is_file():
        path = CONFIG_DIR / path
    if not path.is_file():
        raise TrackerError(f"{what} {path} not found")
    try:
        return path, yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TrackerError(f"{what} {path} is not valid YAML ({str(exc).splitlines()[0]})") from None


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrackerConfig:
    """Defaults, then a YAML file (a name in configs/ or a path), then overrides (nested dict)."""
    cfg = TrackerConfig()
    if path is not None:
        update_dataclass(cfg, read_yaml(path)[1])
    if overrides:
        update_dataclass(cfg, overrides)
    validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def field_docs(cls: type) -> dict[str, str]:
    """{field: its attribute docstring} of a dataclass, read from its source ({} when the source is absent)."""
    import ast
    import inspect

    try:
        body = ast.parse(inspect.getsource(cls)).body[0].body
    except (OSError, TypeError):
        return {}
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def config_yaml(cfg: Any, indent: str = "") -> str:
    """The whole config as YAML that `load_config` reads back unchanged, each field with its docstring as a
    comment (how configs/default.yaml is generated: `python -m tracker.run --print-config`)."""
    docs = field_docs(type(cfg))
    lines = []
    for f in dataclasses.fields(cfg):
        value, doc = getattr(cfg, f.name), docs.get(f.name, "")
        comment = f"  # {doc}" if doc else ""
        if dataclasses.is_dataclass(value):
            lines.append(f"{indent}{f.name}:{comment}")
            lines.append(config_yaml(value, indent + "  ").rstrip("\n"))
        else:
            text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).removesuffix("\n...\n")
            lines.append(f"{indent}{f.name}: {text.strip()}{comment}")
    return "\n".join(lines) + "\n"
