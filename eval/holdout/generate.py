"""Rendering the hold-out sequences with eval.holdout.raster (not the tracker's renderer) and writing them in
eval.synthetic's format: `<name>.mp4` (lossless H.264 RGB) and `<name>.gt.npz` (GroundTruth, read by
eval.synthetic.generate.load_ground_truth), cached by a key of the spec, the generator version and the FLAME
file.

A frame: the FLAME mesh (the stand-in by default) rasterised with a z-buffer, textured through
head_template.obj's UVs with a face texture made from an FFHQ photo (eval.synthetic.appearance, shared with
eval.synthetic), Lambert + ambient light, over a plain background with soft low-frequency noise; a hand drawn in
front where the script has one; a slight optical blur and sensor noise.
Ground-truth extras: `occluder_px` holds the hand's palm ellipse (fingers and thumb reach beyond it) and `hand`
the script's hand parameters; `defocus_px` the optical blur; no motion blur.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from eval.holdout.raster import Light, UvMesh, rasterize, read_uv_mesh, shade
from eval.holdout.scenes import SEGMENT_KIND, HoldoutScript, HoldoutSpec, build_script, hand_alpha
from eval.synthetic.degrade import to_uint8
from eval.synthetic.generate import (
    GT_SUFFIX,
    GroundTruth,
    SyntheticAssets,
    SyntheticSequence,
    euler_to_axis_angle,
    light_sh,
    load_assets,
    save_ground_truth,
    sequence_texture,
    write_video,
)
from eval.synthetic.scenario import Segment, SequenceSpec
from tracker.camera import Camera, to_camera
from tracker.errors import TrackerError
from tracker.flame.model import FlameModel, FlameParams
from tracker.io.export import read_params

HOLDOUT_VERSION = 2
"""Bump when the frames a spec produces change: cached sequences are keyed by it."""
SKIN_TONES = np.array([[0.86, 0.67, 0.56], [0.45, 0.30, 0.22]])
"""Hand colour range, light to dark."""


@dataclass
class HoldoutAssets:
    """The FLAME model and textures (eval.synthetic's assets) and the UV mesh this renderer reads itself."""

    synthetic: SyntheticAssets
    uv_mesh: UvMesh

    @property
    def model(self) -> FlameModel:
        return self.synthetic.bundle.model


def load_holdout_assets(cache_dir: str | Path, flame_path: str | None = None,
                        flame_assets: str | None = None) -> HoldoutAssets:
    synthetic = load_assets(cache_dir, flame_path, flame_assets)
    uv_mesh = read_uv_mesh(synthetic.bundle.assets_dir / "head_template.obj")
    if not np.array_equal(uv_mesh.faces, synthetic.bundle.model.faces.numpy()):
        raise TrackerError("head_template.obj's triangles differ from the FLAME model's: wrong assets folder?")
    return HoldoutAssets(synthetic, uv_mesh)


def script_params(script: HoldoutScript) -> FlameParams:
    """FLAME parameters of every frame (eyelid blendshapes stay 0: blinks use the eyelid expressions)."""
    T = len(script.pose)
    gaze = euler_to_axis_angle(np.stack([script.gaze[:, 0], script.gaze[:, 1], np.zeros(T)], axis=1))
    to = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)
    return FlameParams(
        shape=to(script.shape[None]), expr=to(script.expr), rotation=to(euler_to_axis_angle(script.pose[:, :3])),
        neck_pose=torch.zeros(T, 3), jaw_pose=to(np.stack([script.jaw_open, np.zeros(T), np.zeros(T)], 1)),
        eyes_pose=to(np.concatenate([gaze, gaze], axis=1)), eyelids=torch.zeros(T, 2),
        translation=to(script.pose[:, 3:]))


def sequence_spec(spec: HoldoutSpec) -> SequenceSpec:
    """The eval.synthetic spec recorded in the ground truth (segments: the still frames, then the motion)."""
    segments = ((Segment("static", spec.still_frames),) if spec.still_frames else ()) + \
        (Segment(SEGMENT_KIND[spec.kind], spec.frames - spec.still_frames),)
    fov = float(np.degrees(2 * np.arctan(spec.image_size / 2 / spec.focal_px)))
    return SequenceSpec(spec.name, segments, photo=spec.photo, seed=spec.seed, image_size=spec.image_size,
                        fps=spec.fps, fov_deg=fov, distance_m=spec.distance_m, noise_sigma=spec.noise_sigma)


def light_of(script: HoldoutScript) -> Light:
    ambient, diffuse, azimuth, elevation = script.light[:4]
    az, el = np.radians(azimuth), np.radians(elevation)
    # Towards the light, camera axes (x right, y down, z forward): azimuth turns right, elevation up.
    direction = np.array([np.sin(az) * np.cos(el), -np.sin(el), -np.cos(az) * np.cos(el)])
    return Light(direction, float(ambient), float(diffuse))


