"""The one way the tracker reads pickles, .npy and .npz files: no data file can run code.

- .npz and .npy are read with `allow_pickle=False`; only an .npy that holds a pickled object (RingNet's
  `flame_dynamic_embedding.npy` is a pickled dict) has its pickle read by the restricted unpickler below.
- Pickles go through `RestrictedUnpickler`, which resolves an exact allow-list of (module, name) pairs: the
  numpy array/dtype reconstructors, scipy.sparse matrix classes (taken from `scipy.sparse` itself, never by
  importing the module the pickle names) and a few builtins. chumpy classes (FLAME 2020) become `ChumpyStub`,
  an inert holder of the pickled state; nothing is imported for them. Anything else is refused, so a pickle
  can neither call a function nor import a module (importing `numpy.f2py.__main__` alone runs f2py).
- Array headers are checked against the bytes present before anything is allocated, and zip members against
  a size limit, so a damaged or hostile file costs little.
Every failure is a TrackerError with one line naming the file.
"""

from __future__ import annotations

import codecs
import io
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tracker.errors import TrackerError, quote

MAX_ARRAY_BYTES = 4 << 30
"""Largest array a data file may declare (4 GiB; FLAME's biggest array is about 50 MB)."""


class ChumpyStub:
    """Stands in for a chumpy class while unpickling (chumpy is not needed): keeps the pickled state."""

    def __init__(self, *args, **kwargs):
        self.state: dict = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"state": state}

    def to_array(self) -> np.ndarray:
        if "x" not in self.state:
            raise TrackerError(f"unsupported chumpy object (state keys {quote(sorted(map(str, self.state)))})")
        return np.asarray(self.state["x"])


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes (latin1 only: no other codec can be named)."""
    if codecs.lookup(encoding).name != "iso8859-1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"forbidden call _codecs.encode(..., {quote(encoding)})")
    return text.encode("latin1")


def _sparse(name: str):
    def resolve():
        import scipy.sparse  # the package itself: never the submodule a pickle names

        return getattr(scipy.sparse, name)

    return resolve


# numpy's own reconstructors, taken from what numpy's pickling uses (not imported by the names a file gives).
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_SCALAR = np.float64(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
_ALLOWED: dict[tuple[str, str], Any] = {("numpy", "ndarray"): lambda: np.ndarray, ("numpy", "dtype"): lambda: np.dtype,
                                        ("_codecs", "encode"): lambda: _latin1_encode}
for _core in ("numpy.core", "numpy._core"):  # numpy 1 and numpy 2 module names
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = lambda: _RECONSTRUCT
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = lambda: _SCALAR
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = lambda: _FROMBUFFER
for _builtins in ("builtins", "__builtin__"):  # Python 3 and Python 2 names
    for _type in (set, frozenset, slice, complex, object):
        _ALLOWED[(_builtins, _type.__name__)] = lambda t=_type: t
for _module in ("copyreg", "copy_reg"):  # protocol 0/1 objects; the class it rebuilds must pass this list too
    _ALLOWED[(_module, "_reconstructor")] = lambda: __import__("copyreg")._reconstructor
for _module in ("scipy.sparse", "scipy.sparse.csc", "scipy.sparse.csr", "scipy.sparse.coo", "scipy.sparse._csc",
                "scipy.sparse._csr", "scipy.sparse._coo", "scipy.sparse._arrays"):
    for _name in ("csc_matrix", "csr_matrix", "coo_matrix", "csc_array", "csr_array", "coo_array"):
        _ALLOWED[(_module, _name)] = _sparse(_name)
CHUMPY_MODULES = frozenset({"chumpy", "chumpy.ch", "chumpy.ch_ops", "chumpy.reordering", "chumpy.linalg",
                            "chumpy.utils", "chumpy.logic"})
"""Modules whose classes become ChumpyStub (nothing is imported: the stub only stores the pickled state)."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the exact (module, name) pairs above, and chumpy classes as stubs."""

    def find_class(self, module: str, name: str):
        if module in CHUMPY_MODULES:
            return ChumpyStub
        resolve = _ALLOWED.get((module, name))
        if resolve is None:
            raise pickle.UnpicklingError(f"forbidden class {module[:80]}.{name[:80]}")
        return resolve()


