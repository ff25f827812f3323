"""Evaluate the tracker: accuracy, stability and speed of several configurations, side by side.

    python -m eval.run [--quick] [--name NAME] [--configs landmarks,landmarks_dlib] [--videos DIR_OR_FILE ...]
                       [--real-frames 30] [--bench-runs 3] [--no-synthetic] [--no-real] [--device cpu]

1. Synthetic sequences with exact ground truth (eval.synthetic; generated once, cached, seeded) are tracked by
   every configuration of the ablation file (configs/ablation_default.yaml) and scored against the truth.
   Beside every track, on the same frames: the mean face with the true pose and expression, the true shape with
   expression 0, and the config's landmark stage fed exact projected landmarks (eval.baselines); printed and in
   table.md.
2. Real videos (default: the shared dev clips) are tracked and scored without 3D truth (eval.real).
3. uvw predictors (the DenseMarks network when its weights and a canonical map are given; the tracker's oracle
   as calibration) are scored for dense correspondence on the synthetic frames (eval.synthetic.dense).
4. Optionally the speed benchmark (eval.bench) times each stage, median of several runs.
Outputs go to eval/results/<name>/: table.md/.csv/.json (one row per configuration), plots/, overlays/,
report.md and report.html, results.json (every per-frame value), bench.md/.json. `--quick` is the CI subset:
one 36-frame synthetic sequence and the first frames of one real clip.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from eval.ablation import DEFAULT_ABLATION, Ablation, AblationConfig, load_ablation, merge, run_config, substitute
from eval.baselines import SequenceScorer, fit_exact_landmarks, landmark_stage_key
from eval.bench.stages import BenchOptions, machine_name, run_bench
from eval.metrics import finite_median
from eval.photometric import PhotometricOptions
from eval.real.evaluate import VideoScores, score_video
from eval.real.jaw import ContourMesh
from eval.real.videos import DEFAULT_VIDEO_DIR, REFERENCE_VIDEO, find_videos
from eval.report import (
    ConfigResults,
    comparison_markdown,
    mesh_overlay,
    save_panel,
    worst_and_median,
    write_report,
)
from eval.synthetic.dense import (
    ORACLES,
    DenseOptions,
    GeodesicTable,
    dense_scores,
    network_predictor,
    oracle_predictor,
    summarise,
)
from eval.synthetic.evaluate import score_sequence
from eval.synthetic.generate import (
    GroundTruth,
    SyntheticAssets,
    SyntheticSequence,
    generate_sequence,
    load_assets,
    load_ground_truth,
)
from eval.synthetic.scenario import SequenceSpec
from eval.synthetic.suite import suite
from eval.synthetic.uvmap import UvAtlas, uv_atlas
from eval.tracked import TrackedSequence, load_tracked
from tracker.config import TrackerConfig, load_config
from tracker.errors import TrackerError, run_reporting_errors
from tracker.fit.sequence import evenly_spaced
from tracker.flame.model import FlameModel
from tracker.io.video import FrameSelection, read_frames
from tracker.render.texture import load_obj

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "eval" / "results"
PROBE_FRAMES = 3
"""Frames tracked to check that a configuration's stage runs at all."""
METRIC_ATLAS_SIZE = 256
"""Texture resolution of the photometric metric (coarser than the generator's: it only has to compare)."""


@dataclass
class EvalOptions:
    """What one evaluation run does; `preset` gives the full benchmark and the --quick subset."""

    name: str
    """Run folder under `out`."""
    quick: bool = False
    configs: list[str] | None = None
    ablation: str = str(DEFAULT_ABLATION)
    videos: list[str] = field(default_factory=lambda: [str(DEFAULT_VIDEO_DIR)])
    real_frames: int = 30
    """Frames tracked per real video (from its start)."""
    synthetic: bool = True
    real: bool = True
    bench_runs: int = 0
    bench_frames: int = 20
    device: str = "cpu"
    out: Path = RESULTS
    cache_dir: Path = RESULTS / "cache"
    photometric: PhotometricOptions = field(default_factory=PhotometricOptions)
    dense: DenseOptions | None = field(default_factory=DenseOptions)
    """Dense-correspondence scoring of uvw predictors on the synthetic frames (None: off)."""
    densemarks_weights: str | None = None
    canonical_map: str | None = None
    """Canonical map for the DenseMarks network's dense-correspondence score."""
    sequences: tuple[SequenceSpec, ...] | None = None
    """Synthetic sequences to use instead of the suite's."""
    tracker_overrides: dict = field(default_factory=dict)
    """Tracker config keys applied to every configuration (after the ablation file's)."""

    @staticmethod
    def preset(quick: bool, **overrides) -> EvalOptions:
        """The full benchmark, or the CI subset (one synthetic sequence, 8 frames of one clip, no bench)."""
        if quick:
            values = dict(name="quick", quick=True, videos=[str(REFERENCE_VIDEO)], real_frames=8, bench_runs=0,
                          photometric=PhotometricOptions(texture_frames=8, eval_frames=12),
                          dense=DenseOptions(frames=2, pixels=1000))
        else:
            values = dict(name="full", bench_runs=3)
        return EvalOptions(**{**values, **{k: v for k, v in overrides.items() if v is not None}})

    def synthetic_suite(self) -> tuple[SequenceSpec, ...]:
        return self.sequences if self.sequences is not None else suite(self.quick)


