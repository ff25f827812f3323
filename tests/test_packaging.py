"""`pip install .` builds a wheel with every package, the shipped configs and assets as package data (never a
user's own FLAME file) and the console scripts; installed, the tracker finds them inside the package."""

import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO

SOURCES = ("tracker", "configs", "flame_assets", "pyproject.toml", "README.md", "LICENSE")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from a copy of the sources by setuptools' PEP 517 backend (offline, no dependencies)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    (src / "flame_assets" / "generic_model.pkl").write_bytes(b"a user's licensed FLAME 2020")
    out = tmp_path_factory.mktemp("wheel")
    build = f"from setuptools import build_meta\nbuild_meta.build_wheel({str(out)!r})\n"  # what pip runs, minus pip
    proc = subprocess.run([sys.executable, "-c", build], capture_output=True, text=True, cwd=src)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("tracker-*.whl")
    with zipfile.ZipFile(path) as archive:
        return {"names": set(archive.namelist()),
                "entry_points": next(archive.read(n).decode() for n in archive.namelist()
                                     if n.endswith("entry_points.txt"))}


def test_wheel_holds_packages_and_shipped_files(wheel):
    names = wheel["names"]
    packages = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "tracker").rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= names
    assert "tracker/configs/default.yaml" in names and "tracker/configs/ablation_default.yaml" in names
    shipped = {p.relative_to(REPO / "flame_assets").as_posix() for p in (REPO / "flame_assets").rglob("*")
               if p.is_file() and p.name != "generic_model.pkl"}
    assert {f"tracker/flame_assets/{n}" for n in shipped} <= names
    assert not any(n.endswith("generic_model.pkl") for n in names)  # a user's FLAME file never ships
    assert not any(n.startswith(("tests/", "eval/")) for n in names)
    assert "flame-tracker = tracker.run:main" in wheel["entry_points"]
    assert "flame-tracker-export = tracker.export:main" in wheel["entry_points"]


def test_resources_resolve_in_an_installed_layout(tmp_path, monkeypatch):
    """tracker/resources.py prefers tracker/<name> (installed) and falls back to the repository root."""
    import tracker.resources as resources

    assert resources.configs_dir() == REPO / "configs"
    assert resources.shipped_assets_dir() == REPO / "flame_assets"
    package = tmp_path / "site-packages" / "tracker"
    (package / "configs").mkdir(parents=True)
    (package / "flame_assets").mkdir()
    monkeypatch.setattr(resources, "PACKAGE_DIR", package)
    assert resources.configs_dir() == package / "configs"
    assert resources.shipped_assets_dir() == package / "flame_assets"
