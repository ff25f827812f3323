"""A sequence's appearance on disk (albedo texture or vertex colours, and SH lighting) and the photometric
overlay: the textured, lit mesh blended over a frame.

Files: texture.png (8-bit RGB in FLAME's UV layout as in head_template.obj, first row at v = 1) or
vertex_colors.npy ((V, 3) float32), and lighting.json (the 9 x 3 SH coefficients and their convention).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from tracker.camera import Camera
from tracker.energy.photometric import Appearance, RegionMesh
from tracker.errors import MissingAssetError, TrackerError
from tracker.fit.photometric import render_frames
from tracker.flame.model import FlameParams
from tracker.render.shading import sh_basis

TEXTURE_FILE = "texture.png"
VERTEX_COLORS_FILE = "vertex_colors.npy"
LIGHTING_FILE = "lighting.json"
SH_BASIS_NAMES = ("1", "x", "y", "z", "x*y", "x*z", "y*z", "x^2 - y^2", "3*z^2 - 1")


def sh_basis_constants() -> list[float]:
    """The constant c_k multiplying each basis polynomial in `shading.sh_basis`, read off at a unit normal
    where no polynomial vanishes."""
    x, y, z = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) / math.sqrt(14.0)
    polynomials = torch.stack([torch.ones_like(x), x, y, z, x * y, x * z, y * z, x * x - y * y, 3 * z * z - 1])
    return (sh_basis(torch.stack([x, y, z])) / polynomials).tolist()


def lighting_document(sh: Tensor) -> dict:
    """lighting.json contents: coefficients (9 rows of RGB) and how to evaluate them."""
    return {
        "sh_coefficients": sh.detach().cpu().double().tolist(),
        "basis": list(SH_BASIS_NAMES),
        "basis_constants": sh_basis_constants(),
        "shading": "shading_c(n) = sum_k sh_coefficients[k][c] * basis_constants[k] * basis[k](n) for colour "
                   "channel c; rendered colour = albedo * shading (Lambertian, irradiance form)",
        "normal_frame": "OpenCV camera coordinates (x right, y down, z forward); n is the outward unit normal, "
                        "so a surface facing the camera has n_z < 0",
        "dc_convention": "sh_coefficients[0] is fixed to 1 / basis_constants[0] (shading 1 under uniform light): "
                         "the albedo carries colour and brightness",
    }


def write_appearance(folder: str | Path, appearance: Appearance) -> dict[str, Path]:
    """Write texture.png (or vertex_colors.npy) and lighting.json into folder; returns {kind: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {"lighting": folder / LIGHTING_FILE}
    written["lighting"].write_text(json.dumps(lighting_document(appearance.sh), indent=2))
    if appearance.texture is not None:
        rgb = (appearance.texture.detach().clamp(0.0, 1.0) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        written["texture"] = folder / TEXTURE_FILE
        if not cv2.imwrite(str(written["texture"]), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise TrackerError(f"could not write {written['texture']}")
    else:
        written["vertex_colors"] = folder / VERTEX_COLORS_FILE
        np.save(written["vertex_colors"], appearance.vertex_colors.detach().cpu().numpy().astype(np.float32))
    return written


def read_appearance(folder: str | Path, corner_uvs: Tensor | None = None,
                    device: torch.device | str = "cpu") -> Appearance:
    """Read what `write_appearance` wrote. corner_uvs (F, 3, 2) are needed to use a texture."""
    folder = Path(folder)
    lighting = folder / LIGHTING_FILE
    if not lighting.is_file():
        raise MissingAssetError(f"{lighting} not found: point to a folder written by the photometric stage")
    try:
        sh = torch.tensor(json.loads(lighting.read_text())["sh_coefficients"], dtype=torch.float32, device=device)
    except (ValueError, KeyError) as error:
        raise TrackerError(f"{lighting} is not a lighting file of the tracker ({error})") from None
    if sh.shape != (9, 3):
        raise TrackerError(f"{lighting}: expected 9 x 3 SH coefficients, got {tuple(sh.shape)}")
    texture_path = folder / TEXTURE_FILE
    if texture_path.is_file():
        bgr = cv2.imread(str(texture_path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise TrackerError(f"{texture_path} is not a readable image")
        texture = torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).to(device).permute(2, 0, 1).float() / 255
        return Appearance(sh, texture=texture, corner_uvs=corner_uvs)
    colors_path = folder / VERTEX_COLORS_FILE
    if not colors_path.is_file():
        raise MissingAssetError(f"neither {TEXTURE_FILE} nor {VERTEX_COLORS_FILE} found in {folder}")
    return Appearance(sh, vertex_colors=torch.from_numpy(np.load(colors_path)).to(device))


def draw_appearance(frame: np.ndarray, appearance: Appearance, mesh: RegionMesh, camera: Camera,
                    params: FlameParams, alpha: float = 0.8, backend: str = "torch") -> np.ndarray:
    """The `photometric` overlay: the textured, lit mesh blended over an RGB uint8 frame (H, W, 3) of the
    video. params: one frame (B = 1); mesh: what to draw (e.g. region_mesh(model, masks, ["all"]))."""
    height, width = frame.shape[:2]
    image, mask = render_frames(appearance, mesh, camera, params, (height, width), 1.0, backend)
    weight = (mask[0].float() * alpha).unsqueeze(-1).cpu().numpy()
    blended = frame.astype(np.float32) * (1.0 - weight) + image[0].cpu().numpy() * 255.0 * weight
    return np.rint(blended).clip(0, 255).astype(np.uint8)
