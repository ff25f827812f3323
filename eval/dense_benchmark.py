"""DenseMarks benchmark: does the dense stage recover sequences made with the model it fits?

    python -m eval.dense_benchmark [--frames 120] [--size 512] [--out eval/results/dense_benchmark]

Two sequences, rendered by eval.synthetic (textured stand-in head, SH light, background, motion blur, sensor
noise) with the FLAME model the tracker fits:
- fast: the head jumps between random poses every 5 frames (yaw +-37, pitch +-15 degrees), talking, blinking;
- sweep: yaw -85..85, pitch +-20, talking, blinking.
MediaPipe runs on the frames and the landmark stage runs with defaults (focal length estimated). The DenseMarks
stage then runs with defaults, fed by the evaluation-only oracle:
- exact, exact map: exact uvw maps and the exact canonical map (the template's own cube coordinates);
- exact: exact maps; canonical map by default, i.e. the oracle's per-network map, built first by
  `build_network_map` from separate training sequences (other people) as one would calibrate the real network on
  data with 3D ground truth;
- exact, video map: exact maps; canonical map estimated from the video's own fits (no per-network map);
- calibrated: maps degraded so that the oracle's point matching scores like the real network (see
  eval.densemarks_calibration, tracker.densemarks.oracle.CALIBRATED_NOISE); its own per-network map.
Baselines on the same frames: the mean face with the true pose and expression, the true shape with zero
expression. Reported per variant: face-region vertex error after a per-frame rigid alignment (median over frames
and per |yaw| bin; the rigid alignment keeps size errors), 2D reprojection error of the visible face vertices
(median; frames over 10 px count as lost), focal length error, camera-space error (median, no alignment), and
seconds per frame of the landmark stage (detection included) and of the DenseMarks stage's fitting (identity,
map and refinement; the oracle's rendering stands in for the network's forward pass and is not counted), and
their ratio in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from eval.metrics import reprojection_error_px, vertex_error_mm
from eval.synthetic.evaluate import visible_vertices
from eval.synthetic.generate import (
    EXPOSURE,
    SHAPE_SIGMA,
    GroundTruth,
    euler_to_axis_angle,
    light_sh,
    load_assets,
    render_frames,
    save_ground_truth,
    write_video,
)
from eval.synthetic.scenario import Segment, SequenceSpec, blinks, smooth_noise, talking
from eval.tracked import head_yaw_deg
from tracker.camera import Camera, focal_from_fov
from tracker.config import TrackerConfig, load_config
from tracker.densemarks.canonical import CanonicalMapOptions, MapClip, estimate_map_from_clips, save_canonical_map
from tracker.densemarks.oracle import (
    CALIBRATED_NOISE,
    OracleDenseMarks,
    OracleGroundTruth,
    OracleNoise,
    load_oracle_ground_truth,
    template_cube_coordinates,
)
from tracker.densemarks.stage import head_boxes, head_vertex_ids, oracle_source, run_densemarks_stage
from tracker.detect.base import SCHEME_MEDIAPIPE, make_detector
from tracker.detect.sequence import detect_video
from tracker.errors import run_reporting_errors
from tracker.fit.sequence import SequenceTracker, TrackResult
from tracker.flame.assets import FlameBundle, load_flame_bundle
from tracker.flame.model import FlameModel, FlameParams
from tracker.io.video import FrameSelection, read_frames
from tracker.pipeline import landmark_problem

FPS = 25.0
DISTANCE_M = 0.8
FOV_DEG = 30.0
YAW_BINS = ((0.0, 30.0), (30.0, 60.0), (60.0, 90.0))
LOST_PX = 10.0
"""A frame whose face reprojects worse than this is lost."""
TRAIN_SEEDS = (901, 902, 903)
"""Identities of the training sequences the per-network maps are built from (none is benchmarked)."""
BENCHMARK_VERSION = 1
"""Bump when the sequences change (cached renders are keyed by it)."""


# ---------------------------------------------------------------------------------------------------------------
# Sequences
# ---------------------------------------------------------------------------------------------------------------


def motion(kind: str, frames: int, rng: np.random.Generator) -> np.ndarray:
    """(T, 6) yaw, pitch, roll (degrees) and translation (metres) of a fast, sweep or train sequence."""
    if kind == "fast":
        keys = np.concatenate([rng.uniform(-1, 1, (frames // 5 + 2, 3)) * [37, 15, 6],
                               rng.uniform(-1, 1, (frames // 5 + 2, 3)) * [0.03, 0.02, 0.05]], axis=1)
        s = np.arange(frames) / 5.0
        k = s.astype(int)
        pose = keys[k] + (keys[k + 1] - keys[k]) * (s - k)[:, None]  # straight moves: sudden starts and stops
    else:
        limit, pitch = (85.0, 20.0) if kind == "sweep" else (80.0, 30.0)
        phase = np.arange(frames) / frames
        pose = np.zeros((frames, 6))
        pose[:, 0] = limit * np.sin(2 * np.pi * phase)
        pose[:, 1] = pitch * np.sin(2 * np.pi * 1.5 * phase + 0.7)
        pose[:, 3:] = smooth_noise(rng, frames, 3, sigma_frames=8) * [0.01, 0.008, 0.02]
    pose[:, 5] -= DISTANCE_M
    return pose


def sequence_params(model: FlameModel, kind: str, frames: int, seed: int) -> FlameParams:
    """One random identity (FLAME's shape prior scaled by SHAPE_SIGMA) moving as `kind`, talking and blinking."""
    rng = np.random.default_rng([seed, BENCHMARK_VERSION])
    pose = motion(kind, frames, rng)
    jaw, expr = talking(frames, model.expression_names, model.n_expr, FPS, rng)
    gaze = np.clip(5 * smooth_noise(rng, frames, 2, sigma_frames=4), -15, 15)
    gaze = euler_to_axis_angle(np.stack([gaze[:, 0], gaze[:, 1], np.zeros(frames)], axis=1))

    def to(values) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values), dtype=torch.float32)

    return FlameParams(
        shape=to(rng.normal(0.0, SHAPE_SIGMA, (1, model.n_shape))), expr=to(expr),
        rotation=to(euler_to_axis_angle(pose[:, :3])), neck_pose=torch.zeros(frames, 3),
        jaw_pose=to(np.stack([jaw, np.zeros(frames), np.zeros(frames)], 1)),
        eyes_pose=to(np.concatenate([gaze, gaze], axis=1)),
        eyelids=to(np.repeat(blinks(frames, FPS, rng)[:, None], 2, 1)), translation=to(pose[:, 3:]),
    )


