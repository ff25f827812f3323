"""Typed configuration: nested dataclasses, every field documented, loadable from YAML in configs/.

Each energy term owns its config dataclass (in its module under tracker/energy/); `EnergyConfig` has one field
per term, so adding a term touches that module and one line here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
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
from tracker.errors import TrackerError, quote
from tracker.fit.guard import GuardConfig
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
    stream: int | None = None
    """Which video stream to track, counted among the file's video streams from 0; None: the main one (the
    largest picture that is not a cover image)."""


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
    hold_head_size: bool = True
    """Keep the identity's neutral head at the mean head's size (one camera cannot tell size from distance)."""
    frame_iters: int = 5
    """Levenberg-Marquardt iterations per frame when warm-started from the previous frame."""
    window: int = 8
    """Consecutive frames fitted together, side by side as independent problems (1: one at a time); what a
    batch saves is the per-call overhead of many small solves."""
    window_iters: int = 1
    """Levenberg-Marquardt iterations of a window's second pass (with the temporal term, from the first
    pass's fits)."""
    frame_rounds: int = 1
    """Solver rounds per warm-started frame (each re-matches the outline points to the silhouette first)."""
    first_frame_iters: int = 20
    """Levenberg-Marquardt iterations for a frame started from its own landmarks (first frame, re-init)."""
    lr: float = 0.01
    """Adam learning rate of the image-based stages (per-parameter multipliers in fit/solver.py)."""
    reinit_factor: float = 3.0
    """Re-initialise a frame from its own landmarks when its error exceeds this times the running median."""
    smooth_rotation: float = 1000.0
    """Pose smoothing after tracking (tracker.fit.smooth): weight of the rotation's second difference, per rad^2
    (0 with smooth_translation 0: off). It moves a frame's pose only where its landmarks leave it free."""
    smooth_translation: float = 100000.0
    """Pose smoothing: weight of the translation's second difference, per m^2."""
    smooth_robust: float = 0.1
    """Pose smoothing: Huber scale of the weighted second difference (0: quadratic); larger accelerations (a
    motion starting or stopping) are penalised linearly, so they are not rounded off as noise is."""


@dataclass
class PhotometricGuardConfig:
    max_shift: float = 0.05
    """A refined frame is rejected when its mean landmark error exceeds the landmark stage's by this fraction
    of the face size (landmark bounding-box diagonal)."""
    max_rejected: float = 0.5
    """When more than this fraction of the refined frames is rejected, the whole refinement is dropped."""


@dataclass
class BridgeConfig:
    enabled: bool = True
    """Fit frames without landmarks inside short detector gaps from points tracked by optical flow."""
    max_gap: int = 12
    """Longest run of frames without landmarks that is bridged (longer gaps stay invalid)."""
    points: int = 400
    """Mesh vertices (face, forehead, nose) tracked into the gap from each neighbouring fitted frame."""
    flow_size: int = 640
    """Longer side (pixels) of the frames the optical flow runs on."""
    max_flow_error: float = 1.0
    """A point is dropped when forward and backward flow disagree by more than this (flow pixels)."""
    max_grey_change: float = 40.0
    """A point is dropped when its grey level (0-255) moves this far from the one it started on."""
    min_points: int = 30
    """Frames keeping fewer tracked points stay unfitted."""
    min_facing: float = 0.3
    """Tracked vertices face the camera at least this much (cosine) in their anchor frame, and half of it in the
    bridged frame."""
    iters: int = 10
    """Levenberg-Marquardt iterations fitting each bridged frame's rotation and translation."""


