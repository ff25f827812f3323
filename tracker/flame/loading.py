"""Reading FLAME model files (FLAME 2020 / 2023 / 2023 Open pickles, .npz) and their side assets.

FLAME 2020's `generic_model.pkl` stores arrays as chumpy objects. chumpy is unmaintained and must not be
needed: the restricted unpickler of tracker.io.safe_load admits an exact list of numpy and scipy.sparse
names and turns chumpy objects into their stored arrays. Nothing in a pickle can run code. Every model is
validated when loaded (shapes against each other, finite values, index ranges, a kinematic tree), so a broken
file is one line naming the file and the array, never a wrong result.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tracker.errors import MissingAssetError, TrackerError, quote
from tracker.io import safe_load
from tracker.io.safe_load import ChumpyStub

FLAME_DOWNLOAD_HINT = (
    "download FLAME (2020, 2023 or 2023 Open) from https://flame.is.tue.mpg.de after registering, "
    "then pass --flame PATH, set FLAME_MODEL, or put the .pkl in flame_assets/"
)


def _as_dense(value) -> np.ndarray:
    """numpy array from a numpy / scipy.sparse / chumpy-stub value."""
    if isinstance(value, ChumpyStub):
        return value.to_array()
    if hasattr(value, "toarray"):
        return value.toarray()
    return np.asarray(value)


def read_pickle(path: Path, what: str = "FLAME/asset pickle") -> dict:
    """A (possibly Python 2) pickle of a dict, read through the restricted unpickler (tracker.io.safe_load)."""
    data = safe_load.read_pickle(path, what)
    if not isinstance(data, dict):
        raise TrackerError(f"{path} does not hold a dict of arrays (found {type(data).__name__})")
    return data


def read_array_dict(path: Path, what: str = "FLAME/asset file") -> dict:
    """A dict of arrays from a plain .npz (no pickles) or, for other suffixes, a pickle read by the restricted
    unpickler (users' official FLAME files and side files); both through tracker.io.safe_load."""
    if path.suffix != ".npz":
        return read_pickle(path, what)
    return safe_load.read_npz(path, what)


@dataclass
class FlameData:
    """Arrays of a FLAME model in numpy, with the shape/expression split already applied."""

    v_template: np.ndarray
    """(V, 3) neutral template, metres."""
    faces: np.ndarray
    """(F, 3) triangle vertex indices."""
    shape_dirs: np.ndarray
    """(V, 3, n_shape) identity blendshapes."""
    expr_dirs: np.ndarray
    """(V, 3, n_expr) expression blendshapes."""
    posedirs: np.ndarray
    """(9 * (J - 1), V * 3) pose correctives in smplx layout."""
    j_regressor: np.ndarray
    """(J, V) dense joint regressor."""
    weights: np.ndarray
    """(V, J) skinning weights."""
    parents: np.ndarray
    """(J,) parent joint of each joint, -1 for the root."""
    sha256: str
    """Hash of the model file, recorded in outputs."""
    name: str
    """File name or the model's own name."""
    expression_names: list[str] = field(default_factory=list)
    """Names of the expression directions when the file has them (the stand-in's ARKit-style shapes)."""
    license: str = ""
    """The licence the file states (its `license` entry); empty when it states none (official FLAME files)."""


REQUIRED_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table")
FLAME_JOINTS = 5
"""FLAME's joints: global (root), neck, jaw, left eye, right eye."""


class _ModelArrays:
    """The raw arrays of one model file, converted and checked one by one; every failure is a TrackerError of
    one line naming the file and the array."""

    def __init__(self, path: Path, raw: dict):
        self.path, self.raw = path, raw

    def fail(self, key: str, problem: str) -> TrackerError:
        return TrackerError(f"{self.path}: array {key} {problem}; is this an official FLAME file?")

    def array(self, key: str, ndim: int | tuple[int, ...], dtype=np.float32) -> np.ndarray:
        """`key` as a finite `dtype` array of `ndim` dimensions (or one of several)."""
        try:
            converted = np.asarray(_as_dense(self.raw[key]), dtype=np.float64)
        except (TypeError, ValueError, OverflowError, TrackerError) as error:
            raise self.fail(key, f"is not numeric ({type(error).__name__})") from None
        if converted.ndim not in np.atleast_1d(ndim):
            raise self.fail(key, f"has {converted.ndim} dimensions {converted.shape}, expected {ndim}")
        if not np.isfinite(converted).all():
            raise self.fail(key, f"holds {int((~np.isfinite(converted)).sum())} non-finite values (NaN or inf)")
        if np.dtype(dtype).kind in "iu" and not (converted == np.round(converted)).all():
            raise self.fail(key, "holds non-integer indices")
        return converted.astype(dtype)

    def count(self, key: str, default: int, upper: int) -> int:
        """A count stored in the file (n_shape, n_expr), 0..upper."""
        if key not in self.raw:
            return default
        value = self.array(key, 0, np.float64)
        if not (0 <= value <= upper and value == int(value)):
            raise self.fail(key, f"is {quote(float(value))}, expected a whole number in 0..{upper}")
        return int(value)

    def expect(self, key: str, value: np.ndarray, shape: tuple) -> None:
        """Check a shape against the others (None: any size)."""
        if len(value.shape) != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
            wanted = "x".join("?" if s is None else str(s) for s in shape)
            raise self.fail(key, f"has shape {'x'.join(map(str, value.shape))}, expected {wanted}")

    def indices(self, key: str, value: np.ndarray, upper: int, what: str) -> None:
        if value.size and (value.min() < 0 or value.max() >= upper):
            raise self.fail(key, f"holds indices outside 0..{upper - 1} (the {upper} {what})")


def _parents(arrays: _ModelArrays) -> np.ndarray:
    """Parent of each joint from the kintree table (the root's parent is stored as -1 or as uint32 max), checked
    to be a tree whose parents come before their children (what the skinning walks)."""
    table = arrays.array("kintree_table", 2, np.float64)
    arrays.expect("kintree_table", table, (2, FLAME_JOINTS))
    parents = table[0].astype(np.int64)
    parents[0] = -1
    for joint, parent in enumerate(parents[1:], start=1):
        if not 0 <= parent < joint:
            raise arrays.fail("kintree_table", f"gives joint {joint} the parent {parent}: not a tree rooted at "
                                               "joint 0 with parents before children")
    return parents


def validate_flame_data(data: FlameData, path: Path) -> None:
    """Check a model's arrays against each other (shapes, index ranges, finiteness): one line naming the file and
    the array otherwise. Every FlameData the loader returns passed this."""
    arrays = _ModelArrays(path, {})
    V, J = data.v_template.shape[0], data.parents.shape[0]
    for key, value, shape in (("v_template", data.v_template, (V, 3)), ("f", data.faces, (None, 3)),
                              ("shapedirs", data.shape_dirs, (V, 3, None)),
                              ("shapedirs", data.expr_dirs, (V, 3, None)),
                              ("posedirs", data.posedirs, (9 * (J - 1), 3 * V)),
                              ("J_regressor", data.j_regressor, (J, V)), ("weights", data.weights, (V, J))):
        arrays.expect(key, value, shape)
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise arrays.fail(key, "holds non-finite values (NaN or inf)")
    if V < 3 or len(data.faces) == 0:
        raise arrays.fail("v_template" if V < 3 else "f", "is empty")
    arrays.indices("f", data.faces, V, "vertices")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_flame_file(path: str | Path, n_shape: int = 300, n_expr: int = 100, dtype=np.float32) -> FlameData:
    """Read a FLAME .pkl or .npz; n_shape / n_expr are clipped to what the file holds. Arrays are cast to
    `dtype` (float64 only to measure storage precision)."""
    path = Path(path)
    if not path.is_file():
        raise MissingAssetError(f"FLAME model not found at {path}: {FLAME_DOWNLOAD_HINT}")
    raw = read_array_dict(path)
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise TrackerError(f"{path} is not a FLAME model: missing {', '.join(missing)}")

    arrays = _ModelArrays(path, raw)
    v_template = arrays.array("v_template", 2, dtype)
    n_verts = v_template.shape[0]
    arrays.expect("v_template", v_template, (None, 3))
    parents = _parents(arrays)
    shapedirs = arrays.array("shapedirs", 3, dtype)
    arrays.expect("shapedirs", shapedirs, (n_verts, 3, None))
    n_dirs = shapedirs.shape[2]
    # Official files split 300 identity + 100 expression directions; files that say otherwise win.
    file_n_shape = arrays.count("n_shape", min(300, n_dirs), n_dirs)
    expr_start = 300 if n_dirs > 300 else file_n_shape
    file_n_expr = arrays.count("n_expr", n_dirs - 300 if n_dirs > 300 else 0, n_dirs - expr_start)
    n_shape = max(0, min(n_shape, file_n_shape))
    n_expr = max(0, min(n_expr, file_n_expr))

    posedirs = arrays.array("posedirs", (2, 3), dtype)
    if posedirs.size != n_verts * 3 * 9 * (FLAME_JOINTS - 1):
        raise arrays.fail("posedirs", f"has shape {'x'.join(map(str, posedirs.shape))}, expected "
                                      f"{n_verts}x3x{9 * (FLAME_JOINTS - 1)}")
    posedirs = posedirs.reshape(n_verts * 3, -1).T.copy()
    names = raw.get("expression_names")
    try:
        names = [str(n) for n in np.asarray(names).reshape(-1).tolist()][:n_expr] if names is not None else []
    except (TypeError, ValueError):
        raise arrays.fail("expression_names", "is not a list of names") from None
    data = FlameData(
        v_template=v_template,
        faces=arrays.array("f", 2, np.int64),
        shape_dirs=shapedirs[:, :, :n_shape].copy(),
        expr_dirs=shapedirs[:, :, expr_start : expr_start + n_expr].copy(),
        posedirs=posedirs,
        j_regressor=arrays.array("J_regressor", 2, dtype),
        weights=arrays.array("weights", 2, dtype),
        parents=parents,
        sha256=file_sha256(path),
        name=str(raw.get("model_name", path.name))[:200],
        expression_names=names,
        license=str(raw.get("license", "")),
    )
    validate_flame_data(data, path)
    return data
