"""The Python API behind `tracker.track` and `tracker.load` (and the CLI, tracker/run.py)."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

from tracker.config import TrackerConfig, load_config, update_dataclass, validate
from tracker.result import TrackingResult, load

log = logging.getLogger(__name__)


def nested_overrides(overrides: dict[str, Any]) -> dict:
    """Keyword overrides -> a nested config dict: `seed=1`, `video={"max_frames": 20}` or, equivalently,
    `video__max_frames=20` (double underscores separate the levels)."""
    nested: dict = {}
    for key, value in overrides.items():
        *sections, name = key.split("__")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        if isinstance(value, dict) and isinstance(node.get(name), dict):
            node[name].update(value)
        else:
            node[name] = value
    return nested


def resolve_config(config: str | os.PathLike | TrackerConfig | None, overrides: dict[str, Any]) -> TrackerConfig:
    """Defaults, then `config` (a YAML file, a name in configs/, or a TrackerConfig), then the overrides."""
    if isinstance(config, TrackerConfig):
        cfg = update_dataclass(copy.deepcopy(config), nested_overrides(overrides))
        validate(cfg)
        return cfg
    return load_config(config, nested_overrides(overrides))


def track(video: str | os.PathLike, config: str | os.PathLike | TrackerConfig | None = None,
          show_progress: bool = True, **overrides: Any) -> TrackingResult:
    """Track a video and return its result (every output file is written too, under output.dir).

    Example: `tracker.track("clip.mp4", video__max_frames=100, output={"video": False})`.
    """
    return track_with_config(video, resolve_config(config, overrides), show_progress)


def track_with_config(video: str | os.PathLike, cfg: TrackerConfig, show_progress: bool = True) -> TrackingResult:
    """Track a video with a complete config; the result carries the run's summary."""
    from tracker.pipeline import track_video  # torch and the detectors load here, not on `import tracker`

    summary = track_video(Path(video), cfg, show_progress=show_progress)
    log.info("outputs in %s", summary.out_dir)
    result = load(summary.outputs["params"])
    result.summary = summary.__dict__
    return result


__all__ = ["load", "resolve_config", "track", "track_with_config"]