def sequence_camera(size: int) -> Camera:
    return Camera.from_image(size, size, FOV_DEG, focal_from_fov(FOV_DEG, size))


@torch.no_grad()
def ground_truth(name: str, params: FlameParams, size: int, seed: int, photo: int, bundle: FlameBundle) -> GroundTruth:
    """The renderer's inputs for `params`: fixed soft light, motion blur from the face's image velocity."""
    frames = params.batch_size
    camera = sequence_camera(size)
    face = torch.as_tensor(bundle.masks["face"])
    centre = camera.project(bundle.model(params).vertices[:, face])[0].mean(1).numpy()
    velocity = np.diff(centre, axis=0, prepend=centre[:1])
    rng = np.random.default_rng([seed, 5])
    light = np.tile([0.55, 0.5, rng.uniform(-30, 30), 25.0, 1.0, 1.0, 1.0], (frames, 1))
    spec = SequenceSpec(name, (Segment("talk", frames),), photo=photo, seed=seed, image_size=size, fps=FPS,
                        fov_deg=FOV_DEG, distance_m=DISTANCE_M)
    return GroundTruth(spec, params, camera, light_sh(light).astype(np.float32), np.zeros((frames, 6), np.float32),
                       np.zeros(3), (EXPOSURE * velocity).astype(np.float32),
                       rng.uniform(0.0, 0.5, frames).astype(np.float32), np.zeros(frames, np.int64))