@dataclass
class PhotometricStageConfig:
    enabled: bool = False
    """Run the photometric stage after landmark tracking."""
    renderer: str = "torch"
    """Rasteriser backend: torch | pytorch3d | nvdiffrast."""
    resolution: int = 256
    """Longer side of the images compared in the photometric stage."""
    landmark_weight: float = 0.1
    """Weight of the landmark term inside the stage, relative to the landmark stage's (landmarks disagree with
    FLAME by a few pixels even at the true parameters: at full weight they outweigh the images)."""
    prior_weight: float = 0.1
    """Weight of the prior term inside the stage, relative to the landmark stage's (its MAP priors are sized for
    a detector's noise; the images see expression and pose far better)."""
    identity_rounds: int = 2
    """Rounds re-estimating the shared identity on the keyframes, each followed by an appearance refit (0 = keep
    the landmark stage's identity)."""
    identity_iters: int = 3
    """Levenberg-Marquardt iterations per pyramid level of each identity round."""
    identity_appearance_iters: int = 60
    """Steps refitting texture and lighting after each identity round."""
    frame_iters: int = 2
    """Levenberg-Marquardt iterations per pyramid level and frame."""
    samples: int = 2000
    """Most surface points compared per frame and pyramid level (every k-th covered pixel)."""
    frame_lighting: bool = True
    """Fit each frame's own SH lighting (weakly pulled to the sequence's) before refining it: lights change."""
    texture_size: int = 256
    """Albedo texture resolution."""
    texture_keyframe_iters: int = 200
    """Steps fitting texture and lighting on keyframes."""
    uv_obj: str | None = None
    """head_template.obj with FLAME UVs; None: the FLAME assets folder."""
    albedo: str = "texture"
    """Albedo model: texture (in FLAME's UV layout, needs uv_obj) | vertex (per-vertex colours)."""
    keyframes: int = 6
    """Frames (spread over the sequence) on which albedo, lighting and identity are estimated."""
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
    albedo_model: str | None = None
    """Statistical albedo model .npz (FLAME texture space FLAME_texture.npz, or FLAME_albedo_from_BFM.npz; each
    comes with a registration): the albedo is confined to it, and the images may change the head's size
    (albedo_model_size_weight); None: a free texture (smoothness and symmetry above)."""
    albedo_components: int = 50
    """Directions of the albedo model used (its first ones)."""
    albedo_prior: float = 0.0
    """Weight of the squared albedo-model coefficients (0: none; a prior held the albedo off the person's in
    development runs)."""
    albedo_model_size_weight: float = 0.0
    """Under an albedo model, how firmly the identity step holds the head's size (HeadSizeEnergy: weight of the
    squared relative size change; 1e4 without a model, which holds it). 0: free, what a model that spans the
    person's albedo needs (README: 10 and 100 gave back a third to two thirds of its gain)."""
    pyramid_levels: int = 2
    """Coarse-to-fine levels of the identity and per-frame refinements, each half the size of the next (1 = full
    size only)."""
    crop_margin: float = 0.3
    """Margin of the compared square around the sequence's landmarks, as a fraction of their extent per side."""
    guard: PhotometricGuardConfig = field(default_factory=PhotometricGuardConfig)
    """When a refined frame counts as carried away from its landmarks (it then keeps its landmark fit)."""


@dataclass
class DenseMarksStageConfig:
    mode: str = "auto"
    """auto (on when weights are found) | on | off."""
    weights: str | None = None
    """model.safetensors of DenseMarks; None: the Hugging Face cache."""
    canonical_map: str | None = None
    """Per-vertex canonical cube coordinates (.npz/.npy); None: the predictor's per-network map in maps_dir when
    one was built, else estimated from the video's well-fitted frames."""
    maps_dir: str | None = None
    """Folder of per-network maps (<predictor>.npz, written by python -m tracker.densemarks.build_map); None:
    $TRACKER_CACHE_DIR/densemarks_maps (~/.cache/tracker/densemarks_maps); '' never looks there."""
    cache_dir: str | None = None
    """Where uvw predictions are cached; None: next to the outputs."""
    backend: str = "auto"
    """How the network runs: auto (OpenVINO on the CPU when installed, else eager PyTorch) | eager | openvino."""
    precision: str = "fp32"
    """Network arithmetic: fp32 | bf16 (opt-in: faster on CPUs with bf16 units, not validated on the real weights)."""
    oracle: bool = False
    """Use the evaluation-only oracle predictor (synthetic data only; refused on real videos)."""
    oracle_ground_truth: str | None = None
    """Ground-truth npz of the synthetic sequence (metadata synthetic: true) that the oracle renders from."""
    oracle_noise: str = "exact"
    """The oracle's maps: exact | calibrated (degraded to the real network's point-matching accuracy)."""
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
    rounds: int = 6
    """Correspondence rounds per frame: visibility gates refreshed, then Levenberg-Marquardt steps."""
    lm_iters: int = 6
    """Levenberg-Marquardt iterations per round (landmark, prior, temporal and correspondence terms)."""
    iters: int = 0
    """Adam steps per frame with all terms (render-and-compare included) after the rounds (0 = skip: with exact
    correspondences they moved fits away from the truth, at ~1 s per frame)."""
    free_neck: bool = True
    """Fit the neck rotation too (DenseMarks sees the neck, landmarks do not)."""
    track_lost: bool = True
    """Also fit frames without landmarks from their predecessor, with the dense terms."""
    min_inliers: float = 0.1
    """Fraction of the sampled vertices with a kept correspondence needed to accept a frame without landmarks."""
    landmark_weight: float = 0.0
    """Landmark term's weight in this stage relative to the landmark stage's: detected landmarks carry the
    detector's and the embedding's systematic offsets (a few pixels), which would pull a fit away from exact
    dense correspondences."""
    prior_weight: float = 0.002
    """Prior term's weight in this stage relative to the landmark stage's: dense correspondences are far more
    exact than detected landmarks, and the landmark stage's MAP priors (sized for a detector's noise) would hold
    an exactly observed head off its truth (exact maps: 0.72 mm median at 1.0 with shape/expr priors of 0.02;
    tests/test_densemarks_recovery.py asserts <= 0.3 mm at this setting)."""
    temporal_weight: float = 0.1
    """Temporal term's weight in this stage relative to the landmark stage's: its reference is a motion
    prediction, which after a gap or a sudden turn is degrees off and would pull fits away from the evidence."""
    samples: int = 400
    """Most correspondences (of those kept at the current pose) in a frame's Levenberg-Marquardt solve."""
    keyframes: int = 8
    """Frames (spread over the landmark-tracked ones) on which the identity and focal length are re-estimated."""
    identity_vertices: int = 1000
    """Candidates whose correspondences re-estimate the identity and focal length on keyframes (the head's size
    is only weakly seen, so it takes many correspondences to pin it)."""
    identity_rounds: int = 2
    """Gate refreshes of the identity step, each followed by identity_iters Levenberg-Marquardt steps."""
    identity_iters: int = 8
    """Levenberg-Marquardt steps per identity round."""


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
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    """Short detector gaps bridged by optical flow."""
    photometric: PhotometricStageConfig = field(default_factory=PhotometricStageConfig)
    """The photometric stage."""
    densemarks: DenseMarksStageConfig = field(default_factory=DenseMarksStageConfig)
    """The DenseMarks stage."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    """When an image stage's refinement of a frame falls back to the landmark fit."""
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
    raise TrackerError(f"config key {key} must be {names}, got {quote(value)}")


