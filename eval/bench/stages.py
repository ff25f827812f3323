"""Seconds per frame of each stage of the tracker, per configuration, median over repeated runs.

Stages: `decode` (reading the frames alone, timed here), the stages the tracker reports in its summary
(`detection` (which includes decoding), `identity` (once per video, divided by the frames), `fitting`, and
any later stage such as DenseMarks or photometric when a configuration runs it), and `render` (drawing the
tracked mesh over every frame, what the overlay video costs, timed here). Detection caching is off, so every
run detects.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from eval.ablation import AblationConfig, RunResult, run_config
from eval.bench.machine import machine_name
from eval.report import markdown_table, mesh_overlay
from eval.tracked import load_tracked
from tracker.config import FlameConfig
from tracker.detect.base import SCHEME_IBUG68
from tracker.flame.assets import load_flame_bundle
from tracker.flame.model import FlameModel
from tracker.io.video import FrameSelection, read_frames


@dataclass(frozen=True)
class BenchOptions:
    frames: int = 20
    """Frames tracked per run (from the start of the clip)."""
    runs: int = 3
    device: str = "cpu"


def decode_seconds_per_frame(video: Path, selection: FrameSelection) -> float:
    start = time.perf_counter()
    count = sum(1 for _ in read_frames(video, selection))
    return (time.perf_counter() - start) / max(count, 1)


@torch.no_grad()
def render_seconds_per_frame(run: RunResult, video: Path, selection: FrameSelection, model: FlameModel) -> float:
    """Time of drawing the tracked mesh over each frame (rasterise, shade, blend)."""
    tracked = load_tracked(run.params_path, model.n_shape, model.n_expr)
    vertices = tracked.vertices(model)
    frames = [f.rgb for f in read_frames(video, selection)]
    start = time.perf_counter()
    for verts, frame in zip(vertices, frames, strict=False):
        mesh_overlay(frame, verts, model.faces, tracked.camera, None, "")
    return (time.perf_counter() - start) / max(len(frames), 1)


def bench_config(config: AblationConfig, base: dict, video: Path, options: BenchOptions, out_root: Path,
                 model: FlameModel, placeholders: dict[str, str] | None = None) -> dict:
    """{'runs': [stage -> s/frame per run], 'median_s_per_frame': stage -> median} or {'skipped': reason}.
    placeholders: values for the config's "{...}" strings (a synthetic video's ground truth)."""
    selection = FrameSelection(max_frames=options.frames)
    overrides = {"device": options.device, "video": {"max_frames": options.frames}, "detect": {"cache": False}}
    runs = []
    for index in range(options.runs):
        decode = decode_seconds_per_frame(video, selection)
        result = run_config(config, base, video, out_root / f"run{index}", overrides, placeholders,
                            trace_memory=False)
        if result.skipped is not None:
            return {"skipped": result.skipped}
        stages = {k: v for k, v in result.summary["seconds_per_frame"].items() if k not in ("total", "outputs")}
        runs.append({"decode": decode, **stages, "render": render_seconds_per_frame(result, video, selection, model)})
    median = {stage: statistics.median(r[stage] for r in runs) for stage in runs[0]}
    return {"runs": runs, "median_s_per_frame": median}


def run_bench(configs: list[AblationConfig], base: dict, video: Path, options: BenchOptions, out_dir: Path,
              synthetic: tuple[Path, Path] | None = None) -> dict:
    """Benchmark every config; writes bench.json and bench.md into out_dir and returns the JSON data.
    synthetic: (video, ground truth) of a synthetic sequence, on which synthetic_only configs (oracles) are
    timed; without it they are skipped."""
    out_dir.mkdir(parents=True, exist_ok=True)
    defaults = FlameConfig()
    model = load_flame_bundle(None, None, defaults.n_shape, defaults.n_expr, SCHEME_IBUG68).model
    results, skipped = {}, {}
    for config in configs:
        if config.synthetic_only and synthetic is None:
            skipped[config.name] = "needs a synthetic sequence (its ground truth feeds the oracle)"
            continue
        clip, placeholders = (synthetic[0], {"ground_truth": str(synthetic[1])}) if config.synthetic_only else (video, {})
        outcome = bench_config(config, base, clip, options, out_dir / "runs" / config.name, model, placeholders)
        if "video" not in outcome and clip != video:
            outcome["video"] = str(clip)
        if "skipped" in outcome:
            skipped[config.name] = outcome["skipped"]
        else:
            results[config.name] = outcome
    data = {"machine": machine_name(options.device), "device": options.device, "video": str(video),
            "frames": options.frames, "runs": options.runs, "configs": results, "skipped": skipped}
    (out_dir / "bench.json").write_text(json.dumps(data, indent=1))
    stages = sorted({s for c in results.values() for s in c["median_s_per_frame"]})
    table = markdown_table(["config", *stages, "sum"], [
        [name, *[c["median_s_per_frame"].get(s, float("nan")) for s in stages],
         sum(v for k, v in c["median_s_per_frame"].items() if k != "decode")] for name, c in results.items()])
    notes = "\n".join([f"- {name} ran on {c['video']} (synthetic)" for name, c in results.items() if "video" in c]
                      + [f"- {name} skipped: {why}" for name, why in skipped.items()])
    (out_dir / "bench.md").write_text(
        f"# Speed benchmark\n\nMachine: {data['machine']}\n\nVideo: {video}, first {options.frames} frames, "
        f"median of {options.runs} runs, seconds per frame (`detection` includes decoding; `sum` leaves "
        f"`decode` out for that reason).\n\n{table}\n\n{notes}\n")
    return data
