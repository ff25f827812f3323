"""A statistical albedo model: albedo = mean + sum_k z_k basis_k, in FLAME's UV layout.

The photometric stage's free per-texel albedo is unwrapped under whatever geometry it is given, so it agrees with
a wrong identity as well as with the right one; an albedo confined to a model of many faces cannot follow the
geometry that way (README, photometric stage). FLAME ships no albedo; the field uses two files that come with a
registration like FLAME itself, and both load here:

- FLAME texture space (`FLAME_texture.npz`): `mean` (512*512*3) and `tex_dir` (512*512*3, 200), 0..255;
- FLAME albedo from BFM (`FLAME_albedo_from_BFM.npz`, TimoBolkart/BFM_to_FLAME): `MU` and `PC` (.., 199), 0..1.

Both hold square images, row 0 at v = 1, channels in BGR order.

    model = load_albedo_model("FLAME_texture.npz", size=256, components=50)
    texture = model.albedo(torch.zeros(model.components))  # (3, 256, 256) RGB: the mean
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tracker.errors import TrackerError
from tracker.flame.loading import file_sha256
from tracker.io.safe_load import read_npz

FORMATS = (("mean", "tex_dir", 1 / 255, "FLAME texture space"), ("MU", "PC", 1.0, "FLAME albedo from BFM"))
"""(mean key, basis key, scale to [0, 1], name) of the albedo model files that load."""


@dataclass(frozen=True)
class AlbedoModel:
    """A linear albedo model resampled to the stage's texture size."""

    mean: Tensor
    """(3, S, S) mean albedo, RGB in [0, 1], FLAME's UV layout (row 0 at v = 1)."""
    basis: Tensor
    """(K, 3, S, S) albedo directions (one unit of coefficient each)."""
    source: dict
    """What to record in the outputs: path, sha256, format, components used of those in the file."""

    @property
    def components(self) -> int:
        return self.basis.shape[0]

    def albedo(self, code: Tensor) -> Tensor:
        """(K,) coefficients -> (3, S, S) albedo."""
        return self.mean + torch.einsum("k,kchw->chw", code, self.basis)

    def to(self, device: torch.device) -> AlbedoModel:
        return AlbedoModel(self.mean.to(device), self.basis.to(device), self.source)


def bgr_images_to_rgb(flat: np.ndarray, side: int) -> Tensor:
    """(side*side*3, N) BGR images stored pixel by pixel -> (N, 3, side, side) RGB float32."""
    images = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32)).view(side, side, 3, -1)
    return images.flip(2).permute(3, 2, 0, 1).contiguous()


def resample(images: Tensor, size: int) -> Tensor:
    """(N, 3, s, s) -> (N, 3, size, size): area averaging down, bilinear up."""
    if images.shape[-1] == size:
        return images
    if size < images.shape[-1]:
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def albedo_model_path(path: str | Path) -> Path:
    """`path` as a Path when it names a file; TrackerError otherwise (checked before a run starts)."""
    path = Path(path)
    if not path.is_file():
        raise TrackerError(f"photometric.albedo_model: {path} not found")
    return path


def load_albedo_model(path: str | Path, size: int, components: int) -> AlbedoModel:
    """The albedo model in `path` (module docstring), its first `components` directions, at size x size
    texels; TrackerError (one line) for a file that is no such model."""
    path = albedo_model_path(path)
    arrays = read_npz(path, "albedo model")
    found = next((f for f in FORMATS if f[0] in arrays and f[1] in arrays), None)
    if found is None:
        raise TrackerError(f"{path}: not an albedo model: expected arrays mean + tex_dir (FLAME texture space) or "
                           f"MU + PC (FLAME albedo from BFM), found {sorted(arrays)}")
    mean_key, basis_key, scale, name = found
    mean, basis = arrays[mean_key].reshape(-1), arrays[basis_key]
    side = math.isqrt(mean.size // 3)
    if side < 2 or side * side * 3 != mean.size or basis.size % mean.size:
        raise TrackerError(f"{path}: {mean_key} must be a square RGB image (side*side*3 values) and {basis_key} "
                           f"hold whole images of it, got {arrays[mean_key].shape} and {basis.shape}")
    basis = basis.reshape(mean.size, -1)
    used = min(components, basis.shape[1])
    basis = basis[:, :used]
    if not (np.isfinite(mean).all() and np.isfinite(basis).all()):
        raise TrackerError(f"{path}: the albedo model holds non-finite values")
    mean_image = resample(bgr_images_to_rgb(mean[:, None], side), size)[0] * scale
    directions = resample(bgr_images_to_rgb(basis, side), size) * scale
    source = {"path": str(path), "sha256": file_sha256(path), "format": name, "components": used,
              "components_in_file": int(arrays[basis_key].reshape(mean.size, -1).shape[1])}
    return AlbedoModel(mean_image, directions, source)