def render_sequence(out_dir: Path, name: str, kind: str, frames: int, size: int, seed: int, photo: int,
                    assets) -> tuple[Path, Path]:
    """Render (or reuse) a benchmark sequence: <name>.mp4 and its ground truth <name>.gt.npz."""
    video, gt_path = out_dir / f"{name}.mp4", out_dir / f"{name}.gt.npz"
    key = json.dumps({"kind": kind, "frames": frames, "size": size, "seed": seed, "photo": photo,
                      "version": BENCHMARK_VERSION}, sort_keys=True)
    stamp = out_dir / f"{name}.settings.json"
    if not (video.is_file() and gt_path.is_file() and stamp.is_file() and stamp.read_text() == key):
        gt = ground_truth(name, sequence_params(assets.bundle.model, kind, frames, seed), size, seed, photo,
                          assets.bundle)
        write_video(video, render_frames(gt, assets), FPS)
        save_ground_truth(gt_path, gt, key)
        stamp.write_text(key)
    return video, gt_path


# ---------------------------------------------------------------------------------------------------------------
# Per-network maps of the oracle
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def build_network_map(bundle: FlameBundle, noise: OracleNoise, size: int, frames: int, path: Path) -> Path:
    """The oracle's per-network map for `noise` (its cube: the template's box, distorted by the bias field),
    estimated from training sequences of other people (TRAIN_SEEDS) with their exact geometry, as one would
    calibrate the real network on data with 3D ground truth. Written to `path` (reused when present)."""
    if path.is_file():
        return path
    camera = sequence_camera(size)
    clips = []
    for seed in TRAIN_SEEDS:
        params = sequence_params(bundle.model, "train", frames, seed)
        truth = OracleGroundTruth(params, camera, np.arange(frames), {"synthetic": True, "train_seed": seed})
        oracle = OracleDenseMarks(bundle.model, truth, noise)
        boxes = head_boxes(bundle.model, camera, params, np.ones(frames, bool), head_vertex_ids(bundle), 1.5)
        clips.append(MapClip(camera, params, [oracle.predict(t, boxes[t]) for t in range(frames)]))
    cmap = estimate_map_from_clips(bundle.model, clips, CanonicalMapOptions(),
                                   {"predictor": f"oracle {asdict(noise)}", "train_seeds": list(TRAIN_SEEDS)})
    save_canonical_map(path, cmap)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Tracking and scoring
# ---------------------------------------------------------------------------------------------------------------


def track_landmarks(video: Path, cfg: TrackerConfig, bundle: FlameBundle, size: int):
    """The landmark stage with defaults (as tracker.pipeline runs it): result, observations, track, seconds."""
    start = time.perf_counter()
    detector = make_detector("mediapipe", **({"model_path": cfg.detect.mediapipe_model}
                                             if cfg.detect.mediapipe_model else {}))
    try:
        track = detect_video(video, detector, FrameSelection(), use_cache=False)
    finally:
        detector.close()
    camera = Camera.from_image(size, size, cfg.camera.fov_prior_deg)
    obs, problem = landmark_problem(track, bundle.model, bundle.landmarks, camera, cfg, SCHEME_MEDIAPIPE)
    tracker = SequenceTracker(problem, cfg)
    identity = tracker.estimate_identity(obs, track.valid)
    shape, problem.camera.focal = identity.shape, identity.focal
    result = tracker.track(obs, track.valid, shape)
    return result, obs, track, time.perf_counter() - start


