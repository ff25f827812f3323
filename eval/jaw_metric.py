"""Jaw-outline metric of tracked real clips (eval.real.jaw): dlib's jaw points to the fitted mesh's projected
jaw/cheek outline, and dlib's inner 51 points to the mesh's landmarks, in inter-ocular distances; medians per clip.

    python -m eval.jaw_metric RUN_DIR_OR_VIDEO ... [--max-frames 60] [--config YAML] [--set KEY=VALUE ...]
                              [--out DIR]

A RUN_DIR is a tracker output folder (OUT/<video stem>/ holding flame_params.npz): its track is scored on the
frames it tracked. A video (or a folder of videos) is first tracked with the tracker's defaults (or --config /
--set) on its first --max-frames frames, into OUT/tracks/. Writes OUT/jaw_metric.md and .json (default OUT:
eval/results/jaw_metric).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.ablation import AblationConfig, merge, parse_override, run_config
from eval.metrics import finite_median
from eval.real.evaluate import detector_landmarks, landmark_agreement
from eval.real.jaw import ContourMesh, jaw_scores
from eval.real.videos import find_videos
from eval.report import markdown_table
from eval.run import RESULTS, log
from eval.tracked import load_tracked
from tracker.config import read_yaml
from tracker.detect.base import SCHEME_IBUG68
from tracker.errors import TrackerError, run_reporting_errors
from tracker.flame.assets import load_flame_bundle
from tracker.io.export import read_params
from tracker.io.video import FrameSelection

PARAMS_FILE = "flame_params.npz"


@dataclass
class ClipScore:
    name: str
    run_dir: str
    frames: int
    scored: int
    """Frames with a tracked face and a dlib face."""
    jaw_iod: float
    inner51_iod: float


def score_run(run_dir: Path, cache_dir: Path) -> ClipScore:
    """The jaw metric of one tracker output folder, on the frames it tracked."""
    params_path = run_dir / PARAMS_FILE
    if not params_path.is_file():
        raise TrackerError(f"{run_dir} holds no {PARAMS_FILE}: not a tracker output folder")
    arrays, metadata = read_params(params_path)
    config = metadata.get("config", {})
    bundle = load_flame_bundle(metadata.get("flame_file"), config.get("flame", {}).get("assets_dir"),
                               int(metadata.get("n_shape", arrays["shape"].size)),
                               int(metadata.get("n_expr", arrays["expr"].shape[1])), SCHEME_IBUG68)
    video = Path(metadata.get("video", ""))
    if not video.is_file():
        raise TrackerError(f"{run_dir}: its video {video} is not there any more")
    tracked = load_tracked(params_path, bundle.model.n_shape, bundle.model.n_expr)
    selection = FrameSelection(**config.get("video", {}))
    reference = detector_landmarks(video, "dlib", selection, cache_dir)
    vertices = tracked.vertices(bundle.model)
    _, points = landmark_agreement(reference, tracked, vertices, bundle.landmarks)
    scores = jaw_scores(tracked, vertices, ContourMesh.build(bundle.model, bundle.masks), bundle.landmarks, points)
    return ClipScore(video.stem, str(run_dir), len(tracked.frame_index), int(np.isfinite(scores["jaw_iod"]).sum()),
                     finite_median(scores["jaw_iod"]), finite_median(scores["inner51_iod"]))


def run_dirs(paths: list[str], out: Path, max_frames: int, tracker_values: dict) -> list[Path]:
    """Tracker output folders for the arguments: run folders as given, videos tracked first."""
    dirs, videos = [], []
    for path in map(Path, paths):
        if not path.exists():
            raise TrackerError(f"{path} does not exist (give tracker output folders, videos or folders of videos)")
        if (path / PARAMS_FILE).is_file():
            dirs.append(path)
        else:
            videos += find_videos([path])
    values = merge(tracker_values, {"output": {"video": False}, "video": {"max_frames": max_frames}})
    for video in videos:
        log(f"{video.name}: tracking the first {max_frames} frames")
        run = run_config(AblationConfig("tracker", values), {}, video, out / "tracks", trace_memory=False)
        if run.skipped is not None:
            raise TrackerError(f"{video}: the tracker produced nothing ({run.skipped})")
        dirs.append(run.out_dir)
    return dirs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.jaw_metric", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="tracker output folders, videos or folders of videos")
    parser.add_argument("--max-frames", type=int, default=60, help="frames tracked per video (default 60)")
    parser.add_argument("--config", help="tracker config YAML for videos (default: the tracker's defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="tracker config override")
    parser.add_argument("--out", help="output folder (default: eval/results/jaw_metric)")
    args = parser.parse_args(argv)

    def run() -> None:
        out = Path(args.out) if args.out else RESULTS / "jaw_metric"
        values = read_yaml(args.config)[1] if args.config else {}
        for text in args.set:
            values = merge(values, parse_override(text))
        clips = [score_run(d, out / "detections") for d in run_dirs(args.paths, out, args.max_frames, values)]
        header = ["clip", "frames", "scored", "jaw_iod (median)", "inner51_iod (median)"]
        rows = [[c.name, str(c.frames), str(c.scored), c.jaw_iod, c.inner51_iod] for c in clips]
        table = markdown_table(header, rows)
        legend = ("jaw_iod: dlib's jaw points 0-16 to the fitted mesh's projected jaw/cheek outline (point to "
                  "curve); inner51_iod: dlib's points 17-67 to the mesh's landmarks; both in dlib's inter-ocular "
                  "distances (outer eye corners), medians over the clip's frames.")
        out.mkdir(parents=True, exist_ok=True)
        (out / "jaw_metric.md").write_text(f"{table}\n\n{legend}\n")
        (out / "jaw_metric.json").write_text(json.dumps([c.__dict__ for c in clips], indent=1, default=float))
        print(f"{table}\n\n{legend}\n\nmedian over clips: jaw {finite_median([c.jaw_iod for c in clips]):.3f}, "
              f"inner 51 {finite_median([c.inner51_iod for c in clips]):.3f} IOD; written to {out / 'jaw_metric.md'}")

    return run_reporting_errors(run)


if __name__ == "__main__":
    sys.exit(main())
