"""The speed report: every ratio the project targets, measured in one run on one machine, as one table.

Rows (all wall-clock seconds; "per frame" = divided by the frames tracked):
- detector alone: decoding + MediaPipe on the clip, nothing else running;
- landmark mode end to end: `track_video` with the default configuration, image stages off, detection not cached,
  from the start of the call to the summary, overlay video excluded (it is its own row); on longer clips too (the
  memory runs), where the one-off identity fit on keyframes weighs less;
- landmark stage vs DenseMarks stage: one run on the synthetic sequence with oracle predictions (the network is
  timed on its own); the landmark stage is everything before the dense stage;
- photometric stage against the landmark stage of the same run;
- the DenseMarks network at 512 x 512: eager PyTorch fp32 against the OpenVINO path (and the opt-in bf16);
- the rasteriser (forward + backward at 512 x 512);
- peak resident memory of landmark mode for two frame counts (each run in its own process).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from eval.bench.machine import machine_description
from eval.bench.memory import bench_memory, landmark_config
from eval.bench.network import bench_network
from eval.bench.render import bench as bench_render
from eval.real.videos import REFERENCE_VIDEO
from eval.report import markdown_table
from eval.synthetic.generate import generate_sequence, load_assets
from eval.synthetic.suite import QUICK_SUITE
from tracker.config import update_dataclass
from tracker.detect.base import make_detector
from tracker.detect.sequence import detect_frames
from tracker.io.video import FrameSelection, read_frames
from tracker.pipeline import track_video

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class SuiteOptions:
    landmark_frames: int = 100
    """Frames of the clip timed in landmark mode (and by the detector alone)."""
    dense_frames: int = 36
    """Frames of the synthetic sequence timed with the DenseMarks stage (oracle predictions)."""
    photometric_frames: int = 20
    """Frames of the clip timed with the photometric stage."""
    memory_frames: tuple[int, ...] = (100, 1000)
    """Frame counts whose peak memory is measured (a looped clip)."""
    network_runs: int = 3
    """Forwards of the DenseMarks network per path (median)."""
    render_runs: int = 20
    video: Path = REFERENCE_VIDEO

    @classmethod
    def quick(cls) -> SuiteOptions:
        return cls(landmark_frames=30, dense_frames=12, photometric_frames=6, memory_frames=(20, 200),
                   network_runs=1, render_runs=5)


def detector_seconds_per_frame(video: Path, frames: int) -> float:
    """Decoding + MediaPipe detection (with the tracked face box) alone, per frame."""
    detector = make_detector("mediapipe")
    try:
        start = time.perf_counter()
        track = detect_frames(read_frames(video, FrameSelection(max_frames=frames)), detector)
        return (time.perf_counter() - start) / len(track)
    finally:
        detector.close()


def timed_run(video: Path, frames: int, out: Path, video_output: bool = False, **overrides) -> dict:
    """Summary (as a dict) of a landmark-mode run with extra config overrides."""
    cfg = landmark_config(frames, out, video_output)
    update_dataclass(cfg, overrides)
    summary = track_video(video, cfg, show_progress=False)
    return {"seconds": summary.seconds, "total": summary.seconds_per_frame["total"] * summary.frames,
            "frames": summary.frames, "stages": summary.stages}


def run_suite(options: SuiteOptions) -> dict:
    """All measurements, in one process (the memory runs in their own), in a fixed order."""
    data: dict = {"machine": machine_description(), "load_average_start": os.getloadavg(),
                  "options": {k: str(v) for k, v in options.__dict__.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        data["detector_s"] = detector_seconds_per_frame(options.video, options.landmark_frames)
        run = timed_run(options.video, options.landmark_frames, out / "landmarks", video_output=True)
        T = run["frames"]
        data["landmarks"] = {"e2e_s": (run["total"] - run["seconds"]["outputs"]) / T,
                             "overlay_s": run["seconds"]["outputs"] / T,
                             **{f"{k}_s": v / T for k, v in run["seconds"].items() if k != "outputs"}}

        cache = REPO / "eval" / "results" / "cache"
        sequence = generate_sequence(QUICK_SUITE[0], load_assets(cache), cache / "synthetic")
        run = timed_run(sequence.video, options.dense_frames, out / "dense",
                        densemarks={"mode": "on", "oracle": True, "oracle_ground_truth": str(sequence.ground_truth)})
        if not run["stages"]["densemarks"]["ran"]:
            raise RuntimeError(f"the DenseMarks stage did not run: {run['stages']['densemarks']['reason']}")
        dense = run["seconds"]["densemarks"]
        data["dense"] = {"frames": run["frames"], "dense_s": dense / run["frames"],
                         "landmark_stage_s": (run["total"] - dense - run["seconds"]["outputs"]) / run["frames"]}

        run = timed_run(options.video, options.photometric_frames, out / "photometric", photometric={"enabled": True})
        photometric = run["seconds"]["photometric"]
        data["photometric"] = {"frames": run["frames"], "photometric_s": photometric / run["frames"],
                               "landmark_stage_s": (run["total"] - photometric - run["seconds"]["outputs"])
                               / run["frames"]}

    data["network"] = bench_network(512, options.network_runs)
    import torch

    data["render_ms"] = bench_render(torch.device("cpu"), 512, options.render_runs)
    data["memory"] = bench_memory(options.memory_frames, options.video)
    data["load_average_end"] = os.getloadavg()
    return data


def report(data: dict, options: SuiteOptions) -> str:
    """The one table (markdown) with the machine and the load it ran under."""
    lm, dense, photo, net, mem = data["landmarks"], data["dense"], data["photometric"], data["network"], data["memory"]
    clip, n = options.video.name, options.landmark_frames
    rows = [
        [f"detector alone (decode + MediaPipe), {clip}, {n} frames", f"{data['detector_s']:.3f} s/frame", "", ""],
        ["landmark mode end to end (default config, no overlay video)", f"{lm['e2e_s']:.3f} s/frame",
         f"{lm['e2e_s'] / data['detector_s']:.2f}x detector", "<= 1.5x"],
        ["  of which: detection busy / identity / fitting (overlapping)",
         f"{lm['detection_s']:.3f} / {lm['identity_s']:.3f} / {lm['fitting_s']:.3f}", "", ""],
        *[[f"landmark mode end to end, {run['frames']} frames (looped clip: the memory run)",
           f"{run['s_per_frame']:.3f} s/frame", f"{run['s_per_frame'] / data['detector_s']:.2f}x detector", "<= 1.5x"]
          for run in mem if run["frames"] > n],
        ["overlay video (render + encode)", f"{lm['overlay_s']:.3f} s/frame", "", ""],
        [f"landmark stage, synthetic sequence, {dense['frames']} frames", f"{dense['landmark_stage_s']:.3f} s/frame",
         "", ""],
        ["DenseMarks stage (oracle predictions), same run", f"{dense['dense_s']:.3f} s/frame",
         f"{dense['dense_s'] / dense['landmark_stage_s']:.1f}x landmark stage", "<= 3x"],
        [f"photometric stage, {clip}, {photo['frames']} frames", f"{photo['photometric_s']:.3f} s/frame",
         f"{photo['photometric_s'] / photo['landmark_stage_s']:.1f}x landmark stage", ""],
        ["DenseMarks network 512x512, eager fp32", f"{net['eager_s']:.2f} s", "", ""],
        ["DenseMarks network 512x512, OpenVINO fp32", f"{net['openvino_s']:.2f} s",
         f"{net['speedup']:.2f}x faster, max diff {net['max_abs_diff']:.0e}", ">= 2.5x, <= 1e-4"],
    ]
    if "openvino_bf16_s" in net:
        rows.append(["DenseMarks network 512x512, OpenVINO bf16 (opt-in)", f"{net['openvino_bf16_s']:.2f} s",
                     f"{net['bf16_speedup']:.2f}x faster, max diff {net['bf16_max_abs_diff']:.0e}", ""])
    rows.append(["rasterise + interpolate, forward + backward, 512x512",
                 f"{data['render_ms']['rasterise + interpolate fwd+bwd']:.0f} ms", "", ""])
    for run in mem:
        rows.append([f"peak memory, landmark mode, {run['frames']} frames (looped clip)",
                     f"{run['peak_rss_mb']:.0f} MB", f"{run['peak_rss_mb'] / mem[0]['peak_rss_mb']:.2f}x "
                     f"{mem[0]['frames']} frames" if run is not mem[0] else "", "flat" if run is not mem[0] else ""])
    table = markdown_table(["measure", "time / memory", "ratio", "target"], rows)
    start, end = data["load_average_start"], data["load_average_end"]
    return (f"# Speed benchmark\n\nMachine: {data['machine']}\n\nLoad average (1/5/15 min) at start "
            f"{start[0]:.1f}/{start[1]:.1f}/{start[2]:.1f}, at end {end[0]:.1f}/{end[1]:.1f}/{end[2]:.1f}; ratios "
            f"compare runs of the same bench, a busy machine slows all of them.\n\n{table}\n")
