"""Speed benchmark: one table with every speed ratio the project targets, measured in one run.

    python -m eval.bench [--quick] [--out eval/results/bench]

--quick: fewer frames and runs (minutes instead of tens of minutes). Writes bench.md and bench.json into --out
and prints the table. Parts on their own: python -m eval.bench.network (DenseMarks network), eval.bench.render
(rasteriser), eval.bench.photometric_steps (photometric stage's steps), eval.bench.memory (peak memory).
Per-configuration stage timings are part of `python -m eval.run` (eval/bench/stages.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eval.bench.suite import SuiteOptions, report, run_suite
from eval.real.videos import REFERENCE_VIDEO
from tracker.errors import run_reporting_errors

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.bench", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer frames and runs")
    parser.add_argument("--video", type=Path, default=REFERENCE_VIDEO, help="clip to time (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "bench")
    args = parser.parse_args(argv)
    options = SuiteOptions.quick() if args.quick else SuiteOptions()
    options = SuiteOptions(**{**options.__dict__, "video": args.video})

    def bench() -> None:
        data = run_suite(options)
        table = report(data, options)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(data, indent=1, default=str))
        (args.out / "bench.md").write_text(table)
        print(table)

    return run_reporting_errors(bench)


if __name__ == "__main__":
    sys.exit(main())
