"""The hold-out benchmark: render the four hold-out sequences (cached), track each with the tracker's defaults or
a given config, and score the track beside its baselines (eval.baselines) on the same frames.

Outputs in the run folder: table.md (a table per sequence, the legend, the run's settings), table.json (every
row, the settings, per-sequence facts) and tracks/ (the tracker's outputs).
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval.ablation import AblationConfig, merge, run_config
from eval.baselines import RowScores, SequenceScorer, fit_exact_landmarks
from eval.bench.stages import machine_name
from eval.holdout.generate import HOLDOUT_VERSION, generate_holdout, load_holdout_assets
from eval.holdout.scenes import HoldoutSpec, holdout_suite
from eval.report import comparison_markdown
from eval.run import RESULTS, git_commit, log
from eval.synthetic.generate import load_ground_truth
from eval.tracked import load_tracked
from tracker.config import load_config, read_yaml
from tracker.errors import TrackerError


@dataclass
class HoldoutOptions:
    """What one hold-out run does."""

    quick: bool = False
    """7 frames per sequence instead of 120 (CI)."""
    config: str | None = None
    """Tracker config YAML (a path or a name in configs/); the tracker's defaults when None."""
    overrides: dict = field(default_factory=dict)
    """Tracker config keys applied after the config file."""
    sequences: list[str] | None = None
    """Names of the sequences to run (all when None)."""
    out: Path | None = None
    """Run folder; eval/results/holdout (or holdout_quick) when None."""
    cache_dir: Path = RESULTS / "holdout_cache"
    """Rendered sequences and face textures."""
    device: str = "cpu"

    def run_dir(self) -> Path:
        return self.out or RESULTS / ("holdout_quick" if self.quick else "holdout")

    def specs(self) -> tuple[HoldoutSpec, ...]:
        suite = holdout_suite(self.quick)
        if not self.sequences:
            return suite
        known = {s.name: s for s in suite}
        unknown = [n for n in self.sequences if n not in known]
        if unknown:
            raise TrackerError(f"unknown hold-out sequence(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return tuple(known[n] for n in self.sequences)

    def tracker_values(self) -> dict:
        """The tracker's config keys for every run (no overlay video)."""
        values = read_yaml(self.config)[1] if self.config else {}
        if not isinstance(values, dict):
            raise TrackerError(f"config file {self.config} must be a mapping of config keys")
        return merge(merge(values, self.overrides), {"device": self.device, "output": {"video": False}})


@dataclass
class SequenceResult:
    spec: HoldoutSpec
    rows: list[RowScores]
    facts: dict
    failure: str | None = None

    def title(self) -> str:
        f = self.facts
        return (f"{self.spec.name}: {f['frames']} frames, focal {f['truth_focal_px']:.0f} px, head "
                f"{f['distance_m']:.2f} m, yaw {f['yaw_min_deg']:.0f}..{f['yaw_max_deg']:.0f} deg" +
                (f" (tracker: {self.failure})" if self.failure else ""))


def run_sequence(spec: HoldoutSpec, options: HoldoutOptions, assets, values: dict) -> SequenceResult:
    run_dir = options.run_dir()
    sequence = generate_holdout(spec, assets, options.cache_dir / ("quick" if options.quick else "full"),
                                progress=True)
    gt = load_ground_truth(sequence.ground_truth)
    model, face_ids = assets.model, assets.synthetic.bundle.masks["face"]
    log(f"{spec.name}: tracking {gt.n_frames} frames")
    run = run_config(AblationConfig("tracker", values), {}, sequence.video, run_dir / "tracks", trace_memory=False)
    scorer = SequenceScorer(gt, model, face_ids)
    rows = []
    if run.skipped is None:
        rows.append(scorer.score("tracker", load_tracked(run.params_path, model.n_shape, model.n_expr)))
    log(f"{spec.name}: landmark stage on exact landmarks")
    rows += scorer.baseline_rows(fit_exact_landmarks(gt, load_config(None, values), show_progress=True))
    yaw = gt.yaw_deg
    summary = run.summary or {}
    facts = {"frames": gt.n_frames, "truth_focal_px": float(gt.camera.focal), "distance_m": spec.distance_m,
             "yaw_min_deg": float(yaw.min()), "yaw_max_deg": float(yaw.max()), "photo": spec.photo,
             "seconds_per_frame": summary.get("seconds_per_frame", {}).get("total", float("nan")),
             "tracker_flame_model": summary.get("flame_model", {})}
    return SequenceResult(spec, rows, facts, run.skipped)


def tracker_assets(results: list[SequenceResult]) -> str:
    """The head model and landmark embedding the tracker ran with (from its summaries): a shell that points
    FLAME_MODEL or TRACKER_FLAME_ASSETS elsewhere (as the tests do) measures other files than the shipped ones."""
    records = {json.dumps(r.facts["tracker_flame_model"], sort_keys=True) for r in results if r.facts["tracker_flame_model"]}
    if not records:
        return "unknown (no track)"
    if len(records) > 1:
        return "differs between sequences"
    record = json.loads(records.pop())
    files = ", ".join(f"{name} {digest[:12]}" for name, digest in record.get("landmark_embedding", {}).items())
    return (f"{record.get('name')} ({'shipped default' if record.get('shipped_default') else record.get('file')}), "
            f"side files {record.get('assets_dir')}: {files}")


def run_holdout(options: HoldoutOptions) -> Path:
    """Run the benchmark and write table.md / table.json; returns the run folder."""
    started = time.perf_counter()
    values = options.tracker_values()
    load_config(None, values)  # a bad key fails here, before anything is rendered
    specs = options.specs()
    run_dir = options.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    assets = load_holdout_assets(options.cache_dir)
    results = []
    for spec in specs:
        result = run_sequence(spec, options, assets, values)
        results.append(result)
        print(comparison_markdown({result.title(): result.rows}).split("\n\nMedians")[0] + "\n", flush=True)
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
        "machine": machine_name(options.device), "platform": platform.platform(), "quick": options.quick,
        "tracker config": options.config or "defaults",
        "overrides": json.dumps(options.overrides) if options.overrides else "none",
        "flame": str(assets.synthetic.bundle.flame_file), "holdout version": HOLDOUT_VERSION,
        "tracker's model and embedding": tracker_assets(results),
        "wall time (min)": round((time.perf_counter() - started) / 60, 1),
    }
    header = "# Hold-out benchmark\n\n" + "\n".join(f"- {k}: {v}" for k, v in info.items()) + "\n\n"
    (run_dir / "table.md").write_text(header + comparison_markdown({r.title(): r.rows for r in results}))
    (run_dir / "table.json").write_text(json.dumps({"run": info, "sequences": [
        {"name": r.spec.name, "spec": r.spec.to_dict(), "facts": r.facts, "tracker_failure": r.failure,
         "rows": [row.to_dict() for row in r.rows],
         "per_frame": {row.name: {k: np.asarray(v).tolist() for k, v in row.per_frame.items()} for row in r.rows}}
        for r in results]}, indent=1, default=float))
    log(f"done in {info['wall time (min)']} min: {run_dir / 'table.md'}")
    return run_dir