def _unpickle(data: io.BytesIO) -> Any:
    """Restricted unpickling from memory: a length field in a damaged pickle can never make a read allocate more
    than the file; Python 2 strings with odd escapes are read without warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RestrictedUnpickler(data, encoding="latin1").load()


class _Refused(Exception):
    """Raised inside this module for a file that is damaged or hostile; becomes a TrackerError."""


def _reason(error: Exception) -> str:
    return str(error) if isinstance(error, (_Refused, pickle.UnpicklingError)) else f"{type(error).__name__}: {error}"


def _fail(path: Path, what: str, reason: object) -> TrackerError:
    text = " ".join(str(reason).split())
    return TrackerError(f"{path} is not a readable {what} ({text[:160]}{'...' if len(text) > 160 else ''})")


def read_pickle(path: str | Path, what: str = "pickle") -> Any:
    """Unpickle a (possibly Python 2) pickle through the restricted unpickler; TrackerError naming the file
    (and `what` it should have been) when it is unreadable or names anything outside the allow-list."""
    path = Path(path)
    try:
        return _unpickle(io.BytesIO(path.read_bytes()))
    except OSError as error:
        raise _fail(path, what, error.strerror or error) from None
    except RecursionError:
        raise _fail(path, what, "nested too deeply") from None
    except Exception as error:  # noqa: BLE001  (any failure inside unpickling is the file's, not a bug)
        raise _fail(path, what, _reason(error)) from None


def _check_header(fh, available: int) -> tuple[np.dtype, bool]:
    """Read an .npy header; refuse one that declares more data than the bytes present or the size limit.
    Returns the dtype and whether the payload is a pickle (object arrays)."""
    version = np.lib.format.read_magic(fh)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(fh, max_header_size=10000)
    if dtype.hasobject:
        return dtype, True
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if need > MAX_ARRAY_BYTES:
        raise _Refused(f"declares {need} bytes of data, more than the {MAX_ARRAY_BYTES >> 30} GiB limit")
    if need > available - fh.tell():
        raise _Refused(f"declares {need} bytes of data but holds {available - fh.tell()}: truncated")
    return dtype, False


def read_npy(path: str | Path, what: str = ".npy array") -> Any:
    """An .npy file: a plain array with allow_pickle=False, or, for an object array (a pickled dict, as in
    RingNet's embeddings), the value the restricted unpickler rebuilds (a 0-d object array's item)."""
    path = Path(path)
    try:
        data = path.read_bytes()
        fh = io.BytesIO(data)
        _, pickled = _check_header(fh, len(data))
        if not pickled:
            fh.seek(0)
            return np.load(fh, allow_pickle=False)
        value = _unpickle(fh)
    except OSError as error:
        raise _fail(path, what, error.strerror or error) from None
    except Exception as error:  # noqa: BLE001  (a damaged or hostile file)
        raise _fail(path, what, _reason(error)) from None
    if isinstance(value, np.ndarray) and value.dtype.hasobject and value.shape == ():
        return value.item()
    return value


def read_npz(path: str | Path, what: str = ".npz archive") -> dict[str, np.ndarray]:
    """Every array of an .npz (allow_pickle=False), checked for size before reading."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.file_size > MAX_ARRAY_BYTES + 65536:
                    raise _Refused(f"member {info.filename} is {info.file_size} bytes, more than the limit")
                with archive.open(info) as member:
                    if info.filename.endswith(".npy"):
                        _check_header(member, info.file_size)
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except OSError as error:
        raise _fail(path, what, error.strerror or error) from None
    except Exception as error:  # noqa: BLE001  (a damaged or hostile file)
        raise _fail(path, what, _reason(error)) from None
