"""Command-line and repository conventions: --help without torch, --version, logging, --print-config, a complete
default config, the exit-code table, plain `pytest`, the licence."""

import dataclasses
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tracker import errors
from tracker.run import FLAGS, build_parser, main


def test_help_and_version_do_not_import_torch():
    """--help lists flags with their config defaults and --version answers, without loading torch."""
    code = ("import sys\nfrom tracker.run import main\n"
            "for argv in (['--help'], ['--version']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.strip().endswith("NO-TORCH")
    import tracker

    assert f"tracker {tracker.__version__}" in out
    assert "--landmarks {mediapipe,dlib,fan}" in out and "(default: mediapipe)" in out
    assert "--photometric {on,off}" in out and "photometric stage (default: off)" in out
    assert "(default: output)" in out and "Exit codes:" in out


def test_every_flag_sets_a_real_config_key():
    from tracker.config import TrackerConfig

    defaults = dataclasses.asdict(TrackerConfig())
    for flag in FLAGS:
        node = defaults
        for key in flag.keys:
            assert key in node, f"{flag.option} -> {flag.keys}"
            node = node[key]


def test_print_config_round_trips(tmp_path, capsys):
    """--print-config prints every key, with --config and flags applied, as YAML that --config reads back."""
    from tracker.config import TrackerConfig, load_config

    base = tmp_path / "base.yaml"
    base.write_text("fit:\n  frame_iters: 9\n")
    assert main(["--print-config", "--config", str(base), "--max-frames", "7", "--landmarks", "dlib",
                 "--photometric", "on", "--no-video"]) == 0
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)
    assert set(data) == {f.name for f in dataclasses.fields(TrackerConfig)}
    assert data["fit"]["frame_iters"] == 9 and data["video"]["max_frames"] == 7
    assert data["detect"]["landmarks"] == "dlib" and data["photometric"]["enabled"] is True
    assert data["output"]["video"] is False
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    cfg = load_config(again)
    assert dataclasses.asdict(cfg) == data
    assert cfg != TrackerConfig()


def test_default_yaml_is_generated_and_complete():
    """configs/default.yaml is exactly what --print-config prints for the defaults (after its header)."""
    from tracker.config import TrackerConfig, config_yaml

    text = (REPO / "configs" / "default.yaml").read_text()
    body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    assert body == config_yaml(TrackerConfig()), "regenerate: python -m tracker.run --print-config"


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])  # no video
    assert exit_info.value.code == errors.EXIT_USAGE == 2
    assert "video" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["clip.mp4", "--landmarks", "eyes"])
    assert exit_info.value.code == 2


def test_verbose_sets_the_tracker_log_level(capsys):
    logger = logging.getLogger("tracker")
    before = logger.level
    try:
        assert main(["--print-config", "-v"]) == 0
        assert logger.level == logging.INFO
        assert main(["--print-config", "--log-level", "ERROR"]) == 0
        assert logger.level == logging.ERROR
    finally:
        logger.setLevel(before)
    capsys.readouterr()


def test_exit_codes_are_distinct_and_documented_in_the_readme():
    codes = {name: getattr(errors, name) for name in dir(errors) if name.startswith("EXIT_")}
    assert len(set(codes.values())) == len(codes)
    assert errors.MissingAssetError.exit_code == 3 and errors.TrackerError.exit_code == 1
    readme = (REPO / "README.md").read_text()
    table = dict(re.findall(r"^\| `(\d+(?: \+ N)?)` \| ([^|]+) \|$", readme, flags=re.M))
    assert set(table) == {"0", "1", "2", "3", "4", "128 + N"}
    assert "usage" in table["2"] and "missing" in table["3"] and "internal" in table["4"]


def test_plain_pytest_collects_from_the_repository_root():
    """`pytest` (the console script, not `python -m pytest`) imports tests.* from the root."""
    pytest_script = Path(sys.executable).parent / "pytest"
    if not pytest_script.is_file():
        pytest.skip("no pytest console script next to this interpreter")
    proc = subprocess.run([str(pytest_script), "--collect-only", "-q", "tests/test_conventions.py"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "test_plain_pytest_collects_from_the_repository_root" in proc.stdout


def test_licence_file():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "flame_assets/" in text


def test_report_failure_maps_exceptions_to_the_table(capsys):
    assert errors.report_failure(errors.TrackerError("bad flag")) == 1
    assert errors.report_failure(errors.MissingAssetError("no model")) == 3
    assert errors.report_failure(KeyboardInterrupt(), kept="finished frames were written") == 130
    assert errors.report_failure(ZeroDivisionError("boom")) == 4
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["error: bad flag", "error: no model", "interrupted: finished frames were written",
                     "error: unexpected ZeroDivisionError: boom (set TRACKER_DEBUG=1 for the traceback)"]
