"""`python -m eval.holdout [--quick] [--config YAML] [--set KEY=VALUE ...] [--sequences a,b] [--out DIR]`:
the hold-out benchmark (eval.holdout.benchmark)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eval.ablation import merge, parse_override
from eval.holdout.benchmark import HoldoutOptions, run_holdout
from tracker.errors import run_reporting_errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.holdout", description="Hold-out synthetic benchmark: "
                                     "four rendered sequences, the tracker beside its baselines.")
    parser.add_argument("--quick", action="store_true", help="7 frames per sequence (CI, minutes)")
    parser.add_argument("--config", help="tracker config YAML (default: the tracker's defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="tracker config override, e.g. --set energy.priors.weight=1.0 (repeatable)")
    parser.add_argument("--sequences", help="comma-separated: yaw_sweep, fast_motion, talking_head, hand_occluder")
    parser.add_argument("--out", help="run folder (default: eval/results/holdout or holdout_quick)")
    parser.add_argument("--cache", help="folder for rendered sequences and textures (default: "
                                        "eval/results/holdout_cache)")
    parser.add_argument("--device", default="cpu", help="torch device for the tracker (cpu, cuda)")
    args = parser.parse_args(argv)

    def run() -> None:
        overrides: dict = {}
        for text in args.set:
            overrides = merge(overrides, parse_override(text))
        options = HoldoutOptions(quick=args.quick, config=args.config, overrides=overrides,
                                 sequences=args.sequences.split(",") if args.sequences else None,
                                 out=Path(args.out) if args.out else None, device=args.device)
        if args.cache:
            options.cache_dir = Path(args.cache)
        run_holdout(options)

    return run_reporting_errors(run)


if __name__ == "__main__":
    sys.exit(main())