@torch.no_grad()
def score(bundle: FlameBundle, params: FlameParams, focal: float, truth, valid: np.ndarray | None = None) -> dict:
    """Face-region errors of a track (or baseline parameters) against the truth (see the module docstring)."""
    model, face = bundle.model, torch.as_tensor(bundle.masks["face"])
    true_vertices = model(truth.params).vertices
    pred, gt = model(params).vertices[:, face], true_vertices[:, face]
    rigid = vertex_error_mm(pred, gt, alignment="rigid")
    camera = Camera(torch.tensor(focal), truth.camera.center, truth.camera.height, truth.camera.width)
    seen = visible_vertices(true_vertices, model.faces, truth.camera)[:, bundle.masks["face"]]
    reprojection = reprojection_error_px(camera.project(pred)[0], truth.camera.project(gt)[0], seen)
    yaw = np.abs(head_yaw_deg(truth.params))
    bins = {f"{lo:.0f}-{hi:.0f}": float(np.median(rigid[(yaw >= lo) & (yaw < hi)])) if ((yaw >= lo) & (yaw < hi)).any()
            else None for lo, hi in YAW_BINS}
    return {"rigid_mm": float(np.median(rigid)), "rigid_bins_mm": bins, "rigid_max_mm": float(rigid.max()),
            "reprojection_px": float(np.median(reprojection)), "lost": int((reprojection > LOST_PX).sum()),
            "focal_error_pct": 100 * (focal / float(truth.camera.focal) - 1),
            "camera_space_mm": float(np.median(vertex_error_mm(pred, gt))),
            "valid": None if valid is None else int(valid.sum())}


def baselines(bundle: FlameBundle, truth) -> dict[str, dict]:
    """The mean face with the true pose and expression; the true shape with zero expression (true pose)."""
    mean_face = truth.params.detach()
    mean_face.shape = torch.zeros_like(mean_face.shape)
    neutral = truth.params.detach()
    for name in ("expr", "jaw_pose", "eyelids"):
        setattr(neutral, name, torch.zeros_like(getattr(neutral, name)))
    focal = float(truth.camera.focal)
    return {"mean face, true pose+expression": score(bundle, mean_face, focal, truth),
            "true shape, zero expression": score(bundle, neutral, focal, truth)}


def dense_variant(name: str, noise: OracleNoise, dense_overrides: dict, video: Path, gt_path: Path,
                  landmark_result: TrackResult, obs, track, cfg: TrackerConfig, bundle: FlameBundle, size: int,
                  out_dir: Path) -> tuple[TrackResult, dict]:
    """The DenseMarks stage (defaults + dense_overrides) on the landmark track, oracle with `noise`."""
    cfg = replace(cfg, densemarks=replace(cfg.densemarks, **dense_overrides))
    camera = Camera.from_image(size, size, focal=landmark_result.focal)
    _, problem = landmark_problem(track, bundle.model, bundle.landmarks, camera, cfg, SCHEME_MEDIAPIPE)
    oracle = OracleDenseMarks(bundle.model, load_oracle_ground_truth(gt_path), noise)
    start = time.perf_counter()
    refined, info = run_densemarks_stage(problem, landmark_result, obs, track.frame_indices,
                                         lambda: read_frames(video), bundle, cfg, out_dir / name,
                                         source=oracle_source(oracle))
    info["wall_seconds"] = time.perf_counter() - start
    return refined, info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--size", type=int, default=512, help="video side, pixels")
    parser.add_argument("--train-frames", type=int, default=40, help="frames per training sequence (maps)")
    parser.add_argument("--sequences", default="fast,sweep", help="comma-separated: fast, sweep")
    parser.add_argument("--out", default="eval/results/dense_benchmark")
    args = parser.parse_args()
    if args.frames < 10 or args.size < 128 or args.train_frames < 5:
        parser.error("--frames must be >= 10, --size >= 128 and --train-frames >= 5")
    kinds = [k for k in args.sequences.split(",") if k]
    if not kinds or set(kinds) - {"fast", "sweep"}:
        parser.error("--sequences takes fast and/or sweep")
    return run_reporting_errors(lambda: benchmark(args, kinds))


