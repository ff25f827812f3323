"""Command line: `python -m tracker.run VIDEO [options]` tracks a video and writes FLAME parameters."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback

from tracker.config import load_config
from tracker.errors import EXIT_OK, EXIT_USER_ERROR, Interrupted, TrackerError, interrupt_on_signals

EPILOG = """FLAME is looked up in this order: --flame, $FLAME_MODEL, flame_assets/ (see flame_assets/README.md).
Outputs go to OUT/<video stem>/: flame_params.npz, summary.json, overlay.mp4, meshes/ (see README.md)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tracker.run", description="Track a FLAME head in a video.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", help="input video (mp4, mov, mkv, avi, ...)")
    p.add_argument("--flame", help="FLAME model file (FLAME 2020/2023/2023 Open .pkl, or .npz)")
    p.add_argument("--flame-assets", help="folder with landmark embeddings, FLAME_masks.pkl, eyelids "
                                          "(default: $TRACKER_FLAME_ASSETS, else the FLAME file's folder)")
    p.add_argument("--out", help="output root (default: output/)")
    p.add_argument("--config", help="YAML config: a file, or a name in configs/ (e.g. default.yaml)")
    p.add_argument("--landmarks", choices=["mediapipe", "dlib", "fan"], help="landmark detector")
    p.add_argument("--mediapipe-model", help="MediaPipe face_landmarker .task file")
    p.add_argument("--device", help="torch device: cpu (default), cuda, cuda:N")
    p.add_argument("--start", type=int, help="first frame index")
    p.add_argument("--max-frames", type=int, help="track at most N frames")
    p.add_argument("--stride", type=int, help="track every N-th frame")
    p.add_argument("--stream", type=int, help="video stream to track, counted from 0 (default: the main one)")
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
        ("video", "stride"): args.stride, ("video", "stream"): args.stream, ("camera", "focal"): args.focal,
        ("seed",): args.seed,
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
    stream = summary.input
    if stream.get("video_streams", 1) > 1 or stream.get("rotation_deg") or stream.get("frames_rescaled"):
        print(f"input: video stream {stream['stream']} of {stream['video_streams']}, {stream['width']}x"
              f"{stream['height']} as displayed (rotated {stream['rotation_deg']} degrees), "
              f"{stream['frames_rescaled']} frames rescaled to the first frame's size")
    for name, path in summary.outputs.items():
        print(f"{name}: {path}")


def on_disk(exc: BaseException) -> str:
    """What a stopped run left on disk, as a clause ("no frames were written" when nothing)."""
    record = getattr(exc, "tracker_on_disk", None)
    return record.describe() if record is not None else "no frames were written"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with interrupt_on_signals():  # SIGTERM and SIGHUP stop a run as Ctrl-C does
        try:
            cfg = load_config(args.config, overrides_from_args(args))
            from tracker.pipeline import track_video  # heavy imports only after the arguments are valid

            summary = track_video(args.video, cfg, show_progress=not args.quiet)
        except TrackerError as exc:
            written = on_disk(exc)
            print(f"error: {exc}" + ("" if written.startswith("no ") else f" ({written})"), file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt as exc:
            name = exc.name if isinstance(exc, Interrupted) else "SIGINT"
            print(f"interrupted by {name}: {on_disk(exc)}", file=sys.stderr)
            return (exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)).exit_code
        except OSError as exc:  # the machine, not the tracker: a full disk, a file removed or locked
            where = f" {exc.filename}" if exc.filename else ""
            print(f"error: cannot access{where} ({exc.strerror or exc}); {on_disk(exc)}", file=sys.stderr)
            return EXIT_USER_ERROR
        except Exception as exc:  # a bug, not bad input; keep the message short and say what is on disk
            if os.environ.get("TRACKER_DEBUG"):
                traceback.print_exc()
            print(f"error: unexpected {type(exc).__name__} (a bug in the tracker): {str(exc)[:200]}; "
                  f"{on_disk(exc)}; set TRACKER_DEBUG=1 for the traceback", file=sys.stderr)
            return EXIT_USER_ERROR
    print_summary(summary)
    if not summary.complete:
        print(f"error: incomplete result: {summary.incomplete_reason}; the {summary.frames} selected frames before "
              "that point were tracked and written with complete: false", file=sys.stderr)
        return EXIT_USER_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
