"""Command line: `python -m tracker.run VIDEO [options]` tracks a video and writes FLAME parameters."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from tracker.config import load_config
from tracker.errors import TrackerError

EPILOG = """FLAME is looked up in this order: --flame, $FLAME_MODEL, flame_assets/, then the shipped open default
model (not the official FLAME; see flame_assets/README.md).
Outputs go to OUT/<video stem>/: flame_params.npz, summary.json, overlay.mp4, meshes/ (see README.md)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tracker.run", description="Track a FLAME head in a video.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", help="input video (mp4, mov, mkv, avi, ...)")
    p.add_argument("--flame", help="FLAME model file (FLAME 2020/2023/2023 Open .pkl, or .npz; "
                                   "default: the shipped open model)")
    p.add_argument("--flame-assets", help="folder with landmark embeddings, FLAME_masks, eyelids (default: "
                                          "$TRACKER_FLAME_ASSETS, else the FLAME file's folder, else flame_assets/)")
    p.add_argument("--out", help="output root (default: output/)")
    p.add_argument("--config", help="YAML config: a file, or a name in configs/ (e.g. default.yaml)")
    p.add_argument("--landmarks", choices=["mediapipe", "dlib", "fan"], help="landmark detector")
    p.add_argument("--mediapipe-model", help="MediaPipe face_landmarker .task file (default: "
                                             "$TRACKER_MEDIAPIPE_MODEL, else the one in flame_assets/)")
    p.add_argument("--device", help="torch device: cpu (default), cuda, cuda:N")
    p.add_argument("--start", type=int, help="first frame index")
    p.add_argument("--max-frames", type=int, help="track at most N frames")
    p.add_argument("--stride", type=int, help="track every N-th frame")
    p.add_argument("--focal", type=float, help="fixed focal length in pixels (default: estimated)")
    p.add_argument("--global-iters", type=int, help="steps of the joint refinement over all frames (0 = off)")
    p.add_argument("--photometric", choices=["on", "off"], help="photometric stage (default: config)")
    p.add_argument("--densemarks", choices=["auto", "on", "off"], help="DenseMarks term (auto: when weights found)")
    p.add_argument("--densemarks-weights", help="DenseMarks model.safetensors (CC BY-NC 4.0 weights)")
    p.add_argument("--densemarks-cache", help="folder for cached DenseMarks predictions")
    p.add_argument("--no-video", action="store_true", help="skip the overlay video")
    p.add_argument("--save-meshes", action="store_true", help="write per-frame meshes (.obj)")
    p.add_argument("--no-cache", action="store_true", help="re-run landmark detection even if cached")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def overrides_from_args(args: argparse.Namespace) -> dict:
    """Nested config overrides for the flags that were given."""
    flags = {
        ("flame", "path"): args.flame, ("flame", "assets_dir"): args.flame_assets, ("output", "dir"): args.out,
        ("detect", "landmarks"): args.landmarks, ("detect", "mediapipe_model"): args.mediapipe_model,
        ("device",): args.device, ("video", "start"): args.start, ("video", "max_frames"): args.max_frames,
        ("video", "stride"): args.stride, ("camera", "focal"): args.focal, ("seed",): args.seed,
        ("fit", "global_iters"): args.global_iters,
        ("photometric", "enabled"): None if args.photometric is None else args.photometric == "on",
        ("densemarks", "mode"): args.densemarks, ("densemarks", "weights"): args.densemarks_weights,
        ("densemarks", "cache_dir"): args.densemarks_cache,
        ("output", "video"): False if args.no_video else None,
        ("output", "save_meshes"): True if args.save_meshes else None,
        ("detect", "cache"): False if args.no_cache else None,
    }
    overrides: dict = {}
    for keys, value in flags.items():
        if value is None:
            continue
        node = overrides
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return overrides


def print_summary(summary) -> None:
    spf = summary.seconds_per_frame
    print(f"\nframes: {summary.frames} ({summary.valid_frames} tracked, "
          f"{summary.frames - summary.valid_frames} without a face"
          + (f": {summary.invalid_frame_indices[:10]}{' ...' if len(summary.invalid_frame_indices) > 10 else ''}"
             if summary.invalid_frame_indices else "") + ")")
    print(f"landmark error: mean {summary.lmk_error_px_mean:.2f} px, p95 {summary.lmk_error_px_p95:.2f} px; "
          f"focal {summary.focal_px:.0f} px; re-initialised frames: {summary.reinitialised_frames}")
    dense, photometric = summary.stages["densemarks"], summary.stages["photometric"]
    dense_state = f"on ({dense['predictor']})" if dense["ran"] else f"off: {dense['reason']}"
    print(f"DenseMarks: {dense_state}; photometric stage: "
          f"{'on' if photometric['ran'] else 'off: ' + photometric['reason']}")
    print("time per frame: " + ", ".join(f"{k} {v:.3f} s" for k, v in spf.items()))
    for name, path in summary.outputs.items():
        print(f"{name}: {path}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, overrides_from_args(args))
        from tracker.pipeline import track_video  # heavy imports only after the arguments are valid

        summary = track_video(args.video, cfg, show_progress=not args.quiet)
    except TrackerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: finished frames were written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: finished frames are on disk; keep the message short
        if os.environ.get("TRACKER_DEBUG"):
            traceback.print_exc()
        print(f"error: unexpected {type(exc).__name__}: {exc} (finished frames were written; "
              "set TRACKER_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
