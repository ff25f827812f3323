"""Synthetic sequences with exact ground truth: script -> FLAME parameters -> rendered, degraded frames.

A sequence is written as two files side by side:

- `<name>.mp4`: the frames, losslessly encoded (H.264 RGB, qp 0), so the tracker sees exactly what was
  rendered;
- `<name>.gt.npz`: the ground truth in the tracker's own output format (tracker.io.export: shape, expr,
  jaw_pose, neck_pose, rotation, translation, eyes_pose, eyelids, K, R, t, image_size, fps, frame_index, ...;
  `read_params` loads it), plus what else the frames were made from: per-frame SH lighting `sh`, occluder
  ellipse `occluder_px` and colour `occluder_rgb`, `motion_blur_px`, `defocus_px`, `segment` (index into
  the spec's segments), and metadata with the spec, seed and texture file, marked {"synthetic": true} (which
  the tracker's evaluation-only DenseMarks oracle requires).

`render_frames(ground_truth, assets)` turns a ground truth back into the frames; it is what the generator
itself uses, so re-rendering a stored ground truth reproduces the video exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import torch
from scipy.spatial.transform import Rotation

from eval.synthetic.appearance import adjust_skin, photo_texture, procedural_background
from eval.synthetic.degrade import defocus, draw_occluder, motion_blur, sensor_noise, to_uint8
from eval.synthetic.render import TexturedHead, render_head, sh_from_light
from eval.synthetic.scenario import Script, SequenceSpec, build_script
from eval.synthetic.uvmap import UvAtlas, uv_atlas
from eval.tracked import camera_from_arrays, head_yaw_deg, params_from_arrays
from tracker.camera import Camera, focal_from_fov
from tracker.config import FlameConfig
from tracker.detect.base import SCHEME_IBUG68
from tracker.errors import TrackerError
from tracker.flame.assets import FlameBundle, load_flame_bundle
from tracker.flame.model import FlameParams
from tracker.io.export import FrameTable, flame_arrays, read_params
from tracker.render.texture import load_obj

GENERATOR_VERSION = 2
"""Bump when the frames a spec produces change: cached sequences and textures are keyed by it."""
TEXTURE_SIZE = 512
SUPERSAMPLE = 2
EXPOSURE = 0.3
"""Fraction of the frame interval the shutter is open: motion blur spans this much of the frame's motion."""
SHAPE_SIGMA = 0.7
"""Standard deviation of the random identity coefficients (FLAME's are unit variance)."""
OCCLUDER_COLOURS = np.array([[0.80, 0.60, 0.48], [0.55, 0.38, 0.28], [0.20, 0.22, 0.25], [0.70, 0.15, 0.12]])
"""Skin tones (a hand) and objects (a phone, a cup)."""
GT_SUFFIX = ".gt.npz"
GROUND_TRUTH_TOOLS = ("eval.synthetic", "eval.holdout")
"""Generators whose ground-truth files `load_ground_truth` reads (same format)."""


@dataclass
class SyntheticAssets:
    """What every sequence is made from: the FLAME model (68-landmark bundle), the UV atlas and a cache."""

    bundle: FlameBundle
    atlas: UvAtlas
    cache_dir: Path

    def texture(self, photo: int) -> np.ndarray:
        """(S, S, 3) float texture fitted from FFHQ photo `photo`, computed once and kept as PNG."""
        key = f"ffhq{photo:05d}_{self.atlas.size}_{self.bundle.model.sha256[:12]}_v{GENERATOR_VERSION}.png"
        path = self.cache_dir / "textures" / key
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            texture = photo_texture(self.bundle, self.atlas, photo)
            cv2.imwrite(str(path), cv2.cvtColor(to_uint8(texture), cv2.COLOR_RGB2BGR))
        # Always read back the PNG, so a fresh and a cached texture are the same 8-bit values.
        return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB).astype(np.float32) / 255


