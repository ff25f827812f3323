"""Command line: `python -m tracker.run VIDEO [options]` (or `flame-tracker VIDEO`) tracks a video and writes
FLAME parameters. A thin layer over `tracker.track` (tracker/api.py): flags become config overrides.

Only argparse, yaml and the tracker's light modules are imported until the arguments are parsed, so `--help`
and `--version` answer without loading torch; the defaults shown in `--help` are read from the shipped
configs/default.yaml, which a test keeps equal to the dataclass defaults.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

import tracker
from tracker.errors import EXIT_BAD_INPUT, EXIT_OK, interrupt_on_signals, report_failure
from tracker.resources import configs_dir

EPILOG = """FLAME is looked up in this order: --flame, $FLAME_MODEL, flame_assets/, then the shipped open default
model (not the official FLAME; see flame_assets/README.md).
Outputs go to OUT/<video stem>/: flame_params.npz, summary.json, report.png, overlay.mp4, meshes/ (README.md).
Defaults shown are the config's (configs/default.yaml); --config FILE and then the flags override them.
Exit codes: 0 ok, 1 bad input, 2 usage, 3 missing model/asset, 4 internal error, 128+N signal N."""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one config key."""

    option: str
    keys: tuple[str, ...]
    """Path of the config key it sets, e.g. ("video", "max_frames")."""
    help: str
    kwargs: dict = field(default_factory=dict)
    """Further add_argument arguments (type, choices, action)."""
    to_config: Callable[[Any], Any] | None = None
    """Value given -> config value (default: unchanged)."""
    show_default: Callable[[Any], str] | None = None
    """Config default -> how --help shows it (default: the value itself; None values are not shown)."""

    @property
    def dest(self) -> str:
        return self.option.lstrip("-").replace("-", "_")


def _on_off(value: bool) -> str:
    return "on" if value else "off"


FLAGS = (
    Flag("--flame", ("flame", "path"), "FLAME model file (FLAME 2020/2023/2023 Open .pkl, or .npz; "
         "default: the shipped open model)"),
    Flag("--flame-assets", ("flame", "assets_dir"), "folder with landmark embeddings, FLAME_masks, eyelids "
         "(default: $TRACKER_FLAME_ASSETS, else the FLAME file's folder, else flame_assets/)"),
    Flag("--out", ("output", "dir"), "output root"),
    Flag("--landmarks", ("detect", "landmarks"), "landmark detector", {"choices": ["mediapipe", "dlib", "fan"]}),
    Flag("--mediapipe-model", ("detect", "mediapipe_model"), "MediaPipe face_landmarker .task file (default: "
         "$TRACKER_MEDIAPIPE_MODEL, else the one in flame_assets/)"),
    Flag("--device", ("device",), "torch device: cpu, cuda, cuda:N"),
    Flag("--start", ("video", "start"), "first frame index", {"type": int}),
    Flag("--max-frames", ("video", "max_frames"), "track at most N frames (default: all)", {"type": int}),
    Flag("--stride", ("video", "stride"), "track every N-th frame", {"type": int}),
    Flag("--stream", ("video", "stream"), "video stream to track, counted from 0 (default: the main one)",
         {"type": int}),
    Flag("--focal", ("camera", "focal"), "fixed focal length in pixels (default: estimated)", {"type": float}),
    Flag("--photometric", ("photometric", "enabled"), "photometric stage", {"choices": ["on", "off"]},
         to_config=lambda v: v == "on", show_default=_on_off),
    Flag("--densemarks", ("densemarks", "mode"), "DenseMarks stage (auto: when the weights are found)",
         {"choices": ["auto", "on", "off"]}),
    Flag("--densemarks-weights", ("densemarks", "weights"), "DenseMarks model.safetensors (CC BY-NC 4.0 weights)"),
    Flag("--densemarks-cache", ("densemarks", "cache_dir"), "folder for cached DenseMarks predictions "
         "(default: next to the outputs)"),
    Flag("--no-video", ("output", "video"), "skip the overlay video", {"action": "store_true"},
         to_config=lambda v: False if v else None, show_default=lambda v: "write it" if v else "skip it"),
    Flag("--save-meshes", ("output", "save_meshes"), "write per-frame meshes (.obj)", {"action": "store_true"},
         to_config=lambda v: True if v else None, show_default=_on_off),
    Flag("--no-report", ("output", "report"), "skip report.png", {"action": "store_true"},
         to_config=lambda v: False if v else None, show_default=lambda v: "write it" if v else "skip it"),
    Flag("--no-cache", ("detect", "cache"), "re-run landmark detection even if cached", {"action": "store_true"},
         to_config=lambda v: False if v else None, show_default=lambda v: "use the cache" if v else "no cache"),
    Flag("--seed", ("seed",), "random seed", {"type": int}),
)


