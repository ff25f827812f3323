"""Reading and writing the mesh and landmark files of geometry benchmarks (OBJ, PLY, MeshLab .pp).

Only positions and triangles are read: benchmarks measure geometry, and reading the `v`/`f` records
directly keeps the scan's vertices exactly as stored (libraries that split vertices on UV seams would
count seam points twice in a scan-to-mesh error).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import BinaryIO

import numpy as np

from tracker.errors import MissingAssetError, TrackerError

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise MissingAssetError(f"file not found: {path} (check the benchmark folder layout)")


def _fan_triangulate(polygons: list[list[int]]) -> np.ndarray:
    """Polygons as vertex index lists -> (F, 3) int64 triangles (fans around each polygon's first vertex)."""
    triangles = [(poly[0], poly[i], poly[i + 1]) for poly in polygons for i in range(1, len(poly) - 1)]
    return np.asarray(triangles, dtype=np.int64).reshape(-1, 3)


def load_obj(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an OBJ file.

    Returns:
        vertices: (V, 3) float64, in the file's units.
        faces: (F, 3) int64, 0-based; polygons are fan-triangulated.
    """
    path = Path(path)
    _require_file(path)
    vertices: list[list[float]] = []
    polygons: list[list[int]] = []
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("v "):
                vertices.append([float(x) for x in line.split()[1:4]])
            elif line.startswith("f "):
                # "f 1/2/3 ..." keeps the position index; negative indices count from the end so far.
                indices = [int(token.split("/")[0]) for token in line.split()[1:]]
                polygons.append([i - 1 if i > 0 else len(vertices) + i for i in indices])
    if not vertices:
        raise TrackerError(f"{path} holds no vertices ('v' lines): is it an OBJ mesh?")
    return np.asarray(vertices, dtype=np.float64), _fan_triangulate(polygons)


def save_obj(path: str | Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Write (V, 3) vertices and (F, 3) 0-based triangles as an OBJ file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"v {x:.8g} {y:.8g} {z:.8g}" for x, y, z in np.asarray(vertices, dtype=np.float64)]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in np.asarray(faces, dtype=np.int64)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _read_ply_header(handle: BinaryIO) -> tuple[str, list[tuple[str, int, list[list[str]]]]]:
    """Returns the format and, per element, (name, count, property declarations split into words)."""
    if handle.readline().strip() != b"ply":
        raise TrackerError(f"{handle.name} is not a PLY file (no 'ply' magic line)")
    fmt = ""
    elements: list[tuple[str, int, list[list[str]]]] = []
    for raw in iter(handle.readline, b""):
        words = raw.decode("ascii", errors="replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            return fmt, elements
        if words[0] == "format":
            fmt = words[1]
        elif words[0] == "element":
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property":
            elements[-1][2].append(words[1:])
    raise TrackerError(f"{handle.name}: PLY header has no 'end_header'")


def _ply_element_dtype(properties: list[list[str]], byte_order: str, list_length: int) -> np.dtype:
    """Structured dtype of one element record; list properties are assumed to hold `list_length` items."""
    fields = []
    for prop in properties:
        if prop[0] == "list":
            fields.append((prop[3] + "_count", byte_order + _PLY_TYPES[prop[1]]))
            fields.append((prop[3], byte_order + _PLY_TYPES[prop[2]], (list_length,)))
        else:
            fields.append((prop[1], byte_order + _PLY_TYPES[prop[0]]))
    return np.dtype(fields)


def load_ply(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a triangle-mesh PLY file (ascii or binary) holding a `vertex` and a `face` element.

    Returns:
        vertices: (V, 3) float64.
        faces: (F, 3) int64, 0-based.
    """
    path = Path(path)
    _require_file(path)
    with path.open("rb") as handle:
        fmt, elements = _read_ply_header(handle)
        body = handle.read()
    names = [name for name, _, _ in elements]
    if names[:2] != ["vertex", "face"]:
        raise TrackerError(f"{path}: expected PLY elements 'vertex' then 'face', found {names}")
    (_, n_vertices, vertex_props), (_, n_faces, face_props) = elements[:2]
    face_list = next(p[3] for p in face_props if p[0] == "list")
    if fmt == "ascii":
        rows = body.decode("ascii").split("\n")
        vertex_table = np.loadtxt(rows[:n_vertices], ndmin=2)
        face_rows = [np.asarray(r.split(), dtype=np.int64) for r in rows[n_vertices:n_vertices + n_faces]]
        if any(r[0] != 3 for r in face_rows):
            raise TrackerError(f"{path}: only triangle meshes are supported")
        columns = [p[1] for p in vertex_props]
        vertices = vertex_table[:, [columns.index(c) for c in "xyz"]]
        faces = np.stack([r[1:4] for r in face_rows]) if face_rows else np.zeros((0, 3), np.int64)
        return vertices.astype(np.float64), faces
    byte_order = {"binary_little_endian": "<", "binary_big_endian": ">"}.get(fmt)
    if byte_order is None:
        raise TrackerError(f"{path}: unknown PLY format '{fmt}'")
    vertex_dtype = _ply_element_dtype(vertex_props, byte_order, 0)
    vertex_table = np.frombuffer(body, dtype=vertex_dtype, count=n_vertices)
    # Face records are fixed-size when every face is a triangle, which we check on the counts.
    face_dtype = _ply_element_dtype(face_props, byte_order, 3)
    face_table = np.frombuffer(body, dtype=face_dtype, count=n_faces, offset=vertex_dtype.itemsize * n_vertices)
    if np.any(face_table[face_list + "_count"] != 3):
        raise TrackerError(f"{path}: only triangle meshes are supported")
    vertices = np.stack([vertex_table[c] for c in "xyz"], axis=1).astype(np.float64)
    return vertices, face_table[face_list].astype(np.int64)


def load_mesh(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an .obj or .ply triangle mesh: (V, 3) float64 vertices, (F, 3) int64 faces."""
    path = Path(path)
    loaders = {".obj": load_obj, ".ply": load_ply}
    if path.suffix.lower() not in loaders:
        raise TrackerError(f"{path}: unsupported mesh format (use .obj or .ply)")
    return loaders[path.suffix.lower()](path)


def load_picked_points(path: str | Path) -> np.ndarray:
    """Read a MeshLab picked-points file (.pp, XML with <point x= y= z=/> entries) -> (N, 3) float64."""
    path = Path(path)
    _require_file(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise TrackerError(f"{path} is not a valid MeshLab .pp file ({exc})") from None
    try:
        points = [[float(p.get(axis)) for axis in "xyz"] for p in root.iter("point")]
    except (TypeError, ValueError):
        raise TrackerError(f"{path}: a <point> lacks a numeric x, y or z attribute") from None
    if not points:
        raise TrackerError(f"{path} holds no <point> entries")
    return np.asarray(points, dtype=np.float64)


def load_landmarks(path: str | Path) -> np.ndarray:
    """Read 3D landmarks from .npy, .txt (one 'x y z' row per point) or MeshLab .pp -> (N, 3) float64."""
    path = Path(path)
    _require_file(path)
    suffix = path.suffix.lower()
    if suffix == ".pp":
        return load_picked_points(path)
    points = np.load(path) if suffix == ".npy" else np.loadtxt(path, ndmin=2)
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise TrackerError(f"{path}: expected landmarks of shape (N, 3), found {points.shape}")
    return points