@torch.no_grad()
def build_ground_truth(spec: HoldoutSpec, assets: HoldoutAssets) -> tuple[GroundTruth, HoldoutScript]:
    model = assets.model
    script = build_script(spec, model.expression_names, model.n_shape)
    params = script_params(script)
    camera = Camera.from_image(spec.image_size, spec.image_size, focal=spec.focal_px)
    face = torch.as_tensor(assets.synthetic.bundle.masks["face"])
    face_px = camera.project(model(params).vertices[:, face])[0].numpy()
    centre, width = face_px.mean(1), face_px[..., 0].max(1) - face_px[..., 0].min(1)
    hand = script.hand
    palm = 0.5 * hand[:, 3] * width
    occluder = np.stack([hand[:, 0], centre[:, 0] + hand[:, 1] * width, centre[:, 1] + hand[:, 2] * width,
                         0.85 * palm, palm, hand[:, 4]], axis=1)
    T, recorded = spec.frames, sequence_spec(spec)
    light = np.repeat(np.r_[script.light[:4], 1.0, 1.0, 1.0][None], T, 0)  # white light
    tone = script.light[4]
    gt = GroundTruth(spec=recorded, params=params, camera=camera, sh=light_sh(light).astype(np.float32),
                     occluder_px=occluder.astype(np.float32),
                     occluder_rgb=(1 - tone) * SKIN_TONES[0] + tone * SKIN_TONES[1],
                     motion_blur_px=np.zeros((T, 2), np.float32),
                     defocus_px=np.full(T, spec.blur_sigma_px, np.float32),
                     segment=np.repeat(np.arange(len(recorded.segments)), [s.frames for s in recorded.segments]))
    return gt, script


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(S, S, 3): a plain wall colour with a gentle gradient and soft low-frequency noise."""
    colour = rng.uniform(0.2, 0.8, 3)
    ys = np.linspace(-0.5, 0.5, size)[:, None, None]
    blotches = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), size / 20)
    blotches = blotches / max(float(np.abs(blotches).max()), 1e-6)
    return np.clip(colour * (1 + 0.15 * ys) * (1 + 0.08 * blotches[..., None]), 0, 1)


def draw_hand(image: np.ndarray, occluder: np.ndarray, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Composite the hand whose palm ellipse is `occluder` (visible, cx, cy, rx, ry, angle): lit from above,
    with a faint skin texture."""
    visible, cx, cy, _, ry, angle = occluder
    if visible < 0.5:
        return image
    height, width = image.shape[:2]
    alpha = hand_alpha(height, width, np.array([cx, cy]), 2 * ry, angle)[..., None]
    shading = np.clip(1.05 - 0.25 * (np.arange(height) + 0.5 - cy) / max(ry, 1.0), 0.7, 1.1)[:, None, None]
    grain = 1 + 0.03 * cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 1.0)
    return image * (1 - alpha) + rgb * shading * grain[..., None] * alpha


@torch.no_grad()
def render_frames(gt: GroundTruth, script: HoldoutScript, spec: HoldoutSpec, assets: HoldoutAssets,
                  progress: bool = False) -> Iterator[np.ndarray]:
    """The sequence's frames, (H, W, 3) uint8 RGB, in order."""
    texture = sequence_texture(assets.synthetic, spec.photo, spec.seed)
    backdrop = background(np.random.default_rng([spec.seed, 3]), spec.image_size)
    vertices = assets.model(gt.params).vertices
    mesh, light, size = assets.uv_mesh, light_of(script), spec.image_size
    for t in tqdm(range(gt.n_frames), desc=f"render {spec.name}", unit="frame", disable=not progress):
        pixels, depth = gt.camera.project(vertices[t])
        fragments = rasterize(torch.cat([pixels, depth[:, None]], 1).numpy(), mesh.faces, size, size)
        image = shade(fragments, to_camera(vertices[t]).numpy(), mesh.faces, mesh.corner_uvs, texture, light)
        image = np.where(fragments.mask[..., None], image, backdrop)
        image = draw_hand(image, gt.occluder_px[t], gt.occluder_rgb, np.random.default_rng([spec.seed, 5, t]))
        image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), spec.blur_sigma_px)
        noise = np.random.default_rng([spec.seed, 4, t]).normal(0.0, spec.noise_sigma / 255.0, image.shape)
        yield to_uint8(image + noise)


def spec_key(spec: HoldoutSpec, assets: HoldoutAssets) -> str:
    text = json.dumps([spec.to_dict(), HOLDOUT_VERSION, assets.model.sha256], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def generate_holdout(spec: HoldoutSpec, assets: HoldoutAssets, out_dir: str | Path,
                     progress: bool = False) -> SyntheticSequence:
    """Write `<name>.mp4` and `<name>.gt.npz` into out_dir; an identical existing pair is reused."""
    out_dir = Path(out_dir)
    video, gt_path = out_dir / f"{spec.name}.mp4", out_dir / f"{spec.name}{GT_SUFFIX}"
    key = spec_key(spec, assets)
    if video.is_file() and gt_path.is_file() and read_params(gt_path)[1].get("key") == key:
        return SyntheticSequence(spec.name, video, gt_path)
    gt, script = build_ground_truth(spec, assets)
    write_video(video, render_frames(gt, script, spec, assets, progress), spec.fps)
    save_ground_truth(gt_path, gt, key, {"hand": script.hand.astype(np.float32)},
                      {"tool": "eval.holdout", "holdout_version": HOLDOUT_VERSION, "holdout_spec": spec.to_dict()})
    return SyntheticSequence(spec.name, video, gt_path)