@dataclass
class Context:
    """What every scoring step needs, loaded once."""

    assets: SyntheticAssets
    atlas: UvAtlas
    run_dir: Path
    options: EvalOptions
    scorers: dict[str, SequenceScorer] = field(default_factory=dict)
    """Per synthetic sequence: the truth's vertices and visibility, shared by every config's baselines."""
    exact_fits: dict[tuple[str, str], TrackedSequence] = field(default_factory=dict)
    """(sequence, landmark-stage key) -> the exact-landmark baseline fit, shared by configs with equal keys."""

    @property
    def model(self) -> FlameModel:
        return self.assets.bundle.model

    @property
    def face_ids(self) -> np.ndarray:
        return self.assets.bundle.masks["face"]

    @functools.cached_property
    def outline(self) -> ContourMesh:
        """Where the model's jaw outline can lie, for the real videos' jaw metric."""
        return ContourMesh.build(self.model, self.assets.bundle.masks)


def log(message: str) -> None:
    print(f"[eval {time.strftime('%H:%M:%S')}] {message}", flush=True)


def check_config(config: AblationConfig, ablation: Ablation) -> str | None:
    """Why the tracker refuses this config's keys, or None when it accepts them."""
    try:
        load_config(None, merge(ablation.base, config.overrides))
    except TrackerError as error:
        return str(error)
    return None


def probe_stage(config: AblationConfig, ablation: Ablation, sequences: list[SyntheticSequence], videos: list[Path],
                ctx: Context) -> str | None:
    """Why a config that needs a stage cannot be measured, found by tracking the first frames of one video
    (cheap next to a whole run of a switch the tracker ignores); None when the stage runs."""
    if not config.requires_stage:
        return None
    if sequences:
        video, placeholders = sequences[0].video, {"ground_truth": str(sequences[0].ground_truth)}
    elif videos and not config.synthetic_only:
        video, placeholders = videos[0], {}
    else:
        return "no video to run it on (synthetic_only configs need the synthetic sequences)"
    overrides = {"device": ctx.options.device, "video": {"max_frames": PROBE_FRAMES}}
    return run_config(config, ablation.base, video, ctx.run_dir / "probe", overrides, placeholders).skipped


def run_synthetic(result: ConfigResults, config: AblationConfig, ablation: Ablation,
                  sequences: list[SyntheticSequence], ctx: Context) -> None:
    for sequence in sequences:
        run = run_config(config, ablation.base, sequence.video, ctx.run_dir / "tracks",
                         {"device": ctx.options.device}, {"ground_truth": str(sequence.ground_truth)})
        if not _record_run(result, config, run, sequence.name):
            return
        gt = load_ground_truth(sequence.ground_truth)
        tracked = load_tracked(run.params_path, ctx.model.n_shape, ctx.model.n_expr)
        scores = score_sequence(gt, tracked, ctx.model, ctx.face_ids, ctx.assets.bundle.landmarks, ctx.atlas,
                                str(sequence.video), ctx.options.photometric)
        result.synthetic[sequence.name] = scores
        frame = scores.per_frame
        log(f"{config.name} / {sequence.name}: rigid vertex error {np.nanmean(frame['v2v_rigid_mm']):.2f} mm, "
            f"NME {100 * np.nanmean(frame['nme68']):.2f} %, {run.summary['seconds_per_frame']['total']:.2f} s/frame")
        result.baselines[sequence.name] = baseline_comparison(
            sequence, gt, tracked, tracker_config(config, ablation, sequence, ctx), ctx)
        print(comparison_markdown({f"{config.name} / {sequence.name}": result.baselines[sequence.name]}), flush=True)
        _synthetic_overlays(result, sequence, gt, tracked, scores.per_frame["v2v_rigid_mm"], ctx)


