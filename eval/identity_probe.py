"""How much identity a landmark detector's points carry, measured with the tracker's own priors and solver.

The landmark stage estimates the shared identity jointly with its keyframes' expressions, head poses and the
focal length. The probe runs that estimate on the hold-out sequences starting at the truth (true expression, pose
and focal length, mean identity) and frees one more group of unknowns at each step:

- `identity`: only the identity moves; expression, head pose and camera stay true;
- `+ expression`: expression, jaw, eyes and eyelids move too;
- `+ head pose`: rotation and translation move too;
- `+ focal`: the focal length moves too (the landmark stage's own keyframe problem, started at the truth).

Each fitted identity is scored like the mean-face row of eval.baselines: the truth's pose, expression and camera
with the fitted shape, face-region vertex error after per-frame rigid alignment, median over the sequence's
frames. Points that carry identity beat the mean face (shape 0) at every step; exact projected landmarks (the
detector removed) show what the points of the scheme could tell. The landmark stage cannot know more than the last
step, started elsewhere, does.

    python -m eval.identity_probe [--detectors mediapipe,dlib] [--keyframes 8] [--quick] [--out DIR]

Writes OUT/table.md and OUT/table.json (default OUT: eval/results/identity_probe).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from eval.baselines import SequenceScorer, exact_landmark_track
from eval.bench.machine import machine_name
from eval.holdout.generate import generate_holdout, load_holdout_assets
from eval.holdout.scenes import holdout_suite
from eval.report import markdown_table
from eval.run import RESULTS, git_commit, log
from eval.synthetic.generate import GroundTruth, load_ground_truth
from eval.tracked import TrackedSequence, resized_params
from tracker.camera import Camera
from tracker.config import TrackerConfig, load_config
from tracker.detect import detect_video
from tracker.detect.base import LandmarkTrack, make_detector
from tracker.energy.head_size import HeadSizeEnergy
from tracker.errors import TrackerError, run_reporting_errors
from tracker.fit.init import rough_head_angles
from tracker.fit.sequence import FOCAL_PRIOR, choose_keyframes
from tracker.fit.solver import fit_lm, torch_threads
from tracker.flame.assets import load_flame_bundle
from tracker.pipeline import SCHEME_OF_DETECTOR, landmark_problem, seed_everything

EXACT = "exact"
"""Source name of the exact projected landmarks (of the first detector's scheme)."""


@dataclass(frozen=True)
class ProbeStep:
    name: str
    free: tuple[str, ...]
    """Per-frame fields fitted with the identity."""
    free_focal: bool = False


_EXPRESSION = ("expr", "jaw_pose", "eyes_pose", "eyelids")
STEPS = (
    ProbeStep("identity", ()),
    ProbeStep("+ expression", _EXPRESSION),
    ProbeStep("+ head pose", (*_EXPRESSION, "rotation", "translation")),
    ProbeStep("+ focal", (*_EXPRESSION, "rotation", "translation"), free_focal=True),
)
"""What moves at each step, in order (each frees one more group)."""


@dataclass
class StepResult:
    step: str
    identity_mm: float
    """Fitted identity with the true pose, expression and camera: face error after rigid alignment, median."""
    focal_error_pct: float
    """The fitted focal length relative to the true one (0 where it was held)."""


def identity_error_mm(scorer: SequenceScorer, gt: GroundTruth, shape: torch.Tensor) -> float:
    """The mean-face row's score with identity `shape` (1, n) instead of 0 (sized to the truth's)."""
    params = gt.params.map(lambda t: t.clone())
    n = min(shape.shape[1], params.shape.shape[1])
    params.shape = torch.zeros_like(params.shape[:1])
    params.shape[:, :n] = shape[:, :n].to(params.shape)
    tracked = TrackedSequence(params, gt.camera, np.arange(gt.n_frames), np.ones(gt.n_frames, bool))
    return scorer.score("identity", tracked).v2v_rigid_mm


def probe_track(gt: GroundTruth, track: LandmarkTrack, scorer: SequenceScorer, cfg: TrackerConfig,
                keyframes: int) -> list[StepResult]:
    """Every step of STEPS on `track` (detections or exact landmarks of the scheme of cfg.detect.landmarks):
    keyframes chosen as the landmark stage chooses them, started at the truth with the mean identity."""
    seed_everything(cfg.seed)
    scheme = SCHEME_OF_DETECTOR[cfg.detect.landmarks]
    bundle = load_flame_bundle(cfg.flame.path, cfg.flame.assets_dir, cfg.flame.n_shape, cfg.flame.n_expr, scheme,
                               cfg.flame.eyelids)
    model, landmarks = bundle.model, bundle.landmarks
    truth = resized_params(gt.params, model.n_shape, model.n_expr)
    focal = float(gt.camera.focal)
    results = []
    for step in STEPS:
        camera = Camera.from_image(gt.camera.height, gt.camera.width, cfg.camera.fov_prior_deg, focal)
        obs, problem = landmark_problem(track, model, landmarks, camera, cfg, scheme)
        mean_shape = torch.zeros(1, model.n_shape)
        if cfg.fit.hold_head_size:
            problem = problem.with_terms([*problem.terms, HeadSizeEnergy(model, mean_shape)])
        weights = obs.landmark_weights.numpy() * track.valid[:, None]
        angles = rough_head_angles(model, landmarks, camera, obs.landmarks.numpy(), weights)
        keys = torch.as_tensor(choose_keyframes(track.valid, keyframes, angles))
        start = replace(truth.frames(keys), shape=mean_shape)
        # A field must move for the solver to run: the eyes' pose barely touches the identity.
        free = step.free or ("eyes_pose",)
        with torch_threads(1):
            params, fitted_focal = fit_lm(problem, start, obs.frames(keys), free, cfg.fit.shape_iters,
                                          free_shape=True, free_focal=step.free_focal,
                                          focal_prior=FOCAL_PRIOR * len(keys))
        results.append(StepResult(step.name, identity_error_mm(scorer, gt, params.shape),
                                  100.0 * (float(fitted_focal) / focal - 1.0)))
    return results


@dataclass
class ProbeOptions:
    detectors: tuple[str, ...] = ("mediapipe",)
    """Landmark detectors probed (one scheme each); exact landmarks of the first one's scheme come first."""
    keyframes: int = 8
    quick: bool = False
    """7 frames per sequence instead of 120."""
    out: Path = RESULTS / "identity_probe"
    cache_dir: Path = RESULTS / "holdout_cache"


def run_probe(options: ProbeOptions) -> Path:
    """Probe every hold-out sequence; writes table.md and table.json into options.out and returns it."""
    if options.keyframes < 1:
        raise TrackerError(f"--keyframes must be >= 1, got {options.keyframes}")
    unknown = [name for name in options.detectors if name not in SCHEME_OF_DETECTOR]
    if not options.detectors or unknown:
        raise TrackerError(f"unknown detector(s) {', '.join(unknown) or '(none)'}; known: "
                           f"{', '.join(SCHEME_OF_DETECTOR)}")
    assets = load_holdout_assets(options.cache_dir)
    configs = {name: load_config(None, {"detect": {"landmarks": name}}) for name in options.detectors}
    sources = [EXACT, *options.detectors]
    rows, facts = [], []
    for spec in holdout_suite(options.quick):
        sequence = generate_holdout(spec, assets, options.cache_dir / ("quick" if options.quick else "full"))
        gt = load_ground_truth(sequence.ground_truth)
        scorer = SequenceScorer(gt, assets.model, assets.synthetic.bundle.masks["face"])
        mean_mm = identity_error_mm(scorer, gt, torch.zeros(1, 1))
        row = {"sequence": spec.name, "mean face": mean_mm}
        for source in sources:
            detector = options.detectors[0] if source == EXACT else source
            cfg = configs[detector]
            if source == EXACT:
                scheme_bundle = load_flame_bundle(cfg.flame.path, cfg.flame.assets_dir, cfg.flame.n_shape,
                                                  cfg.flame.n_expr, SCHEME_OF_DETECTOR[detector], cfg.flame.eyelids)
                truth = resized_params(gt.params, scheme_bundle.model.n_shape, scheme_bundle.model.n_expr)
                track = exact_landmark_track(replace(gt, params=truth), scheme_bundle.model, scheme_bundle.landmarks)
            else:
                track = detect_video(sequence.video, make_detector(detector))
            log(f"{spec.name}: {source} ({int(track.valid.sum())}/{len(track)} frames with landmarks)")
            for result in probe_track(gt, track, scorer, cfg, options.keyframes):
                row[f"{source}: {result.step}"] = result.identity_mm
                if result.step == STEPS[-1].name:
                    row[f"{source}: focal error %"] = result.focal_error_pct
        rows.append(row)
        facts.append({"sequence": spec.name, "frames": gt.n_frames, "yaw_min_deg": float(gt.yaw_deg.min()),
                      "yaw_max_deg": float(gt.yaw_deg.max()), "truth_focal_px": float(gt.camera.focal)})
    return write_tables(options, rows, facts)


def write_tables(options: ProbeOptions, rows: list[dict], facts: list[dict]) -> Path:
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
            "machine": machine_name("cpu"), "keyframes": options.keyframes, "quick": options.quick,
            "detectors": ", ".join(options.detectors)}
    header = list(rows[0])
    table = markdown_table(header, [list(r.values()) for r in rows])
    legend = ("Identity error: the fitted shape with the true pose, expression and camera, face-region vertex error "
              "after per-frame rigid alignment, median over the frames (mm); mean face: shape 0. Steps (each frees "
              "one more group, started at the truth): " + "; ".join(
                  f"{s.name}: identity" + (f" + {', '.join(s.free)}" if s.free else "") +
                  (" + focal" if s.free_focal else "") for s in STEPS) +
              f". {options.keyframes} keyframes chosen as the landmark stage chooses them; the tracker's default "
              f"priors, held head size and solver. focal error %: the last step's focal length vs the truth.")
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "table.md").write_text("# Identity probe\n\n" + "\n".join(f"- {k}: {v}" for k, v in info.items())
                                          + f"\n\n{table}\n\n{legend}\n")
    (options.out / "table.json").write_text(json.dumps({"run": info, "rows": rows, "sequences": facts}, indent=1))
    log(f"wrote {options.out / 'table.md'}")
    return options.out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.identity_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--detectors", default="mediapipe", help="comma-separated landmark detectors "
                        "(mediapipe, dlib, fan); exact landmarks of the first one's scheme are probed too")
    parser.add_argument("--keyframes", type=int, default=ProbeOptions.keyframes)
    parser.add_argument("--quick", action="store_true", help="7 frames per sequence")
    parser.add_argument("--out", type=Path, default=ProbeOptions.out)
    parser.add_argument("--cache", type=Path, default=ProbeOptions.cache_dir,
                        help="rendered hold-out sequences (eval.holdout's cache)")
    args = parser.parse_args(argv)
    options = ProbeOptions(tuple(d for d in args.detectors.split(",") if d), args.keyframes, args.quick, args.out,
                           args.cache)
    return run_reporting_errors(lambda: print((run_probe(options) / "table.md").read_text()))


if __name__ == "__main__":
    sys.exit(main())