def load_assets(cache_dir: str | Path, flame_path: str | None = None,
                flame_assets: str | None = None) -> SyntheticAssets:
    """FLAME (with the tracker's default basis sizes), its UV atlas from head_template.obj, and a cache folder."""
    defaults = FlameConfig()
    bundle = load_flame_bundle(flame_path, flame_assets, defaults.n_shape, defaults.n_expr, SCHEME_IBUG68)
    atlas = uv_atlas(load_obj(bundle.assets_dir / "head_template.obj"), TEXTURE_SIZE)
    return SyntheticAssets(bundle, atlas, Path(cache_dir))


@dataclass
class GroundTruth:
    """Everything a synthetic sequence's T frames are rendered from."""

    spec: SequenceSpec
    params: FlameParams
    camera: Camera
    sh: np.ndarray
    """(T, 9, 3) lighting in camera coordinates."""
    occluder_px: np.ndarray
    """(T, 6) visible, centre x, y, radii x, y (pixels), angle (degrees)."""
    occluder_rgb: np.ndarray
    """(3,) occluder colour."""
    motion_blur_px: np.ndarray
    """(T, 2) image displacement of the face during the exposure."""
    defocus_px: np.ndarray
    """(T,) Gaussian blur sigma."""
    segment: np.ndarray
    """(T,) segment index of each frame."""

    @property
    def n_frames(self) -> int:
        return self.params.batch_size

    @property
    def static(self) -> np.ndarray:
        """(T,) bool: frames of static segments."""
        kinds = np.array([s.kind for s in self.spec.segments])
        return kinds[self.segment] == "static"

    def static_segments(self) -> list[tuple[int, int]]:
        """Half-open [start, stop) frame ranges of the static segments."""
        bounds = np.cumsum([0] + [s.frames for s in self.spec.segments])
        return [(int(bounds[i]), int(bounds[i + 1])) for i, s in enumerate(self.spec.segments) if s.kind == "static"]

    @property
    def yaw_deg(self) -> np.ndarray:
        """(T,) head yaw (global and neck rotation), the tracker's definition."""
        return head_yaw_deg(self.params)


def euler_to_axis_angle(yaw_pitch_roll_deg: np.ndarray) -> np.ndarray:
    """(T, 3) degrees, R = Ry(yaw) Rx(pitch) Rz(roll) -> (T, 3) axis-angle."""
    return Rotation.from_euler("YXZ", yaw_pitch_roll_deg, degrees=True).as_rotvec()


def script_params(script: Script, shape: np.ndarray) -> FlameParams:
    """FLAME parameters of every frame of a script. shape: (n_shape,) identity."""
    T = len(script.pose)
    gaze = euler_to_axis_angle(np.stack([script.gaze[:, 0], script.gaze[:, 1], np.zeros(T)], axis=1))
    to = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)
    return FlameParams(
        shape=to(shape[None]), expr=to(script.expr), rotation=to(euler_to_axis_angle(script.pose[:, :3])),
        neck_pose=torch.zeros(T, 3), jaw_pose=to(np.stack([script.jaw_open, np.zeros(T), np.zeros(T)], 1)),
        eyes_pose=to(np.concatenate([gaze, gaze], axis=1)), eyelids=to(script.eyelids),
        translation=to(script.pose[:, 3:]),
    )


def light_sh(light: np.ndarray) -> np.ndarray:
    """(T, 7) ambient, strength, azimuth, elevation (degrees), tint -> (T, 9, 3) SH in camera coordinates."""
    azimuth, elevation = np.radians(light[:, 2]), np.radians(light[:, 3])
    # Towards the light, camera axes (x right, y down, z forward): azimuth turns right, elevation up.
    direction = np.stack([np.sin(azimuth) * np.cos(elevation), -np.sin(elevation),
                          -np.cos(azimuth) * np.cos(elevation)], axis=1)
    return np.stack([sh_from_light(float(a), float(s), torch.from_numpy(d), torch.from_numpy(tint)).numpy()
                     for a, s, d, tint in zip(light[:, 0], light[:, 1], direction, light[:, 4:], strict=True)])


