"""Photometric consistency of a track: unwrap the frames onto the tracked mesh, re-render, compare.

The tracked mesh of some frames is unwrapped into one UV texture (visibility- and angle-weighted mean of the
colours each texel shows). Each evaluated frame is then re-rendered with that texture (unlit: shading is
baked into it) and compared with the real frame by PSNR and SSIM inside the rendered face region. A good
track pins every texel to the same skin point in every frame, so the texture is sharp and re-renders match;
drift, jitter and misfits blur the texture and misplace it. The measure needs no appearance model from the
tracker and works the same on synthetic and real videos.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from eval.metrics import psnr, ssim
from eval.synthetic.render import TexturedHead, faces_in_region, region_mask, render_head, unlit_sh
from eval.synthetic.uvmap import UvAtlas, push_pull_fill, scaled_camera, unwrap_image
from tracker.camera import Camera
from tracker.fit.sequence import evenly_spaced


@dataclass(frozen=True)
class PhotometricOptions:
    """texture_frames: frames unwrapped into the texture (evenly spread); eval_frames: frames scored."""

    texture_frames: int = 16
    eval_frames: int = 32
    resolution: int = 256
    """Longer image side the comparison runs at (frames and camera are scaled down to it, never up)."""
    min_mask_pixels: int = 200
    """Frames whose face region covers fewer pixels are not scored."""


@torch.no_grad()
def unwrap_texture(atlas: UvAtlas, vertices: torch.Tensor, camera: Camera,
                   frames: Sequence[np.ndarray]) -> torch.Tensor:
    """(3, S, S) mean texture of RGB uint8 frames seen through per-frame vertices (B, V, 3)."""
    total = torch.zeros(len(atlas.texel), 3)
    weight = torch.zeros(len(atlas.texel))
    for verts, frame in zip(vertices, frames, strict=True):
        colors, w = unwrap_image(atlas, verts, camera, torch.from_numpy(frame).float() / 255)
        total += colors * w[:, None]
        weight += w
    texture = atlas.to_image(total / weight.clamp(min=1e-6)[:, None]).numpy()
    filled = push_pull_fill(texture, atlas.to_image(weight[:, None])[..., 0].numpy())
    return torch.from_numpy(filled).permute(2, 0, 1).contiguous()


@torch.no_grad()
def photometric_scores(atlas: UvAtlas, vertices: torch.Tensor, camera: Camera, frames: dict[int, np.ndarray],
                       usable: np.ndarray, face_vertex_ids: np.ndarray,
                       options: PhotometricOptions) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame PSNR (dB) and SSIM in the face region, at `options.resolution`; NaN for frames not scored.

    vertices: (T, V, 3) tracked world vertices; frames: {row t: RGB uint8 frame} holding at least the rows
    `frames_needed` asks for; usable: (T,) bool rows the tracker fitted.
    """
    T = len(usable)
    texture_rows, eval_rows = frames_needed(usable, options)
    scale = min(1.0, options.resolution / max(camera.height, camera.width))
    camera = scaled_camera(camera, scale)
    frames = {t: cv2.resize(f, (camera.width, camera.height), interpolation=cv2.INTER_AREA) if scale < 1 else f
              for t, f in frames.items()}
    texture = unwrap_texture(atlas, vertices[texture_rows], camera, [frames[t] for t in texture_rows])
    head = TexturedHead(atlas.faces, atlas.corner_uvs, texture)
    face_faces = faces_in_region(atlas.faces, face_vertex_ids)
    psnr_values, ssim_values = np.full(T, np.nan), np.full(T, np.nan)
    for t in eval_rows:
        rendering = render_head(head, vertices[t], camera, unlit_sh()[0], supersample=1)
        mask = region_mask(rendering.triangle_id, face_faces).numpy()
        if mask.sum() < options.min_mask_pixels:
            continue
        target = frames[t].astype(np.float32) / 255
        psnr_values[t] = psnr(rendering.image.numpy(), target, mask)
        ssim_values[t] = ssim(rendering.image.numpy(), target, mask)
    return psnr_values, ssim_values


def frames_needed(usable: np.ndarray, options: PhotometricOptions) -> tuple[np.ndarray, np.ndarray]:
    """Rows unwrapped into the texture and rows scored, both among the usable ones."""
    rows = np.flatnonzero(usable)
    return evenly_spaced(rows, options.texture_frames), evenly_spaced(rows, options.eval_frames)
