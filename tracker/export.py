"""`python -m tracker.export RUN_DIR --format nerf|vhap --out DIR`: a tracked run in the layout head-avatar
tools read.

- nerf: a NeRF-style dataset (images, per-frame FLAME parameters, transforms*.json) as VHAP's
  export_as_nerf_dataset writes it and GaussianAvatars trains on (tracker/io/nerf_dataset.py);
- vhap: VHAP's tracked_flame_params.npz (tracker/io/vhap_params.py).

Both carry the model that produced the run (export_info.json) and say what a consumer's default model would
get wrong (tracker/io/avatar.py). `--help` does not import torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tracker.errors import EXIT_OK, TrackerError, report_failure

FORMATS = ("nerf", "vhap")
CONSUMERS = {"nerf": "GaussianAvatars", "vhap": "VHAP"}
FG_MASKS_NOTE = ("fg_masks/ not written: the tracker estimates no foreground matte; GaussianAvatars then learns the "
                 "background too (matte the frames, e.g. as VHAP's preprocessing does, to add them)")


def export(run: str | Path, fmt: str, out: str | Path, video: str | Path | None = None,
           flame: str | Path | None = None, flame_assets: str | Path | None = None,
           train_ratio: float | None = None, strict: bool = False, show_progress: bool = True) -> dict:
    """Export a run folder (or flame_params.npz) to `out` in format `fmt`; returns export_info.json's content.
    Notes go to stdout and warnings to stderr; `strict` turns warnings into an error before anything is
    written."""
    import numpy as np

    from tracker.io.avatar import EYELID_WARNING, check_model, consumer_frames
    from tracker.io.export import write_json
    from tracker.io.nerf_dataset import TRAIN_RATIO, write_nerf_dataset
    from tracker.io.vhap_params import VHAP_CAMERA_POSITION, write_vhap_params
    from tracker.result import load

    if fmt not in FORMATS:
        raise TrackerError(f"unknown export format {fmt!r}: choose {' or '.join(FORMATS)}")
    result = load(run)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrackerError(f"{out} exists and is not an empty folder: choose a new output folder")
    consumer = CONSUMERS[fmt]
    flame_file = Path(flame or result.metadata.get("flame_file", ""))
    model = result.model(flame, flame_assets)
    check = check_model(flame_file, model, consumer)
    valid = result.valid.astype(bool)
    if fmt == "nerf":
        rows = np.flatnonzero(valid)  # frames without a face hold a neighbour's fit: not training data
        if len(rows) == 0:
            raise TrackerError(f"{result.path}: no frame has a fitted face, nothing to export")
        world_shift = -result["translation"][rows].astype(np.float64).mean(0)
    else:
        rows = np.arange(len(result))
        world_shift = VHAP_CAMERA_POSITION
    frames = consumer_frames(result.arrays, model, rows, world_shift)
    warnings = list(check.warnings) + ([EYELID_WARNING] if frames.dynamic_offset is not None else [])
    if not result.metadata.get("complete", True):
        warnings.append("the run did not finish: only its finished frames are exported")
    if strict and warnings:
        raise TrackerError(f"--strict: {warnings[0]}")

    out.mkdir(parents=True, exist_ok=True)
    info = {
        "format": fmt, "consumer": consumer, "model": check.record,
        "source": {"run": str(result.path), "tool_version": result.metadata.get("tool_version"),
                   "video": result.metadata.get("video")},
        "world_shift": [float(v) for v in world_shift],
        "frames": {"exported": int(len(rows)),
                   "skipped_without_face": [int(i) for i in result.frame_index[~valid]] if fmt == "nerf" else []},
        "note": check.note, "warnings": warnings,
    }
    if fmt == "nerf":
        video = Path(video or result.metadata.get("video", ""))
        if not video.is_file():
            raise TrackerError(f"the run's video {video} is not there: pass it with --video")
        ratio = TRAIN_RATIO if train_ratio is None else train_ratio
        if not 0 < ratio <= 1:
            raise TrackerError(f"--train-ratio must be in (0, 1], got {ratio}")
        write_nerf_dataset(result, frames, rows, world_shift, video, out, ratio, show_progress)
        info.update(fg_masks=FG_MASKS_NOTE, train_ratio=ratio)
    else:
        write_vhap_params(result, frames, out / "tracked_flame_params.npz")
    write_json(out / "export_info.json", info)
    print(f"note: {check.note}")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if fmt == "nerf":
        print(f"note: {FG_MASKS_NOTE}")
    skipped = len(info["frames"]["skipped_without_face"])
    print(f"{consumer} {fmt} export of {len(rows)} frames" + (f" ({skipped} without a face left out)" if skipped
                                                               else "") + f": {out}")
    return info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tracker.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See README.md, 'Export for head avatars', for the layouts and conventions.")
    p.add_argument("run", help="a run folder (OUT/<video stem>/) or its flame_params.npz")
    p.add_argument("--format", choices=FORMATS, default="nerf",
                   help="nerf: GaussianAvatars / VHAP NeRF dataset; vhap: tracked_flame_params.npz (default: nerf)")
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--video", help="the tracked video (default: the path recorded in the run)")
    p.add_argument("--flame", help="the run's FLAME file, when it moved (checked against its sha256)")
    p.add_argument("--flame-assets", help="the run's FLAME assets folder (eyelids), when it moved")
    p.add_argument("--train-ratio", type=float, help="share of timesteps in the training split (default: 0.7)")
    p.add_argument("--strict", action="store_true",
                   help="refuse (exit 1) instead of warning when the consumer's default model differs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        export(args.run, args.format, args.out, args.video, args.flame, args.flame_assets, args.train_ratio,
               args.strict, show_progress=not args.quiet)
    except (Exception, KeyboardInterrupt) as exc:
        return report_failure(exc)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