def shipped_defaults() -> dict:
    """configs/default.yaml as a nested dict ({} when it cannot be read): the defaults --help shows."""
    try:
        return yaml.safe_load((configs_dir() / "default.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _lookup(tree: dict, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tracker.run", description="Track a FLAME head in a video.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", nargs="?", help="input video (mp4, mov, mkv, avi, ...)")
    p.add_argument("--config", help="YAML config: a file, or a name in configs/ (e.g. default.yaml)")
    defaults = shipped_defaults()
    for flag in FLAGS:
        default = _lookup(defaults, flag.keys)
        shown = (flag.show_default or str)(default) if default is not None else None
        p.add_argument(flag.option, dest=flag.dest, help=flag.help + (f" (default: {shown})" if shown else ""),
                       **flag.kwargs)
    p.add_argument("--print-config", action="store_true",
                   help="print the full resolved config (defaults, --config, flags) as YAML and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log stage timings (-v) or debug output (-vv)")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="logging level (default: WARNING; -v sets INFO)")
    p.add_argument("--version", action="version", version=f"tracker {tracker.__version__}")
    return p


def overrides_from_args(args: argparse.Namespace) -> dict:
    """Nested config overrides for the flags that were given."""
    overrides: dict = {}
    for flag in FLAGS:
        value = getattr(args, flag.dest)
        if value is not None and flag.to_config is not None:
            value = flag.to_config(value)
        if value is None:
            continue
        node = overrides
        for key in flag.keys[:-1]:
            node = node.setdefault(key, {})
        node[flag.keys[-1]] = value
    return overrides


def configure_logging(args: argparse.Namespace) -> None:
    """The tracker's log level from --log-level, else -v (INFO) / -vv (DEBUG), else WARNING; to stderr.
    Other libraries keep their own levels."""
    level = args.log_level or ("DEBUG" if args.verbose >= 2 else "INFO" if args.verbose else "WARNING")
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")  # a stderr handler, unless one is set up
    logging.getLogger("tracker").setLevel(getattr(logging, level))


def print_summary(summary: dict) -> None:
    spf, invalid = summary["seconds_per_frame"], summary["invalid_frame_indices"]
    print(f"\nframes: {summary['frames']} ({summary['valid_frames']} tracked, "
          f"{summary['frames'] - summary['valid_frames']} without a face"
          + (f": {invalid[:10]}{' ...' if len(invalid) > 10 else ''}" if invalid else "") + ")")
    print(f"landmark error: mean {summary['lmk_error_px_mean']:.2f} px, p95 {summary['lmk_error_px_p95']:.2f} px; "
          f"focal {summary['focal_px']:.0f} px ({summary.get('focal', {}).get('source', 'estimated')}); "
          f"re-initialised frames: {summary['reinitialised_frames']}")
    dense, photometric = summary["stages"]["densemarks"], summary["stages"]["photometric"]
    dense_state = f"on ({dense['predictor']})" if dense["ran"] else f"off: {dense['reason']}"
    print(f"DenseMarks: {dense_state}; photometric stage: "
          f"{'on' if photometric['ran'] else 'off: ' + photometric['reason']}")
    print("time per frame: " + ", ".join(f"{k} {v:.3f} s" for k, v in spf.items()))
    stream = summary.get("input", {})
    if stream.get("video_streams", 1) > 1 or stream.get("rotation_deg") or stream.get("frames_rescaled"):
        print(f"input: video stream {stream['stream']} of {stream['video_streams']}, {stream['width']}x"
              f"{stream['height']} as displayed (rotated {stream['rotation_deg']} degrees), "
              f"{stream['frames_rescaled']} frames rescaled to the first frame's size")
    for name, path in summary["outputs"].items():
        print(f"{name}: {path}")


def on_disk(exc: BaseException) -> str:
    """What a stopped run left on disk, as a clause ("no frames were written" when nothing)."""
    record = getattr(exc, "tracker_on_disk", None)
    return record.describe() if record is not None else "no frames were written"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args)
    if args.video is None and not args.print_config:
        parser.error("the following arguments are required: video")  # exits with argparse's usage code 2
    with interrupt_on_signals():  # SIGTERM and SIGHUP stop a run as Ctrl-C does
        try:
            from tracker.config import config_yaml, load_config  # heavy imports only after the arguments are valid

            cfg = load_config(args.config, overrides_from_args(args))
            if args.print_config:
                print(config_yaml(cfg), end="")
                return EXIT_OK
            from tracker.api import track_with_config

            result = track_with_config(args.video, cfg, show_progress=not args.quiet)
        except (Exception, KeyboardInterrupt) as exc:  # one line, no traceback, and what is on disk
            return report_failure(exc, kept=on_disk(exc))
    print_summary(result.summary)
    if not result.summary["complete"]:
        print(f"error: incomplete result: {result.summary['incomplete_reason']}; the {result.summary['frames']} "
              "selected frames before that point were tracked and written with complete: false", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