def update_dataclass(obj: Any, values: dict, prefix: str = "") -> Any:
    """Apply a nested dict onto a dataclass instance; unknown keys and wrong types are errors."""
    if not isinstance(values, dict):
        raise TrackerError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping")
    hints = typing.get_type_hints(type(obj))
    known = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        name = f"{prefix}{key[:60] if isinstance(key, str) else quote(key, 60)}"
        if key not in known:
            raise TrackerError(f"unknown config key '{name}' (known here: {', '.join(sorted(known))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            update_dataclass(current, value, f"{name}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], name))
    return obj


NUMBER_RANGES: tuple[tuple[str, float, float, bool], ...] = (
    # (key pattern, lowest, highest, lowest allowed itself); every other number must be finite and >= 0.
    ("seed", 0, 2**32 - 1, True),
    ("camera.focal", 0, math.inf, False),
    ("camera.fov_prior_deg", 0, 170, False), ("camera.max_focal_log_std", 0, math.inf, False),
    ("video.max_frames", 1, math.inf, True), ("video.stride", 1, math.inf, True),
    ("fit.keyframes", 1, math.inf, True), ("fit.shape_iters", 1, math.inf, True),
    ("fit.frame_iters", 1, math.inf, True), ("fit.frame_rounds", 1, math.inf, True), ("fit.window", 1, math.inf, True), ("fit.window_iters", 1, math.inf, True), ("fit.first_frame_iters", 1, math.inf, True),
    ("fit.reinit_factor", 1, math.inf, False),
    ("*lr", 0, math.inf, False), ("*scale", 0, math.inf, False), ("*distance", 0, math.inf, False),
    ("photometric.resolution", 32, math.inf, True), ("photometric.texture_size", 8, math.inf, True),
    ("photometric.frame_iters", 1, math.inf, True), ("photometric.keyframes", 1, math.inf, True),
    ("photometric.identity_iters", 1, math.inf, True), ("photometric.samples", 1, math.inf, True),
    ("photometric.albedo_components", 1, math.inf, True),
    ("photometric.guard.max_shift", 0, math.inf, False), ("photometric.guard.max_rejected", 0, 1, True),
    ("bridge.flow_size", 32, math.inf, True), ("bridge.max_flow_error", 0, math.inf, False), ("bridge.max_grey_change", 0, math.inf, False),
    ("bridge.min_points", 3, math.inf, True), ("bridge.min_facing", -1, 1, True), ("bridge.points", 3, math.inf, True), ("bridge.iters", 1, math.inf, True),
    ("photometric.pyramid_levels", 1, 8, True),
    ("densemarks.crop_scale", 1, math.inf, True), ("densemarks.map_frames", 1, math.inf, True),
    ("densemarks.min_inliers", 0, 1, True), ("densemarks.samples", 1, math.inf, True),
    ("densemarks.identity_vertices", 1, math.inf, True), ("densemarks.keyframes", 1, math.inf, True),
    ("densemarks.identity_rounds", 1, math.inf, True), ("densemarks.identity_iters", 1, math.inf, True),
    ("densemarks.rounds", 1, math.inf, True),
    ("guard.max_landmark_shift", 0, math.inf, False), ("guard.max_failed_fraction", 0, 1, True),
    ("energy.*.resolution", 8, math.inf, True), ("energy.*.search_resolution", 8, math.inf, True),
    ("energy.*.vertices", 1, math.inf, True), ("energy.*.min_facing", -1, 1, True),
    ("energy.*.outlier_k", 0, math.inf, False),
)
"""Ranges of the config's numbers by dotted key (first match wins; fnmatch patterns)."""
CHOICES = {"detect.landmarks": ("mediapipe", "dlib", "fan"), "photometric.renderer": ("torch", "pytorch3d", "nvdiffrast"),
           "photometric.albedo": ("texture", "vertex"), "densemarks.mode": ("auto", "on", "off"),
           "densemarks.backend": ("auto", "eager", "openvino"), "densemarks.precision": ("fp32", "bf16"),
           "densemarks.oracle_noise": ("exact", "calibrated")}