def tracker_config(config: AblationConfig, ablation: Ablation, sequence: SyntheticSequence,
                   ctx: Context) -> TrackerConfig:
    """The tracker configuration a config's synthetic runs use (as eval.ablation.run_config builds it)."""
    own = substitute(config.overrides, {"ground_truth": str(sequence.ground_truth)}, f"ablation config {config.name}")
    return load_config(None, merge(merge(ablation.base, own), {"device": ctx.options.device}))


def baseline_comparison(sequence: SyntheticSequence, gt: GroundTruth, tracked: TrackedSequence, cfg: TrackerConfig,
                        ctx: Context) -> list:
    """The track's row and its baseline rows (eval.baselines) on the sequence's frames."""
    if sequence.name not in ctx.scorers:
        ctx.scorers[sequence.name] = SequenceScorer(gt, ctx.model, ctx.face_ids)
    key = (sequence.name, landmark_stage_key(cfg))
    if key not in ctx.exact_fits:
        log(f"{sequence.name}: landmark stage on exact landmarks ({cfg.detect.landmarks} scheme)")
        ctx.exact_fits[key] = fit_exact_landmarks(gt, cfg)
    scorer = ctx.scorers[sequence.name]
    return [scorer.score("tracker", tracked), *scorer.baseline_rows(ctx.exact_fits[key])]


def run_real(result: ConfigResults, config: AblationConfig, ablation: Ablation, videos: list[Path],
             ctx: Context) -> None:
    selection = FrameSelection(max_frames=ctx.options.real_frames)
    for video in videos:
        run = run_config(config, ablation.base, video, ctx.run_dir / "tracks",
                         {"device": ctx.options.device, "video": {"max_frames": ctx.options.real_frames}})
        if not _record_run(result, config, run, video.stem):
            return
        if run.summary["valid_frames"] == 0:
            result.failures[video.stem] = "no face found in any frame"
            continue
        tracked = load_tracked(run.params_path, ctx.model.n_shape, ctx.model.n_expr)
        scores = score_video(video, tracked, _detector_of(config, ablation), ctx.model, ctx.assets.bundle.assets_dir,
                             ctx.face_ids, ctx.atlas, selection, ctx.run_dir / "heldout", ctx.options.photometric,
                             ctx.outline)
        result.real[video.stem] = scores
        log(f"{config.name} / {video.name}: held-out ({scores.heldout_detector}) NME "
            f"{100 * np.nanmean(scores.per_frame['nme_heldout']):.2f} %, valid {100 * scores.valid_ratio:.0f} %, "
            f"dlib jaw to outline {finite_median(scores.per_frame['jaw_iod']):.3f} IOD, inner 51 "
            f"{finite_median(scores.per_frame['inner51_iod']):.3f} IOD (medians)")
        _real_overlays(result, video, tracked, scores, selection, ctx)


def _detector_of(config: AblationConfig, ablation: Ablation) -> str:
    return load_config(None, merge(ablation.base, config.overrides)).detect.landmarks


def _record_run(result: ConfigResults, config: AblationConfig, run, video_name: str) -> bool:
    """Store the run's summary; False (and the config marked skipped) when the config cannot run at all."""
    if run.summary is not None:
        result.summaries[video_name] = run.summary
        result.peak_heap_mb = float(np.nanmax([result.peak_heap_mb, run.python_heap_mb]))
    if run.skipped is None:
        return True
    if run.summary is not None:  # the tracker ran but not the stage the config is about: same for every video
        result.skipped = run.skipped
        log(f"{config.name}: skipped ({run.skipped})")
        return False
    result.failures[video_name] = run.skipped
    log(f"{config.name} / {video_name}: no output ({run.skipped})")
    return True


def _frames_at(video: Path, indices: set[int]) -> dict[int, np.ndarray]:
    return {f.index: f.rgb for f in read_frames(video) if f.index in indices}


def _synthetic_overlays(result: ConfigResults, sequence: SyntheticSequence, gt: GroundTruth,
                        tracked: TrackedSequence, errors: np.ndarray, ctx: Context) -> None:
    """Worst and median frames by rigid vertex error: the frame, the truth and the track with their landmarks."""
    picks = worst_and_median(errors)
    frames = _frames_at(sequence.video, set(picks.values()))
    gt_verts = ctx.model(gt.params).vertices
    pred_verts = tracked.vertices(ctx.model)
    faces, landmarks = ctx.model.faces, ctx.assets.bundle.landmarks
    truth = load_tracked(sequence.ground_truth, ctx.model.n_shape, ctx.model.n_expr)
    gt_points = truth.landmarks_2d(gt_verts, landmarks)
    pred_points = tracked.landmarks_2d(pred_verts, landmarks)
    for kind, t in picks.items():
        frame = frames[t]
        panels = [frame,
                  mesh_overlay(frame, gt_verts[t], faces, gt.camera, gt_points[t], "ground truth", (120, 255, 120)),
                  mesh_overlay(frame, pred_verts[t], faces, tracked.camera, pred_points[t],
                               f"{result.name} {errors[t]:.1f} mm")]
        path = Path("overlays") / f"{result.name}_{sequence.name}_{kind}.png"
        save_panel(ctx.run_dir / path, panels)
        result.overlays.append((f"{sequence.name}, {kind} frame {t} (rigid error {errors[t]:.1f} mm)", str(path)))