@torch.no_grad()
def build_ground_truth(spec: SequenceSpec, assets: SyntheticAssets) -> GroundTruth:
    """Script the sequence and derive the per-frame image-space quantities (occluder, motion blur)."""
    model = assets.bundle.model
    script = build_script(spec, model.expression_names, model.n_expr)
    rng = np.random.default_rng([spec.seed, 1])
    shape = rng.normal(0.0, SHAPE_SIGMA, model.n_shape)
    params = script_params(script, shape)
    size = spec.image_size
    camera = Camera.from_image(size, size, spec.fov_deg, focal_from_fov(spec.fov_deg, size))
    vertices = model(params).vertices
    face = torch.as_tensor(assets.bundle.masks["face"])
    face_px = camera.project(vertices[:, face])[0].numpy()  # (T, K, 2)
    centre = face_px.mean(1)
    width = face_px[..., 0].max(1) - face_px[..., 0].min(1)
    velocity = np.diff(centre, axis=0, prepend=centre[:1])
    occluder_px = np.zeros((len(centre), 6))
    rel = script.occluder
    occluder_px[:, 0] = rel[:, 0]
    occluder_px[:, 1] = centre[:, 0] + rel[:, 1] * width
    occluder_px[:, 2] = centre[:, 1] + rel[:, 2] * width
    occluder_px[:, 3] = rel[:, 3] * width * 0.6
    occluder_px[:, 4] = rel[:, 3] * width
    occluder_px[:, 5] = 20.0 * np.sign(rel[:, 1])
    return GroundTruth(
        spec=spec, params=params, camera=camera, sh=light_sh(script.light).astype(np.float32),
        occluder_px=occluder_px.astype(np.float32), occluder_rgb=OCCLUDER_COLOURS[rng.integers(len(OCCLUDER_COLOURS))],
        motion_blur_px=(EXPOSURE * velocity).astype(np.float32),
        defocus_px=rng.uniform(0.0, 0.7, len(centre)).astype(np.float32), segment=script.segment,
    )


@torch.no_grad()
def sequence_texture(assets: SyntheticAssets, photo: int, seed: int) -> np.ndarray:
    """(S, S, 3) float albedo texture a sequence's head is rendered with: its photo's, skin adjusted by its
    seed."""
    return adjust_skin(assets.texture(photo), np.random.default_rng([seed, 2]))


def render_frames(gt: GroundTruth, assets: SyntheticAssets) -> Iterator[np.ndarray]:
    """The sequence's frames, (H, W, 3) uint8 RGB, in order."""
    spec = gt.spec
    texture = sequence_texture(assets, spec.photo, spec.seed)
    head = TexturedHead(assets.atlas.faces, assets.atlas.corner_uvs, torch.from_numpy(texture).permute(2, 0, 1))
    background = procedural_background(np.random.default_rng([spec.seed, 3]), gt.camera.height, gt.camera.width)
    vertices = assets.bundle.model(gt.params).vertices
    for t in range(gt.n_frames):
        rendering = render_head(head, vertices[t], gt.camera, torch.from_numpy(gt.sh[t]), SUPERSAMPLE)
        image = rendering.image.numpy() + (1 - rendering.coverage.numpy()[..., None]) * background
        image = draw_occluder(image.astype(np.float32), gt.occluder_px[t], gt.occluder_rgb)
        image = defocus(motion_blur(image, gt.motion_blur_px[t]), float(gt.defocus_px[t]))
        yield to_uint8(sensor_noise(image, spec.noise_sigma, np.random.default_rng([spec.seed, 4, t])))


