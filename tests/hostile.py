"""Builders of bad, hostile and unusual inputs shared by the hardening, fuzz and property tests."""

from __future__ import annotations

import os
import pickle
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from tests.conftest import FLAME_ASSETS, VIDEOS

SOURCE_CLIP = VIDEOS / "0Fi83BHQsMA_00002.mp4"
"""224x224, 25 fps, a face in every frame: the source of the small face videos below."""


def face_frames(n: int, skip: int = 0) -> list[np.ndarray]:
    """n frames of SOURCE_CLIP as RGB (224x224), after the first `skip`."""
    frames = []
    with av.open(str(SOURCE_CLIP)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if len(frames) == n:
                break
            if index >= skip:
                frames.append(frame.to_ndarray(format="rgb24"))
    return frames


def encode(path: Path, frames: list[np.ndarray], rate: Fraction | int = 25, codec: str = "libx264",
           rotation: int | None = None, options: dict | None = None, container_format: str | None = None) -> Path:
    """Encode RGB frames (all of one size) into `path`; rotation: display rotation, degrees counter-clockwise."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w", format=container_format, options=options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def flat_frames(n: int, width: int, height: int, start: int = 0) -> list[np.ndarray]:
    """n flat grey frames whose level encodes their index (40 * (start + i) mod 250)."""
    return [np.full((height, width, 3), (40 * (start + i)) % 250, np.uint8) for i in range(n)]


def truncated_copy(source: Path, target: Path, fraction: float) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


class RunsCode:
    """Pickled, unpickling runs `func(*args)` (what a hostile data file does)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def hostile_payloads(sentinel: Path) -> dict[str, object]:
    """Objects whose unpickling writes `sentinel` (a file write, a shell command) or imports a module."""
    return {"file_write": RunsCode(eval, f"open({str(sentinel)!r}, 'w').write('pwned')"),
            "os_system": RunsCode(os.system, f"touch {sentinel}"),
            "numpy_callable": RunsCode(np.save, str(sentinel), np.zeros(1))}


def hostile_pickle_bytes(payload: object) -> bytes:
    return pickle.dumps({"lmk_face_idx": payload, "lmk_b_coords": np.zeros((79, 17, 3))}, protocol=2)


def f2py_pickle_bytes() -> bytes:
    """A pickle that names `ndarray` in numpy.f2py.__main__: importing that module runs f2py's command line."""
    return b"\x80\x02cnumpy.f2py.__main__\nndarray\nq\x00."


def assets_with(tmp: Path, replacements: dict[str, bytes]) -> Path:
    """A FLAME assets folder: links to the shared assets, with some files replaced by the given bytes."""
    folder = tmp / "assets"
    folder.mkdir()
    for source in FLAME_ASSETS.iterdir():
        (folder / source.name).symlink_to(source)
    for name, data in replacements.items():
        (folder / name).unlink(missing_ok=True)
        (folder / name).write_bytes(data)
    return folder


def pickled_npy_bytes(payload: object, tmp: Path) -> bytes:
    """An .npy holding a pickled object array whose element is `payload` (as np.save writes it)."""
    path = tmp / "payload.npy"
    array = np.empty((), dtype=object)
    array[()] = payload
    np.save(path, array, allow_pickle=True)
    data = path.read_bytes()
    path.unlink()
    return data