def benchmark(args: argparse.Namespace, kinds: list[str]) -> None:
    torch.manual_seed(0)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    assets = load_assets(out_dir / "cache")
    cfg = load_config()
    bundle = load_flame_bundle(cfg.flame.path, cfg.flame.assets_dir, cfg.flame.n_shape, cfg.flame.n_expr,
                               SCHEME_MEDIAPIPE, cfg.flame.eyelids)
    maps_dir = out_dir / "maps"
    exact_map = out_dir / "exact_map.npy"
    np.save(exact_map, template_cube_coordinates(bundle.model.v_template).numpy())
    for noise in (OracleNoise(), CALIBRATED_NOISE):  # the per-network maps (the stage's default lookup)
        oracle_key = OracleDenseMarks(bundle.model, _dummy_truth(bundle.model, args.size), noise).map_key
        build_network_map(bundle, noise, args.size, args.train_frames, maps_dir / f"{oracle_key}.npz")
    variants = {
        "exact, exact map": (OracleNoise(), {"canonical_map": str(exact_map)}),
        "exact": (OracleNoise(), {"maps_dir": str(maps_dir)}),
        "exact, video map": (OracleNoise(), {"maps_dir": ""}),
        "calibrated": (CALIBRATED_NOISE, {"maps_dir": str(maps_dir)}),
    }
    report: dict = {"frames": args.frames, "size": args.size, "calibrated_noise": asdict(CALIBRATED_NOISE),
                    "sequences": {}}
    for kind, seed, photo in (("fast", 31, 3), ("sweep", 32, 2)):
        if kind not in kinds:
            continue
        video, gt_path = render_sequence(out_dir, kind, kind, args.frames, args.size, seed, photo, assets)
        truth = load_oracle_ground_truth(gt_path)
        landmark_result, obs, track, landmark_seconds = track_landmarks(video, cfg, bundle, args.size)
        rows = baselines(bundle, truth)
        rows["landmarks"] = score(bundle, landmark_result.params, landmark_result.focal, truth, landmark_result.valid)
        rows["landmarks"]["seconds_per_frame"] = landmark_seconds / args.frames
        for name, (noise, overrides) in variants.items():
            refined, info = dense_variant(name, noise, overrides, video, gt_path, landmark_result, obs, track, cfg,
                                          bundle, args.size, out_dir / f"{kind}_runs")
            stage = info.get("seconds", {})
            fit_seconds = stage.get("identity_and_map", 0.0) + stage.get("refine", 0.0)
            rows[f"dense {name}"] = {**score(bundle, refined.params, refined.focal, truth, refined.valid),
                                     "seconds_per_frame": fit_seconds / args.frames,
                                     "speed_ratio": fit_seconds / landmark_seconds,
                                     "map_source": info.get("map_source"), "guard": info.get("guard"),
                                     "stage_seconds": info.get("seconds")}
            print(f"{kind}: {name}: {json.dumps(rows[f'dense {name}'], default=str)}", flush=True)
        report["sequences"][kind] = {"landmarks_found": int(track.valid.sum()), "rows": rows}
        (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print_table(report)


def _dummy_truth(model: FlameModel, size: int):
    """A one-frame ground truth: enough to ask an oracle for its map key."""
    return OracleGroundTruth(FlameParams.zeros(1, model.n_shape, model.n_expr), sequence_camera(size),
                             np.zeros(1, np.int64), {"synthetic": True})


def print_table(report: dict) -> None:
    header = ["sequence", "variant", "rigid mm (median)", "by |yaw| 0-30 / 30-60 / 60-90", "max", "reproj px",
              "lost", "focal %", "camera-space mm", "s/frame", "x landmark stage"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for kind, entry in report["sequences"].items():
        for name, row in entry["rows"].items():
            bins = " / ".join("-" if v is None else f"{v:.2f}" for v in row["rigid_bins_mm"].values())
            spf, ratio = row.get("seconds_per_frame"), row.get("speed_ratio")
            print(f"| {kind} | {name} | {row['rigid_mm']:.2f} | {bins} | {row['rigid_max_mm']:.2f} | "
                  f"{row['reprojection_px']:.2f} | {row['lost']} | {row['focal_error_pct']:+.1f} | "
                  f"{row['camera_space_mm']:.1f} | {'' if spf is None else f'{spf:.2f}'} | "
                  f"{'' if ratio is None else f'{ratio:.1f}'} |")


if __name__ == "__main__":
    sys.exit(main())
