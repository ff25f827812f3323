"""Speed benchmark: seconds per frame of each tracker stage for each configuration, median of several runs.

    python -m eval.bench [--video V] [--frames 20] [--runs 3] [--configs landmarks,landmarks_dlib]
                         [--ablation configs/ablation_default.yaml] [--device cpu] [--out eval/results/bench]

Writes bench.json and bench.md (with the machine named) into --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eval.ablation import DEFAULT_ABLATION, load_ablation
from eval.bench.stages import BenchOptions, run_bench
from eval.real.videos import REFERENCE_VIDEO, find_videos
from eval.synthetic.generate import generate_sequence, load_assets
from eval.synthetic.suite import QUICK_SUITE
from tracker.errors import TrackerError

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.bench", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--video", type=Path, default=REFERENCE_VIDEO, help="clip to time (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=20, help="frames tracked per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration (median reported)")
    parser.add_argument("--configs", help="comma-separated config names (default: all in the ablation file)")
    parser.add_argument("--ablation", default=str(DEFAULT_ABLATION), help="ablation YAML with the configs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-synthetic", action="store_true",
                        help="skip synthetic-only configs (otherwise timed on the --quick synthetic sequence)")
    parser.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "bench")
    args = parser.parse_args(argv)
    try:
        ablation = load_ablation(args.ablation)
        configs = ablation.select(args.configs.split(",") if args.configs else None, quick=False)
        synthetic = None
        if not args.no_synthetic and any(config.synthetic_only for config in configs):
            cache = REPO / "eval" / "results" / "cache"
            sequence = generate_sequence(QUICK_SUITE[0], load_assets(cache), cache / "synthetic")
            synthetic = (sequence.video, sequence.ground_truth)
        data = run_bench(list(configs), ablation.base, find_videos([args.video])[0],
                         BenchOptions(args.frames, args.runs, args.device), args.out, synthetic)
    except TrackerError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print((args.out / "bench.md").read_text())
    return 0 if data["configs"] else 1


if __name__ == "__main__":
    sys.exit(main())
