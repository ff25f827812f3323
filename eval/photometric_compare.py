"""Landmark tracking with and without the photometric stage: on real videos seconds per frame, PSNR inside the
compared face regions, mean landmark reprojection error; on the synthetic benchmark (--synthetic) the face error
against the truth, beside its baselines on the same frames.

Runs the landmark pipeline (tracker.pipeline.track_video, no overlay video), rebuilds its problem and result
from the written flame_params.npz and the cached detections, then runs the photometric stage on them. Each
track is rendered with the appearance (texture, lighting) estimated on its own keyframes and refined under its own
poses, in the stage's crop.
The head model and landmark embedding are the tracker's own (flame_assets/, or $FLAME_MODEL and
$TRACKER_FLAME_ASSETS where set), so the numbers are those of the defaults.
Writes the refined track's appearance and a few overlays (frame | textured mesh) under --out.

    python -m eval.photometric_compare ../shared/data/videos/dev/wojtek.mp4 [--max-frames 100] [--out DIR]
    python -m eval.photometric_compare --synthetic [talking turns ...] [--quick] [--exact-landmarks] [--set K=V]
                                       [--true-appearance] [--true-identity]

--synthetic tracks sequences of the synthetic suite (eval.synthetic.suite; all of it when none is named, the
--quick one with --quick) and prints per sequence the face-region vertex error after per-frame rigid alignment
(median over frames, mm; and 2D reprojection, px) of the landmark stage and of landmarks + photometric, the cut,
the stage's seconds per frame (process CPU; the identity's fixed cost shared out), and the baselines of
eval.baselines: mean face with the true pose and expression, true shape with zero expression, and
(--exact-landmarks, slower) the landmark stage fed exact projected landmarks. --true-appearance adds the stage
given the texture and lighting the sequence was rendered with: what estimating the appearance costs.
--true-identity adds the landmark track with the true identity swapped in (its poses, expressions and focal
length kept) and the stage started from there (an estimated appearance, the defaults): whether the stage keeps,
improves or spoils an identity that starts right.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch

from eval.ablation import merge, parse_override
from eval.baselines import SequenceScorer, fit_exact_landmarks
from eval.bench.machine import machine_description
from eval.metrics import psnr
from eval.synthetic.generate import (
    GroundTruth,
    SyntheticAssets,
    generate_sequence,
    load_assets,
    load_ground_truth,
    sequence_texture,
)
from eval.synthetic.suite import suite
from eval.tracked import TrackedSequence, resized_params
from tracker.camera import Camera
from tracker.config import TrackerConfig, load_config
from tracker.energy.base import Observations
from tracker.energy.photometric import Appearance, RegionMesh, region_mesh
from tracker.errors import TrackerError, run_reporting_errors
from tracker.fit.photometric import (
    StageCrop,
    estimate_appearance,
    load_corner_uvs,
    refine_appearance,
    render_frames,
    run_photometric_stage,
    stage_crop,
)
from tracker.fit.sequence import TrackResult, choose_keyframes
from tracker.fit.solver import FRAME_FIELDS, Problem, torch_threads
from tracker.flame.assets import FlameBundle, load_flame_bundle
from tracker.flame.model import FlameParams
from tracker.io.appearance import draw_appearance, write_appearance
from tracker.io.export import read_params
from tracker.io.video import FrameSelection, read_frames
from tracker.pipeline import SCHEME_OF_DETECTOR, detect_landmarks, landmark_problem, track_video


def landmark_run(video: Path, cfg: TrackerConfig) -> tuple[Problem, TrackResult, Observations, dict, FlameBundle]:
    """track_video, then its Problem, TrackResult, Observations, timings (wall seconds per step and process
    CPU seconds in all) and FLAME bundle rebuilt from its outputs."""
    cpu_start = time.process_time()
    summary = track_video(video, cfg, show_progress=False)
    cpu_seconds = time.process_time() - cpu_start
    arrays, _ = read_params(Path(summary.out_dir) / "flame_params.npz")
    device = torch.device(cfg.device)
    scheme = SCHEME_OF_DETECTOR[cfg.detect.landmarks]
    bundle = load_flame_bundle(cfg.flame.path, cfg.flame.assets_dir, cfg.flame.n_shape, cfg.flame.n_expr, scheme,
                               cfg.flame.eyelids)
    model, landmarks = bundle.model.to(device), bundle.landmarks.to(device)
    height, width = (int(v) for v in arrays["image_size"])
    camera = Camera.from_image(height, width, focal=float(arrays["K"][0, 0, 0]), device=device)
    selection = FrameSelection(cfg.video.start, cfg.video.max_frames, cfg.video.stride)
    track, _ = detect_landmarks(video, cfg, selection, len(arrays["valid"]), Path(summary.out_dir), False)
    obs, problem = landmark_problem(track, model, landmarks, camera, cfg, scheme)
    tensor = lambda name: torch.as_tensor(arrays[name], device=device)
    params = FlameParams(shape=tensor("shape").view(1, -1), **{name: tensor(name) for name in FRAME_FIELDS})
    result = TrackResult(params, float(camera.focal), arrays["valid"].astype(bool),
                         arrays["lmk_error_px"].astype(np.float32), np.zeros(len(arrays["valid"]), bool))
    timings = {k: summary.seconds[k] for k in ("detection", "identity", "fitting")}
    return problem, result, obs, {**timings, "process CPU": cpu_seconds}, bundle


def stage_inputs(video: Path, cfg: TrackerConfig, obs, result: TrackResult) -> tuple[np.ndarray, StageCrop]:
    """The stage's crop and its (T, size, size, 3) uint8 images."""
    selection = FrameSelection(cfg.video.start, cfg.video.max_frames, cfg.video.stride)
    frames = [frame.rgb for frame in read_frames(video, selection)]
    crop = stage_crop(obs, result.valid, frames[0].shape[:2], cfg.photometric.resolution, cfg.photometric.crop_margin)
    return np.stack([crop.image(rgb) for rgb in frames]), crop


