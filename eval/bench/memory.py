"""Peak resident memory of landmark-mode tracking against the number of frames: each run in a process of its
own (peak RSS is per process), on a long clip made by looping a short one.

    python -m eval.bench.memory [--frames 100,1000] [--video V]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import av

from eval.real.videos import REFERENCE_VIDEO
from tracker.config import load_config
from tracker.io.video import probe_video, read_frames

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "eval" / "results" / "cache"


def looped_clip(source: Path, frames: int, out_dir: Path = CACHE) -> Path:
    """A clip of `frames` frames: `source` played again and again (encoded once, then reused)."""
    path = out_dir / f"{source.stem}_loop{frames}.mp4"
    if path.is_file() and probe_video(path).n_frames == frames:
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    info = probe_video(source)
    partial = path.with_name(path.stem + ".part.mp4")
    with av.open(str(partial), "w") as container:
        stream = container.add_stream("mpeg4", rate=round(info.fps))
        stream.width, stream.height, stream.pix_fmt, stream.bit_rate = info.width, info.height, "yuv420p", 4_000_000
        written = 0
        while written < frames:
            for frame in read_frames(source):
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame.rgb, format="rgb24")):
                    container.mux(packet)
                written += 1
                if written == frames:
                    break
        for packet in stream.encode():
            container.mux(packet)
    partial.replace(path)
    return path


def landmark_config(frames: int, out_dir: Path, video: bool = False):
    """The default configuration in landmark mode (no image stages, detection not cached)."""
    return load_config(overrides={"video": {"max_frames": frames}, "detect": {"cache": False},
                                  "densemarks": {"mode": "off"}, "photometric": {"enabled": False},
                                  "output": {"dir": str(out_dir), "video": video}})


def peak_rss_of_run(video: Path, frames: int) -> dict:
    """{"frames", "peak_rss_mb", "s_per_frame"} of a landmark-mode run in a fresh process."""
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-m", "eval.bench.memory", "--child", str(video), str(frames), out],
                              cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory run of {frames} frames failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(video: str, frames: int, out: str) -> None:
    from tracker.pipeline import track_video

    summary = track_video(video, landmark_config(frames, Path(out)), show_progress=False)
    print(json.dumps({"frames": summary.frames, "peak_rss_mb": peak_rss_mb(),
                      "s_per_frame": summary.seconds_per_frame["total"]}))


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries the latter over
    from the parent across fork + exec, so a child of a big process would report its parent's peak."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux and BSD


def bench_memory(counts: tuple[int, ...], source: Path = REFERENCE_VIDEO) -> list[dict]:
    clip = looped_clip(source, max(counts))
    return [peak_rss_of_run(clip, count) for count in counts]


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", default="100,1000", help="comma-separated frame counts")
    parser.add_argument("--video", type=Path, default=REFERENCE_VIDEO, help="clip to loop (default: %(default)s)")
    args = parser.parse_args()
    for run in bench_memory(tuple(int(n) for n in args.frames.split(",")), args.video):
        print(f"{run['frames']} frames: peak RSS {run['peak_rss_mb']:.0f} MB, {run['s_per_frame']:.3f} s/frame")


if __name__ == "__main__":
    main()
