"""NoW evaluation from the command line.

python -m eval.geometry NOW_ROOT PREDICTIONS_DIR [--split val|test] [--challenge selfie] [--metrical] [--no-refine]
prints the median, mean and std of the scan-to-mesh distances in mm.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eval.geometry.dataset import NOW_CHALLENGES, NowDataset
from eval.geometry.now import NowOptions, evaluate_now
from tracker.errors import TrackerError


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, evaluate, print the summary; returns the exit code."""
    parser = argparse.ArgumentParser(description="NoW scan-to-mesh evaluation (errors in mm).")
    parser.add_argument("now_root", type=Path, help="NoW dataset folder (holds imagepathsvalidation.txt)")
    parser.add_argument("predictions", type=Path, help="folder with SUBJECT/CHALLENGE/IMAGE.obj + .npy")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--challenge", default=None, choices=NOW_CHALLENGES)
    parser.add_argument("--metrical", action="store_true", help="rigid alignment of predictions in metres")
    parser.add_argument("--no-refine", action="store_true", help="landmark alignment only")
    args = parser.parse_args(argv)
    try:
        dataset = NowDataset(args.now_root, split=args.split, challenge=args.challenge)
        report = evaluate_now(dataset, args.predictions, NowOptions(metrical=args.metrical, refine=not args.no_refine))
    except TrackerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    summary = report.summary
    print(f"samples {len(report.per_sample)} (missing {len(report.missing)}): median {summary.median:.3f} mm, "
          f"mean {summary.mean:.3f} mm, std {summary.std:.3f} mm over {summary.count} scan points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