def _real_overlays(result: ConfigResults, video: Path, tracked: TrackedSequence, scores: VideoScores,
                   selection: FrameSelection, ctx: Context) -> None:
    """Worst and median frames by held-out NME: the frame, and the tracked mesh with the held-out points."""
    nme = scores.per_frame["nme_heldout"]
    picks = worst_and_median(nme)
    wanted = {int(tracked.frame_index[t]): t for t in picks.values()}
    frames = {wanted[f.index]: f.rgb for f in read_frames(video, selection) if f.index in wanted}
    vertices = tracked.vertices(ctx.model)
    for kind, t in picks.items():
        panels = [frames[t], mesh_overlay(frames[t], vertices[t], ctx.model.faces, tracked.camera,
                                          scores.heldout_points[t], f"{result.name} NME {100 * nme[t]:.1f}%")]
        path = Path("overlays") / f"{result.name}_{video.stem}_{kind}.png"
        save_panel(ctx.run_dir / path, panels)
        result.overlays.append((f"{video.stem}, {kind} frame {tracked.frame_index[t]} (held-out NME "
                                f"{100 * nme[t]:.1f} %, green: {scores.heldout_detector} landmarks)", str(path)))


def run_dense(sequences: list[SyntheticSequence], ctx: Context) -> dict:
    """Dense-correspondence scores of each uvw predictor over the synthetic sequences, and why some did not run."""
    options, model, masks = ctx.options.dense, ctx.model, ctx.assets.bundle.masks
    eyeballs = np.concatenate([masks["left_eyeball"], masks["right_eyeball"]])
    candidates = np.setdiff1d(np.arange(model.n_vertices), eyeballs)  # eyeballs turn with the gaze
    geodesics = GeodesicTable(model, ctx.face_ids)
    errors: dict[str, list[np.ndarray]] = {}
    skipped: dict[str, str] = {}
    try:
        network = network_predictor(ctx.options.densemarks_weights, ctx.options.canonical_map, model.n_vertices,
                                    ctx.options.device)
    except TrackerError as error:
        network, skipped["densemarks"] = None, str(error)
    for sequence in sequences:
        gt = load_ground_truth(sequence.ground_truth)
        rows = set(evenly_spaced(np.arange(gt.n_frames), options.frames).tolist())
        frames = _frames_at(sequence.video, rows)
        predictors = [oracle_predictor(name, model, sequence.ground_truth, noise) for name, noise in ORACLES.items()]
        for predictor in predictors + ([network] if network else []):
            errors.setdefault(predictor.name, []).append(
                dense_scores(predictor, gt, frames, model, ctx.face_ids, candidates, geodesics, options))
    scores = {name: summarise(np.concatenate(parts), options) for name, parts in errors.items()}
    for name, summary in scores.items():
        log(f"dense correspondence / {name}: PCK@10mm {summary['pck_10mm']:.3f}, GPS {summary['gps']:.3f}")
    return {"scores": scores, "skipped": skipped}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def results_json(results: list[ConfigResults], run_info: dict) -> dict:
    """Every per-frame value of the run, for later analysis."""
    def scores(items: dict) -> dict:
        return {name: {**{k: v for k, v in asdict(s).items() if k not in ("per_frame", "heldout_points")},
                       "per_frame": {k: np.asarray(v).tolist() for k, v in s.per_frame.items()}}
                for name, s in items.items()}
    return {"run": run_info, "configs": [
        {"name": r.name, "description": r.description, "skipped": r.skipped, "failures": r.failures,
         "synthetic": scores(r.synthetic), "real": scores(r.real), "summaries": r.summaries,
         "baselines": {name: [row.to_dict() for row in rows] for name, rows in r.baselines.items()}}
        for r in results]}