"""Keys whose value is one of a few names."""


def _numbers(obj: Any, prefix: str = "") -> typing.Iterator[tuple[str, float]]:
    """(dotted key, value) of every number in a config tree."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, f"{prefix}{f.name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{f.name}", value


def validate(cfg: TrackerConfig) -> None:
    """Range checks that YAML types cannot express: every number finite and in its range (NUMBER_RANGES, else
    >= 0), names from their lists; the message names the key."""
    for key, value in _numbers(cfg):
        low, high, inclusive = next(((lo, hi, inc) for pattern, lo, hi, inc in NUMBER_RANGES
                                     if fnmatch.fnmatchcase(key, pattern)), (0, math.inf, True))
        if not math.isfinite(value):
            raise TrackerError(f"bad config: {key} must be a finite number, got {value}")
        if value < low or (value == low and not inclusive) or value > high:
            bounds = f"{'>=' if inclusive else '>'} {low:g}" + (f" and <= {high:g}" if math.isfinite(high) else "")
            raise TrackerError(f"bad config: {key} must be {bounds}, got {quote(value, 40)}")
    for key, names in CHOICES.items():
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) not in names:
            raise TrackerError(f"bad config: {key} must be {'|'.join(names)}, got "
                               f"{quote(getattr(getattr(cfg, section), name), 60)}")


MAX_YAML_BYTES = 1 << 20
"""Largest YAML file read (a config is a few kB)."""
MAX_YAML_NODES = 100_000
"""Most values a YAML document may hold once its aliases are expanded (an alias bomb of a few hundred bytes
would otherwise expand to gigabytes in any later copy or message)."""


def _expanded_nodes(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int:
    """Values in `node` with every alias expanded, counted without expanding (shared nodes counted once each
    time they are used)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:  # a recursive structure expands without end
        return MAX_YAML_NODES + 1
    active.add(key)
    count = 1
    children = node.value if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)) else ()
    for child in children:
        for item in (child if isinstance(child, tuple) else (child,)):
            count += _expanded_nodes(item, memo, active)
            if count > MAX_YAML_NODES:
                break
    active.discard(key)
    memo[key] = count
    return count


def parse_yaml(text: str, where: str) -> Any:
    """YAML text (safe types only) with bounded work: refused (TrackerError naming `where`) when it is not
    YAML, nests too deeply, or expands beyond MAX_YAML_NODES values."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            if _expanded_nodes(node, {}, set()) > MAX_YAML_NODES:
                raise TrackerError(f"{where} expands to more than {MAX_YAML_NODES} values (aliases): refused")
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise TrackerError(f"{where} is not valid YAML ({quote(str(exc).splitlines()[0], 160)})") from None
    except RecursionError:
        raise TrackerError(f"{where} nests too deeply") from None


def read_yaml(path: str | Path, what: str = "config file") -> tuple[Path, Any]:
    """(resolved path, contents) of a YAML file given as a path or a name in configs/; TrackerError (naming it
    `what`) when it is missing, too large or not YAML (see `parse_yaml`)."""
    path = Path(path)
    if not path.is_file() and (CONFIG_DIR / path).is_file():
        path = CONFIG_DIR / path
    if not path.is_file():
        raise TrackerError(f"{what} {path} not found")
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise TrackerError(f"{what} {path} is larger than {MAX_YAML_BYTES >> 20} MiB: not a config")
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrackerError(f"{what} {path} is unreadable ({type(exc).__name__})") from None
    return path, parse_yaml(text, f"{what} {path}") or {}


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
