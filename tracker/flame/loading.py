"""Reading FLAME model files (FLAME 2020 / 2023 / 2023 Open pickles, .npz) and their side assets.

FLAME 2020's `generic_model.pkl` stores arrays as chumpy objects. chumpy is unmaintained and must not be
needed: a restricted unpickler admits only numpy, scipy.sparse and chumpy class names, and turns chumpy
objects into their stored arrays. Nothing else in a pickle can run code.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tracker.errors import MissingAssetError, TrackerError

FLAME_DOWNLOAD_HINT = (
    "download FLAME (2020, 2023 or 2023 Open) from https://flame.is.tue.mpg.de after registering, "
    "then pass --flame PATH, set FLAME_MODEL, or put the .pkl in flame_assets/"
)

_NUMPY_NAMES = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}
_SPARSE_NAMES = {"csc_matrix", "csr_matrix", "coo_matrix", "csc_array", "csr_array", "coo_array"}
_BUILTIN_NAMES = {"object", "set", "frozenset", "slice", "complex"}


class ChumpyStub:
    """Stands in for any chumpy class while unpickling; keeps the pickled state."""

    def __init__(self, *args, **kwargs):
        self.state: dict = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"state": state}

    def to_array(self) -> np.ndarray:
        if "x" not in self.state:
            raise TrackerError(f"unsupported chumpy object in FLAME file (state keys {sorted(self.state)})")
        return np.asarray(self.state["x"])


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves numpy, scipy.sparse, a few builtins and chumpy (as ChumpyStub)."""

    def find_class(self, module: str, name: str):
        root = module.split(".")[0]
        if root == "chumpy":
            return ChumpyStub
        if root == "numpy" and name in _NUMPY_NAMES:
            return super().find_class(module, name)
        if module.startswith("scipy.sparse") and name in _SPARSE_NAMES:
            import scipy.sparse

            return getattr(scipy.sparse, name)
        if module in ("builtins", "__builtin__", "copy_reg", "copyreg") and (
            name in _BUILTIN_NAMES or name == "_reconstructor"
        ):
            return super().find_class(module, name)
        if module == "_codecs" and name == "encode":  # how protocol-2 pickles store bytes
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden class {module}.{name}")


def _as_dense(value) -> np.ndarray:
    """numpy array from a numpy / scipy.sparse / chumpy-stub value."""
    if isinstance(value, ChumpyStub):
        return value.to_array()
    if hasattr(value, "toarray"):
        return value.toarray()
    return np.asarray(value)


def read_pickle(path: Path) -> dict:
    """Load a (possibly Python 2) pickle through the restricted unpickler."""
    try:
        with open(path, "rb") as fh:
            data = RestrictedUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise TrackerError(f"{path} is not a readable FLAME/asset pickle ({exc})") from None
    if not isinstance(data, dict):
        raise TrackerError(f"{path} does not hold a dict of arrays (found {type(data).__name__})")
    return data


def read_array_dict(path: Path) -> dict:
    """A dict of arrays from a plain .npz (np.load without pickles) or, for other suffixes, a pickle read by
    the restricted unpickler (users' official FLAME files and side files)."""
    if path.suffix != ".npz":
        return read_pickle(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise TrackerError(f"{path} is not a readable .npz of plain arrays ({exc})") from None


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


def _parents(kintree_table) -> np.ndarray:
    """Parent indices from a kintree table; the root's parent is stored as -1 or as uint32 max."""
    parents = _as_dense(kintree_table)[0].astype(np.int64)
    parents[0] = -1
    return parents


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

    shapedirs = _as_dense(raw["shapedirs"]).astype(dtype)
    n_dirs = shapedirs.shape[2]
    # Official files split 300 identity + 100 expression directions; files that say otherwise win.
    file_n_shape = int(np.asarray(raw.get("n_shape", min(300, n_dirs))))
    file_n_expr = int(np.asarray(raw.get("n_expr", n_dirs - 300 if n_dirs > 300 else 0)))
    n_shape = max(0, min(n_shape, file_n_shape))
    n_expr = max(0, min(n_expr, file_n_expr))
    expr_start = 300 if n_dirs > 300 else file_n_shape

    v_template = _as_dense(raw["v_template"]).astype(dtype)
    n_verts = v_template.shape[0]
    posedirs = _as_dense(raw["posedirs"]).astype(dtype)
    posedirs = posedirs.reshape(n_verts * 3, -1).T.copy()
    names = raw.get("expression_names")
    names = [str(n) for n in np.asarray(names).tolist()][:n_expr] if names is not None else []
    return FlameData(
        v_template=v_template,
        faces=_as_dense(raw["f"]).astype(np.int64),
        shape_dirs=shapedirs[:, :, :n_shape].copy(),
        expr_dirs=shapedirs[:, :, expr_start : expr_start + n_expr].copy(),
        posedirs=posedirs,
        j_regressor=_as_dense(raw["J_regressor"]).astype(dtype),
        weights=_as_dense(raw["weights"]).astype(dtype),
        parents=_parents(raw["kintree_table"]),
        sha256=file_sha256(path),
        name=str(raw.get("model_name", path.name)),
        expression_names=names,
        license=str(raw.get("license", "")),
    )