def region_psnr(appearance: Appearance, mesh: RegionMesh, camera: Camera, result: TrackResult,
                images: np.ndarray) -> float:
    """Mean over valid frames of the PSNR (dB) inside the rendered region mesh; camera: the stage images'."""
    values = []
    for t in np.flatnonzero(result.valid):
        image, mask = render_frames(appearance, mesh, camera, result.params.frames(slice(t, t + 1)),
                                    images.shape[1:3], 1.0)
        if mask.any():
            values.append(psnr(image[0], images[t] / 255.0, mask[0]))
    return float(np.mean(values))


def compare(video: Path, max_frames: int, out_dir: Path, overrides: dict) -> None:
    cfg = load_config(overrides=merge(overrides, {"video": {"max_frames": max_frames},
                                                  "output": {"dir": str(out_dir), "video": False}}))
    problem, result, obs, timings, bundle = landmark_run(video, cfg)
    images, crop = stage_inputs(video, cfg, obs, result)
    T = len(result.valid)
    start, cpu_start = time.perf_counter(), time.process_time()
    refined, _, report = run_photometric_stage(problem, result, obs, images, crop, bundle, cfg)
    stage_seconds, stage_cpu = time.perf_counter() - start, time.process_time() - cpu_start

    # Each track rendered with the appearance the stage's procedure gives under its own poses (estimated on
    # its keyframes, then refined on more frames), so that neither track is scored with the other's texture.
    camera = crop.camera(problem.camera)
    mesh = region_mesh(problem.model, bundle.masks, cfg.energy.photometric.regions)

    def own_appearance(track: TrackResult) -> Appearance:
        keyframes = choose_keyframes(track.valid, cfg.photometric.keyframes)
        with torch_threads(1):
            keyframe = estimate_appearance(mesh, camera, track.params, images, bundle, cfg, keyframes)
            return refine_appearance(keyframe, mesh, camera, track, images, bundle, cfg)

    appearance, refined_appearance = own_appearance(result), own_appearance(refined)
    landmark_cpu = timings.pop("process CPU")
    landmark_seconds = sum(timings.values())
    print(f"{video.name}: {T} frames ({int(result.valid.sum())} valid), crop {crop.side} px -> {crop.size} px; "
          f"landmark stage {', '.join(f'{k} {v / T:.3f}' for k, v in timings.items())} s/frame")
    for name, track, track_appearance, seconds, cpu in (
            ("landmarks only", result, appearance, landmark_seconds, landmark_cpu),
            ("landmarks + photometric", refined, refined_appearance, landmark_seconds + stage_seconds,
             landmark_cpu + stage_cpu)):
        print(f"  {name:24s} {seconds / T:6.3f} s/frame wall ({cpu / T:.3f} CPU)  "
              f"PSNR {region_psnr(track_appearance, mesh, camera, track, images):6.2f} dB  "
              f"landmark error {np.nanmean(track.lmk_error_px[track.valid]):5.2f} px")
    print(f"  photometric stage alone  {stage_seconds / T:6.3f} s/frame wall ({stage_cpu / T:.3f} CPU); identity "
          f"moved {report['identity_change_mm']} mm, guard rejected {report['guard']['rejected']} frames")

    folder = out_dir / video.stem / "appearance"
    write_appearance(folder, refined_appearance)
    full = region_mesh(problem.model, bundle.masks, ["all"])
    for t in np.flatnonzero(refined.valid)[:: max(1, T // 3)]:
        overlay = draw_appearance(images[t], refined_appearance, full, camera, refined.params.frames(slice(t, t + 1)))
        cv2.imwrite(str(folder / f"overlay_{t:04d}.png"), cv2.cvtColor(np.hstack([images[t], overlay]),
                                                                       cv2.COLOR_RGB2BGR))
    print(f"  appearance and overlays in {folder}")


def true_appearance(gt: GroundTruth, assets: SyntheticAssets, bundle: FlameBundle, cfg: TrackerConfig) -> Appearance:
    """The texture and (mean) lighting a synthetic sequence was rendered with, every texel marked seen."""
    device = torch.device(cfg.device)
    texture = torch.from_numpy(sequence_texture(assets, gt.spec.photo, gt.spec.seed)).permute(2, 0, 1)
    return Appearance(torch.from_numpy(gt.sh.mean(axis=0)).float().to(device),
                      texture=texture.contiguous().to(device),
                      corner_uvs=load_corner_uvs(cfg.photometric, bundle, device),
                      coverage=torch.ones(texture.shape[1:], device=device))


def started_from_identity(result: TrackResult, gt: GroundTruth) -> TrackResult:
    """The landmark track with the sequence's true identity in place of its own (poses, expressions, focal
    length and validity kept): the start of the stage when only its identity is right."""
    own = result.params.shape
    truth = resized_params(gt.params, own.shape[-1], result.params.expr.shape[-1]).shape[:1]
    return replace(result, params=replace(result.params, shape=truth.to(own.device, own.dtype)))


def compare_synthetic(names: list[str], quick: bool, exact_landmarks: bool, known_appearance: bool,
                      out_dir: Path, overrides: dict, known_identity: bool = False) -> None:
    """Landmark stage vs landmarks + photometric on synthetic sequences, scored against the truth (see the
    module docstring)."""
    specs = {spec.name: spec for spec in suite(quick)}
    unknown = [name for name in names if name not in specs]
    if unknown:
        raise TrackerError(f"unknown synthetic sequence(s) {', '.join(unknown)}: choose from {', '.join(specs)}")
    assets = load_assets(out_dir / "cache")
    rows = []
    for name in names or list(specs):
        sequence = generate_sequence(specs[name], assets, out_dir / "sequences")
        gt = load_ground_truth(sequence.ground_truth)
        cfg = load_config(overrides=merge(overrides, {"output": {"dir": str(out_dir / "tracks"), "video": False},
                                                      "densemarks": {"mode": "off"}}))
        problem, result, obs, _, bundle = landmark_run(sequence.video, cfg)
        images, crop = stage_inputs(sequence.video, cfg, obs, result)
        cpu_start = time.process_time()
        refined, _, report = run_photometric_stage(problem, result, obs, images, crop, bundle, cfg)
        stage_cpu = (time.process_time() - cpu_start) / len(result.valid)
        scorer = SequenceScorer(gt, problem.model, bundle.masks["face"])
        camera = Camera(problem.camera.focal, problem.camera.center, problem.camera.height, problem.camera.width)
        tracks = [("landmarks", result), ("photometric", refined)]
        if known_appearance:
            with_truth, _, _ = run_photometric_stage(problem, result, obs, images, crop, bundle, cfg,
                                                     appearance=true_appearance(gt, assets, bundle, cfg))
            tracks.append(("known appearance", with_truth))
        if known_identity:
            started = started_from_identity(result, gt)
            from_identity, _, _ = run_photometric_stage(problem, started, obs, images, crop, bundle, cfg)
            tracks += [("true identity", started), ("true identity start", from_identity)]
        tracked = {label: scorer.score(label, TrackedSequence(track.params, camera, np.arange(gt.n_frames),
                                                              track.valid))
                   for label, track in tracks}
        baselines = scorer.baseline_rows(fit_exact_landmarks(gt, cfg) if exact_landmarks else None)
        landmark_mm, photometric_mm = tracked["landmarks"].v2v_rigid_mm, tracked["photometric"].v2v_rigid_mm
        extra = [tracked[label].v2v_rigid_mm for label, on in (("known appearance", known_appearance),
                                                               ("true identity", known_identity),
                                                               ("true identity start", known_identity)) if on]
        rows.append([name, gt.n_frames, landmark_mm, tracked["landmarks"].reproj_px, photometric_mm,
                     tracked["photometric"].reproj_px, 100 * (1 - photometric_mm / landmark_mm), stage_cpu,
                     *extra, *[row.v2v_rigid_mm for row in baselines], report["guard"]["rejected"]])
    header = ["sequence", "frames", "landmarks (mm)", "(px)", "+ photometric (mm)", "(px)", "cut (%)",
              "stage CPU s/frame"] + (["+ photometric, true appearance (mm)"] if known_appearance else []) + \
        (["landmarks, true identity swapped in (mm)", "+ photometric from there (mm)"] if known_identity else []) + \
        ["mean face, true pose/expr (mm)", "true shape, zero expr (mm)"] + \
        (["exact landmarks (mm)"] if exact_landmarks else []) + ["guard rejected"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("videos", nargs="*", help="videos, or with --synthetic names of synthetic sequences")
    parser.add_argument("--synthetic", action="store_true", help="score on the synthetic benchmark's sequences")
    parser.add_argument("--quick", action="store_true", help="with --synthetic: the quick suite")
    parser.add_argument("--exact-landmarks", action="store_true", help="with --synthetic: that baseline too")
    parser.add_argument("--true-appearance", action="store_true",
                        help="with --synthetic: also the stage given the true texture and lighting (what "
                             "estimating them costs)")
    parser.add_argument("--max-frames", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("/tmp/photometric_compare"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the stages set their own)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="tracker config override, e.g. --set photometric.landmark_weight=0.05 (repeatable)")
    parser.add_argument("--true-identity", action="store_true",
                        help="with --synthetic: also the stage started from the true identity (what its identity "
                             "start costs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine_description(), f"- torch threads {torch.get_num_threads()}")
    if args.max_frames < 2:
        parser.error("--max-frames must be >= 2")
    if not args.synthetic and not args.videos:
        parser.error("give videos, or --synthetic")

    def compare_all() -> None:
        overrides: dict = {}
        for text in args.set:
            overrides = merge(overrides, parse_override(text))
        load_config(overrides=overrides)  # a bad key fails here, before anything runs
        if args.synthetic:
            compare_synthetic(args.videos, args.quick, args.exact_landmarks, args.true_appearance, args.out,
                              overrides, args.true_identity)
        for video in [] if args.synthetic else args.videos:
            compare(Path(video), args.max_frames, args.out, overrides)

    return run_reporting_errors(compare_all)


if __name__ == "__main__":
    sys.exit(main())
