"""Typed configuration: YAML files, overrides, refusal of unknown keys and bad values."""

import dataclasses

import pytest

from tracker.config import CONFIG_DIR, TrackerConfig, load_config
from tracker.errors import TrackerError


def test_every_config_field_is_documented():
    """Each field carries a one-line docstring (attribute docstrings, as in VHAP's configs)."""
    import ast
    import inspect

    import tracker.config as config_module
    import tracker.energy.dense as dense
    import tracker.energy.landmarks as landmarks
    import tracker.energy.photometric as photometric
    import tracker.energy.priors as priors
    import tracker.energy.temporal as temporal

    for module in (config_module, dense, landmarks, photometric, priors, temporal):
        tree = ast.parse(inspect.getsource(module))
        for cls in [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Config")]:
            body = cls.body
            for i, node in enumerate(body):
                if isinstance(node, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    documented = isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                    assert documented, f"{module.__name__}.{cls.name}.{node.target.id} has no docstring"


def test_yaml_files_load_and_default_matches_dataclasses():
    """Tracker configs load; ablation files (lists of named override sets) hold only valid overrides."""
    import yaml

    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if path.name.startswith("ablation_"):
            for entry in data["configs"]:
                load_config(overrides=data.get("base", {}))
                load_config(overrides=entry["overrides"])
        else:
            load_config(path)
    assert dataclasses.asdict(load_config("default.yaml")) == dataclasses.asdict(TrackerConfig())


def test_overrides_and_types(tmp_path):
    cfg = load_config(overrides={"fit": {"frame_iters": 7}, "camera": {"focal": 800}})
    assert cfg.fit.frame_iters == 7 and cfg.camera.focal == 800.0 and isinstance(cfg.camera.focal, float)
    with pytest.raises(TrackerError, match="fit.frame_iters must be int"):
        load_config(overrides={"fit": {"frame_iters": "many"}})
    with pytest.raises(TrackerError, match="unknown config key 'energy.landmark'"):
        load_config(overrides={"energy": {"landmark": {}}})
    with pytest.raises(TrackerError, match="must be a mapping"):
        load_config(overrides={"fit": 3})


@pytest.mark.parametrize("overrides,message", [
    ({"video": {"stride": 0}}, "stride"),
    ({"camera": {"focal": -5.0}}, "focal"),
    ({"fit": {"reinit_factor": 0.5}}, "reinit_factor"),
    ({"detect": {"landmarks": "eyes"}}, "landmarks"),
    ({"energy": {"priors": {"weight": -1}}}, "priors.weight"),
    ({"densemarks": {"mode": "maybe"}}, "densemarks.mode"),
    ({"photometric": {"appearance_refine_iters": -1}}, "appearance_refine_iters"),
    ({"photometric": {"appearance_lr": 0.0}}, "photometric.appearance_lr must be > 0"),
    ({"photometric": {"guard": {"max_rejected": 1.5}}}, "photometric.guard.max_rejected must be >= 0 and <= 1"),
    ({"bridge": {"max_gap": -1}}, "bridge.max_gap must be >= 0"),
    ({"photometric": {"crop_margin": -0.1}}, "crop_margin"),
    ({"densemarks": {"map_rounds": -1}}, "map_rounds"),
    ({"densemarks": {"oracle_noise": "noisy"}}, "oracle_noise"),
    ({"densemarks": {"temporal_weight": -0.1}}, "temporal_weight"),
    ({"densemarks": {"samples": 0}}, "samples"),
    ({"guard": {"max_failed_fraction": 1.5}}, "max_failed_fraction"),
])
def test_out_of_range_values(overrides, message):
    with pytest.raises(TrackerError, match=message):
        load_config(overrides=overrides)


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("fit: [unclosed\n")
    with pytest.raises(TrackerError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(TrackerError, match="not found"):
        load_config(tmp_path / "nope.yaml")