def write_video(path: Path, frames: Iterator[np.ndarray], fps: float) -> int:
    """Encode RGB frames losslessly (H.264 RGB, qp 0); returns the number of frames."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial" + path.suffix)
    count = 0
    with av.open(str(partial), mode="w") as container:
        stream = container.add_stream("libx264rgb", rate=Fraction(fps).limit_denominator(1001))
        stream.pix_fmt = "rgb24"
        stream.options = {"qp": "0", "preset": "veryfast"}
        for frame in frames:
            if count == 0:
                stream.height, stream.width = frame.shape[:2]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            count += 1
        container.mux(stream.encode())
    os.replace(partial, path)
    return count


def spec_key(spec: SequenceSpec, assets: SyntheticAssets) -> str:
    """Identifies the frames a spec renders to (spec, generator version, FLAME file)."""
    text = json.dumps([spec.to_dict(), GENERATOR_VERSION, assets.bundle.model.sha256], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_ground_truth(path: Path, gt: GroundTruth, key: str, extra_arrays: dict[str, np.ndarray] | None = None,
                      extra_metadata: dict | None = None) -> None:
    """Write the ground truth; another generator (eval.holdout) adds its own arrays and metadata (its "tool"
    among GROUND_TRUTH_TOOLS)."""
    T = gt.n_frames
    table = FrameTable(gt.params, np.arange(T), np.arange(T) / gt.spec.fps, np.ones(T, bool), np.zeros(T, np.float32))
    arrays = flame_arrays(table, gt.camera, gt.spec.fps)
    arrays.update(sh=gt.sh, occluder_px=gt.occluder_px, occluder_rgb=gt.occluder_rgb,
                  motion_blur_px=gt.motion_blur_px, defocus_px=gt.defocus_px, segment=gt.segment)
    arrays.update(extra_arrays or {})
    metadata = {"tool": "eval.synthetic", "synthetic": True, "generator_version": GENERATOR_VERSION, "key": key,
                "spec": gt.spec.to_dict(), "texture": f"FFHQ {gt.spec.photo:05d}", **(extra_metadata or {})}
    arrays["metadata"] = np.array(json.dumps(metadata))
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **arrays)
    os.replace(partial, path)


def load_ground_truth(path: str | Path) -> GroundTruth:
    """A ground truth written by `generate_sequence`."""
    path = Path(path)
    if not path.is_file():
        raise TrackerError(f"ground truth {path} not found (generate it with eval.synthetic)")
    arrays, metadata = read_params(path)
    if metadata.get("tool") not in GROUND_TRUTH_TOOLS:
        raise TrackerError(f"{path} is not a synthetic ground truth written by {' or '.join(GROUND_TRUTH_TOOLS)}")
    try:
        params = params_from_arrays(arrays, arrays["shape"].size, arrays["expr"].shape[1])
        return GroundTruth(
            spec=SequenceSpec.from_dict(metadata["spec"]), params=params, camera=camera_from_arrays(arrays),
            sh=arrays["sh"], occluder_px=arrays["occluder_px"], occluder_rgb=arrays["occluder_rgb"],
            motion_blur_px=arrays["motion_blur_px"], defocus_px=arrays["defocus_px"], segment=arrays["segment"],
        )
    except (KeyError, IndexError, ValueError, TypeError) as error:
        raise TrackerError(f"{path} is a damaged ground truth ({type(error).__name__}: {str(error)[:100]}): "
                           "delete it to generate it again") from None


@dataclass(frozen=True)
class SyntheticSequence:
    """A generated sequence on disk."""

    name: str
    video: Path
    ground_truth: Path


def _stored_key(gt_path: Path) -> str | None:
    """The cache key a stored ground truth was generated under; None when it is unreadable (generated again)."""
    try:
        return read_params(gt_path)[1].get("key")
    except TrackerError:
        return None


def generate_sequence(spec: SequenceSpec, assets: SyntheticAssets, out_dir: str | Path) -> SyntheticSequence:
    """Write `<name>.mp4` and `<name>.gt.npz` into out_dir; an identical existing pair is reused."""
    out_dir = Path(out_dir)
    video, gt_path = out_dir / f"{spec.name}.mp4", out_dir / f"{spec.name}{GT_SUFFIX}"
    key = spec_key(spec, assets)
    if video.is_file() and gt_path.is_file() and _stored_key(gt_path) == key:
        return SyntheticSequence(spec.name, video, gt_path)
    gt = build_ground_truth(spec, assets)
    write_video(video, render_frames(gt, assets), spec.fps)
    save_ground_truth(gt_path, gt, key)
    return SyntheticSequence(spec.name, video, gt_path)
