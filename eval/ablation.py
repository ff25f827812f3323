"""Tracker configurations compared side by side: a YAML list of named override sets, run on each video.

The list (configs/ablation_default.yaml documents the format) is data: a new configuration needs a YAML entry,
no code. A configuration is skipped, with its reason printed, when the tracker rejects its keys, fails with a
user-facing error (e.g. missing weights), or did not run the stage the entry says it needs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eval.metrics import track_peak_memory
from tracker.config import CONFIG_DIR, load_config, read_yaml
from tracker.errors import TrackerError
from tracker.pipeline import track_video

DEFAULT_ABLATION = CONFIG_DIR / "ablation_default.yaml"


@dataclass(frozen=True)
class AblationConfig:
    """One row of the comparison (see configs/ablation_default.yaml)."""

    name: str
    overrides: dict = field(default_factory=dict)
    description: str = ""
    requires_stage: str | None = None
    synthetic_only: bool = False
    quick: bool = False


@dataclass(frozen=True)
class Ablation:
    base: dict
    configs: tuple[AblationConfig, ...]

    def select(self, names: list[str] | None, quick: bool) -> tuple[AblationConfig, ...]:
        """The named configs (in the given order), else the quick ones (quick runs) or all."""
        if names:
            by_name = {c.name: c for c in self.configs}
            unknown = [n for n in names if n not in by_name]
            if unknown:
                raise TrackerError(f"unknown ablation config(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
            return tuple(by_name[n] for n in names)
        return tuple(c for c in self.configs if c.quick or not quick)


def load_ablation(path: str | Path = DEFAULT_ABLATION) -> Ablation:
    """Read an ablation YAML: {base: overrides, configs: [{name, overrides, ...}, ...]}."""
    path, data = read_yaml(path, "ablation file")
    if not isinstance(data, dict):
        raise TrackerError(f"ablation file {path} must be a mapping with `base:` and `configs:`")
    entries = data.get("configs")
    if not isinstance(entries, list) or not entries:
        raise TrackerError(f"ablation file {path} needs a non-empty `configs:` list")
    try:
        configs = tuple(AblationConfig(**{**entry, "overrides": entry.get("overrides") or {}}) for entry in entries)
    except TypeError as error:
        raise TrackerError(f"ablation file {path}: bad config entry ({error})") from None
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise TrackerError(f"ablation file {path}: config names must be unique, got {names}")
    return Ablation(data.get("base") or {}, configs)


def parse_override(text: str) -> dict:
    """'fit.keyframes=12' -> {'fit': {'keyframes': 12}} (the value read as YAML)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise TrackerError(f"override {text!r} is not KEY=VALUE (e.g. energy.priors.weight=1.0)")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        raise TrackerError(f"override {text!r}: the value is not valid YAML") from None
    nested: dict = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = parsed
    return nested


def merge(base: dict, update: dict) -> dict:
    """Nested dict `base` with `update` applied on top (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class RunResult:
    """One tracker run of one config on one video (or why it did not happen)."""

    config: str
    video: Path
    out_dir: Path | None = None
    summary: dict[str, Any] | None = None
    skipped: str | None = None
    python_heap_mb: float = float("nan")
    cuda_mb: float | None = None

    @property
    def params_path(self) -> Path:
        assert self.out_dir is not None
        return self.out_dir / "flame_params.npz"


def substitute(values: Any, placeholders: dict[str, str], where: str) -> Any:
    """`values` with "{name}" placeholders in its strings replaced (e.g. {ground_truth}: the synthetic
    sequence's ground-truth file); an unknown or unavailable placeholder is a TrackerError."""
    if isinstance(values, dict):
        return {k: substitute(v, placeholders, where) for k, v in values.items()}
    if isinstance(values, str) and "{" in values:
        try:
            return values.format(**placeholders)
        except KeyError as error:
            raise TrackerError(f"{where}: placeholder {error} is not available here (known: "
                               f"{', '.join(placeholders) or 'none'}); mark configs that need ground truth "
                               "synthetic_only") from None
    return values


def run_config(config: AblationConfig, base: dict, video: Path, out_root: Path, overrides: dict | None = None,
               placeholders: dict[str, str] | None = None, trace_memory: bool = True) -> RunResult:
    """Track `video` with base + config + overrides, writing to <out_root>/<config>/<video stem>/.

    placeholders: values for "{name}" strings in the config's overrides (see `substitute`).
    trace_memory: measure the peak Python heap (tracemalloc slows Python-heavy code: off for timing runs).
    """
    try:
        own = substitute(config.overrides, placeholders or {}, f"ablation config {config.name}")
        values = merge(merge(merge(base, own), overrides or {}), {"output": {"dir": str(out_root / config.name)}})
        cfg = load_config(None, values)
        if trace_memory:
            with track_peak_memory(cfg.device) as peak:
                summary = track_video(video, cfg, show_progress=False)
        else:
            summary = track_video(video, cfg, show_progress=False)
    except TrackerError as error:
        return RunResult(config.name, video, skipped=str(error))
    result = RunResult(config.name, video, Path(summary.out_dir), summary.__dict__)
    if trace_memory:
        result.python_heap_mb, result.cuda_mb = peak.python_heap_mb, peak.cuda_mb
    if config.requires_stage:
        ran, reason = stage_ran(summary.__dict__, config.requires_stage)
        if not ran:
            result.skipped = f"the tracker did not run its '{config.requires_stage}' stage ({reason})"
    return result


def stage_ran(summary: dict[str, Any], stage: str) -> tuple[bool, str]:
    """Whether a run's refinement stage ran, from the summary's `stages` ({name: {ran, reason}}); and why not."""
    status = summary["stages"].get(stage)
    if status is None:
        return False, f"the tracker has no '{stage}' stage (stages: {', '.join(summary['stages'])})"
    return bool(status["ran"]), str(status.get("reason") or "no reason given")