def run_evaluation(options: EvalOptions) -> Path:
    """Run everything and write the outputs; returns the run folder."""
    started = time.perf_counter()
    run_dir = options.out / options.name
    run_dir.mkdir(parents=True, exist_ok=True)
    ablation = load_ablation(options.ablation)
    ablation = Ablation(merge(ablation.base, options.tracker_overrides), ablation.configs)
    configs = ablation.select(options.configs, options.quick)
    assets = load_assets(options.cache_dir)
    ctx = Context(assets, uv_atlas(load_obj(assets.bundle.assets_dir / "head_template.obj"), METRIC_ATLAS_SIZE),
                  run_dir, options)
    sequences = []
    if options.synthetic:
        for spec in options.synthetic_suite():
            log(f"synthetic sequence {spec.name}: {spec.n_frames} frames")
            sequences.append(generate_sequence(spec, assets, options.cache_dir / "synthetic"))
    videos = find_videos(options.videos) if options.real else []
    results = []
    for config in configs:
        skipped = check_config(config, ablation) or probe_stage(config, ablation, sequences, videos, ctx)
        result = ConfigResults(config.name, config.description, skipped=skipped)
        results.append(result)
        if result.skipped:
            log(f"{config.name}: skipped ({result.skipped})")
            continue
        run_synthetic(result, config, ablation, sequences, ctx)
        if result.skipped is None and not config.synthetic_only:
            run_real(result, config, ablation, videos, ctx)
        if result.skipped is None and not (result.synthetic or result.real) and result.failures:
            result.skipped = "no run produced output: " + next(iter(result.failures.values()))
    dense = run_dense(sequences, ctx) if sequences and options.dense else None
    bench = None
    measured = [c for c, r in zip(configs, results, strict=True) if r.skipped is None]
    if options.bench_runs > 0 and measured and videos:
        log(f"speed benchmark: {options.bench_runs} runs x {len(measured)} configs")
        bench_video = REFERENCE_VIDEO if REFERENCE_VIDEO in videos else videos[0]
        synthetic = (sequences[0].video, sequences[0].ground_truth) if sequences else None
        bench = run_bench(measured, ablation.base, bench_video,
                          BenchOptions(options.bench_frames, options.bench_runs, options.device), run_dir / "bench",
                          synthetic)
    run_info = {
        "name": options.name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_name(options.device), "platform": platform.platform(), "commit": git_commit(),
        "quick": options.quick, "device": options.device, "torch": torch.__version__,
        "synthetic sequences": ", ".join(f"{s.name} ({s.n_frames} frames)" for s in options.synthetic_suite())
        if options.synthetic else "none",
        "real videos": f"{len(videos)} (first {options.real_frames} frames each)",
        "flame": str(assets.bundle.flame_file), "wall time (min)": round((time.perf_counter() - started) / 60, 1),
    }
    (run_dir / "results.json").write_text(json.dumps({**results_json(results, run_info), "dense": dense,
                                                      "bench": bench}, default=float))
    report = write_report(results, run_dir, run_info, bench, dense)
    log(f"done in {run_info['wall time (min)']} min: {report}")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="the CI subset (minutes)")
    parser.add_argument("--name", help="run folder under eval/results (default: quick or full)")
    parser.add_argument("--configs", help="comma-separated names from the ablation file (default: all; --quick: "
                                          "the quick ones)")
    parser.add_argument("--ablation", help="ablation YAML (default: configs/ablation_default.yaml)")
    parser.add_argument("--videos", nargs="+", help=f"real videos or folders (default: {DEFAULT_VIDEO_DIR})")
    parser.add_argument("--real-frames", type=int, help="frames tracked per real video")
    parser.add_argument("--bench-runs", type=int, help="speed benchmark runs per config (0 = none)")
    parser.add_argument("--no-synthetic", action="store_true")
    parser.add_argument("--no-real", action="store_true")
    parser.add_argument("--device", help="torch device for the tracker (cpu, cuda)")
    parser.add_argument("--densemarks-weights", help="DenseMarks model.safetensors for the dense-correspondence "
                                                     "score (default: the Hugging Face cache, offline)")
    parser.add_argument("--canonical-map", help="canonical map (.npz/.npy) of the DenseMarks network for that score")
    args = parser.parse_args(argv)
    options = EvalOptions.preset(
        args.quick, name=args.name, configs=args.configs.split(",") if args.configs else None,
        ablation=args.ablation, videos=args.videos, real_frames=args.real_frames, bench_runs=args.bench_runs,
        synthetic=False if args.no_synthetic else None, real=False if args.no_real else None, device=args.device,
        densemarks_weights=args.densemarks_weights, canonical_map=args.canonical_map)
    return run_reporting_errors(lambda: run_evaluation(options))


if __name__ == "__main__":
    sys.exit(main())
