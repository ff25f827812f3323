"""Where the files that ship with the tracker live, in a checkout and in an installed package.

A checkout keeps them at the repository root (flame_assets/, configs/). `pip install .` copies them into the
package as tracker/flame_assets/ and tracker/configs/ (pyproject.toml, [tool.setuptools.package-dir]). Every
lookup of a shipped file goes through these functions, so both layouts work from any working directory.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _shipped(name: str) -> Path:
    """tracker/<name> in an installed package, else <repository>/<name>."""
    installed = PACKAGE_DIR / name
    return installed if installed.is_dir() else PACKAGE_DIR.parent / name


def shipped_assets_dir() -> Path:
    """The shipped flame_assets/ folder: default head model, side files, landmarker model (and, in a checkout,
    where users put their own FLAME file)."""
    return _shipped("flame_assets")


def configs_dir() -> Path:
    """The shipped configs/ folder (default.yaml, ablation lists)."""
    return _shipped("configs")
