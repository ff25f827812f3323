"""Scripts of the synthetic sequences: what the head, face, eyes, light and occluders do in every frame.

A sequence is a list of segments, each of one kind:

- static: nothing moves (the frames differ only by sensor noise): the jitter test.
- turn: yaw sweep to +max_yaw, over to -max_yaw and back (profile views at 90 degrees).
- nod: pitch sweep to +max_pitch, -max_pitch and back.
- fast: straight moves between random poses every few frames (up to ~10 degrees per frame), motion-blurred.
- talk: jaw and mouth expressions at syllable rate, blinks, gaze shifts, mild head motion.
- occlusion: mild motion and talking while an object (hand-like ellipse) sweeps across the lower face.
- lighting: mild motion while the light swings around the head and changes strength and colour.

Everything is drawn from one seeded numpy Generator, so a spec and its seed fix the sequence. Poses are
Euler angles in degrees (yaw about FLAME's up axis y, pitch about x, roll about z; R = Ry Rx Rz) plus a world
translation; the camera sits at the origin looking down -z (tracker.camera).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter1d

SEGMENT_KINDS = ("static", "turn", "nod", "fast", "talk", "occlusion", "lighting")
BLINK_FRAMES = 5
"""Frames of one blink (close and open)."""
BLINK_EVERY_S = 2.5
"""Mean time between blinks."""
FAST_KEY_FRAMES = 5
"""Frames between the random poses of a fast segment (up to ~10 degrees per frame)."""
MAX_GAZE_DEG = 15.0
"""Largest eyeball rotation away from straight ahead."""
SYLLABLE_HZ = 4.0
"""Jaw opening rate while talking."""
TALK_EXPRESSIONS = ("mouthSmile_L", "mouthSmile_R", "mouthFunnel", "mouthPucker", "mouthStretch_L",
                    "mouthStretch_R", "mouthRollLower", "browInnerUp_L", "browInnerUp_R", "mouthUpperUp_L",
                    "mouthUpperUp_R")
"""ARKit-style blendshapes animated while talking, when the FLAME file names its expressions."""
PCA_TALK_COMPONENTS = 10
"""Expression components animated while talking for PCA expression spaces (official FLAME)."""


@dataclass(frozen=True)
class Segment:
    kind: str
    frames: int

    def __post_init__(self) -> None:
        if self.kind not in SEGMENT_KINDS:
            raise ValueError(f"unknown segment kind {self.kind!r} (known: {', '.join(SEGMENT_KINDS)})")
        if self.frames < 1:
            raise ValueError(f"segment {self.kind} needs at least one frame")


@dataclass(frozen=True)
class SequenceSpec:
    """One synthetic sequence: its script, person (texture photo), camera and seed."""

    name: str
    segments: tuple[Segment, ...]
    photo: int = 2
    """FFHQ photo the face texture is fitted from (shared/data/images/FFHQ/<photo>.png)."""
    seed: int = 0
    image_size: int = 512
    fps: float = 25.0
    fov_deg: float = 30.0
    distance_m: float = 0.8
    """Distance of the head from the camera."""
    max_yaw_deg: float = 90.0
    max_pitch_deg: float = 40.0
    noise_sigma: float = 2.5
    """Sensor noise, standard deviation in 8-bit levels."""

    @property
    def n_frames(self) -> int:
        return sum(s.frames for s in self.segments)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(values: dict) -> SequenceSpec:
        segments = tuple(Segment(**s) for s in values["segments"])
        return SequenceSpec(**{**values, "segments": segments})


@dataclass
class Script:
    """Per-frame ground truth of everything that changes over T frames."""

    pose: np.ndarray
    """(T, 6) yaw, pitch, roll (degrees) and translation x, y, z (metres)."""
    jaw_open: np.ndarray
    """(T,) jaw rotation about the x axis, radians (positive opens)."""
    expr: np.ndarray
    """(T, n_expr) expression coefficients."""
    gaze: np.ndarray
    """(T, 2) yaw and pitch of both eyeballs, degrees."""
    eyelids: np.ndarray
    """(T, 2) eyelid closing, 0 open .. 1 closed."""
    light: np.ndarray
    """(T, 7) ambient, directional strength, direction azimuth and elevation (degrees), tint r, g, b."""
    occluder: np.ndarray
    """(T, 4) visible (0/1), horizontal and vertical offset from the nose in face widths, size in face widths."""
    segment: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """(T,) index of each frame's segment in the spec."""


def cosine_keys(keys: np.ndarray, n: int) -> np.ndarray:
    """(K, D) key values spread evenly over n frames, eased (cosine) between keys -> (n, D)."""
    s = np.linspace(0.0, len(keys) - 1, n)
    k = np.minimum(s.astype(int), len(keys) - 2)
    w = (1 - np.cos(np.pi * (s - k))) / 2
    return keys[k] * (1 - w[:, None]) + keys[k + 1] * w[:, None]


def smooth_noise(rng: np.random.Generator, n: int, dims: int, sigma_frames: float) -> np.ndarray:
    """(n, dims) smooth random signals of unit standard deviation starting at 0."""
    white = rng.normal(size=(n + 6 * int(sigma_frames), dims))
    smooth = gaussian_filter1d(white, sigma_frames, axis=0)[3 * int(sigma_frames):][:n]
    smooth = smooth / max(smooth.std(), 1e-9)
    return smooth - smooth[:1]


def head_motion(kind: str, n: int, start: np.ndarray, spec: SequenceSpec, rng: np.random.Generator) -> np.ndarray:
    """(n, 6) pose of one segment that begins at `start` (6,)."""
    if kind == "static":
        return np.repeat(start[None], n, 0)
    if kind in ("turn", "nod"):
        axis, limit = (0, spec.max_yaw_deg) if kind == "turn" else (1, spec.max_pitch_deg)
        keys = np.repeat(start[None], 4, 0)
        keys[1, axis], keys[2, axis] = limit, -limit
        keys[1:3, 2] += rng.uniform(-5, 5, 2)  # a little roll, as people do
        return cosine_keys(keys, n)
    if kind == "fast":
        n_keys = max(2, n // FAST_KEY_FRAMES + 1)
        keys = start + np.concatenate([rng.uniform(-1, 1, (n_keys, 3)) * [25, 12, 6],
                                       rng.uniform(-1, 1, (n_keys, 3)) * [0.02, 0.015, 0.03]], axis=1)
        keys[0] = start
        s = np.linspace(0, n_keys - 1, n)  # straight lines between keys: sudden starts and stops
        k = np.minimum(s.astype(int), n_keys - 2)
        return keys[k] + (keys[k + 1] - keys[k]) * (s - k)[:, None]
    # talk, occlusion, lighting: a person moving a little while speaking
    drift = smooth_noise(rng, n, 6, sigma_frames=8) * [6, 3, 2, 0.008, 0.006, 0.01]
    return start + drift


def talking(n: int, expression_names: list[str], n_expr: int, fps: float, rng: np.random.Generator,
            strength: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Jaw opening (n,) and expressions (n, n_expr) of speech, faded in and out at the segment ends."""
    t = np.arange(n) / fps
    syllables = np.clip(np.sin(2 * np.pi * SYLLABLE_HZ * t + rng.uniform(0, 2 * np.pi)), 0, None)
    loudness = 0.6 + 0.4 * np.abs(smooth_noise(rng, n, 1, sigma_frames=6)[:, 0]).clip(0, 1)
    fade = np.minimum(1.0, np.minimum(np.arange(n) + 1, n - np.arange(n)) / 4.0)
    jaw = strength * 0.28 * syllables * loudness * fade
    expr = np.zeros((n, n_expr))
    named = [expression_names.index(name) for name in TALK_EXPRESSIONS if name in expression_names]
    if named:  # ARKit-style blendshapes: activations in [0, 1]
        curves = np.clip(0.35 + 0.35 * smooth_noise(rng, n, len(named), sigma_frames=5), 0, 0.8)
        expr[:, named] = strength * curves * fade[:, None]
    else:  # PCA expressions: zero-mean, unit variance
        k = min(PCA_TALK_COMPONENTS, n_expr)
        expr[:, :k] = strength * 1.2 * smooth_noise(rng, n, k, sigma_frames=5) * fade[:, None]
    return jaw, expr


def blinks(n: int, fps: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) eyelid closing with blinks at random times."""
    closing = np.zeros(n)
    t = rng.exponential(BLINK_EVERY_S * fps / 2)
    shape = 1 - np.abs(np.linspace(-1, 1, BLINK_FRAMES))
    while t < n - BLINK_FRAMES:
        start = int(t)
        closing[start:start + BLINK_FRAMES] = np.maximum(closing[start:start + BLINK_FRAMES], shape)
        t += BLINK_FRAMES + rng.exponential(BLINK_EVERY_S * fps)
    return closing


def lighting_sweep(n: int, start: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, 7) light swinging from one side of the head to the other, dimming and changing colour."""
    end = np.array([rng.uniform(0.25, 0.45), rng.uniform(0.5, 0.8), -np.sign(start[2] or 1) * rng.uniform(50, 80),
                    rng.uniform(-10, 40), *rng.uniform(0.8, 1.1, 3)])
    keys = np.stack([start, (start + end) / 2 + [0.1, -0.2, 0, 0, 0, 0, 0], end])
    return cosine_keys(keys, n)


def occluder_path(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 4) an object entering from one side, resting over the mouth and cheek, and leaving."""
    side = rng.choice([-1.0, 1.0])
    height = rng.uniform(0.15, 0.45)
    keys = np.array([[1, side * 1.2, height, 0.45], [1, side * 0.25, height, 0.45],
                     [1, side * 0.15, height + 0.05, 0.45], [1, side * 1.2, height, 0.45]])
    return cosine_keys(keys, n)


def build_script(spec: SequenceSpec, expression_names: list[str], n_expr: int) -> Script:
    """All per-frame ground truth of a sequence (see the module docstring)."""
    rng = np.random.default_rng(spec.seed)
    pose = np.array([rng.uniform(-5, 5), rng.uniform(-5, 5), 0.0, 0.0, 0.0, -spec.distance_m])
    light = np.array([0.55, 0.5, rng.uniform(-40, 40), rng.uniform(10, 40), 1.0, 1.0, 1.0])
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("pose", "jaw", "expr", "gaze", "eyelids", "light",
                                                          "occluder", "segment")}
    for index, segment in enumerate(spec.segments):
        n, kind, moving = segment.frames, segment.kind, segment.kind != "static"
        pose_seg = head_motion(kind, n, pose, spec, rng)
        if kind in ("talk", "occlusion"):
            jaw, expr = talking(n, expression_names, n_expr, spec.fps, rng, 1.0 if kind == "talk" else 0.6)
        else:
            jaw, expr = np.zeros(n), np.zeros((n, n_expr))
        gaze = np.clip(5 * smooth_noise(rng, n, 2, sigma_frames=4), -MAX_GAZE_DEG, MAX_GAZE_DEG) if moving \
            else np.zeros((n, 2))
        eyelids = np.repeat(blinks(n, spec.fps, rng)[:, None], 2, 1) if moving else np.zeros((n, 2))
        light_seg = lighting_sweep(n, light, rng) if kind == "lighting" else np.repeat(light[None], n, 0)
        occluder = occluder_path(n, rng) if kind == "occlusion" else np.zeros((n, 4))
        values = (pose_seg, jaw, expr, gaze, eyelids, light_seg, occluder, np.full(n, index))
        for key, value in zip(parts, values, strict=True):
            parts[key].append(value)
        pose, light = pose_seg[-1], light_seg[-1]
    joined = {k: np.concatenate(v) for k, v in parts.items()}
    return Script(pose=joined["pose"], jaw_open=joined["jaw"], expr=joined["expr"], gaze=joined["gaze"],
                  eyelids=joined["eyelids"], light=joined["light"], occluder=joined["occluder"],
                  segment=joined["segment"].astype(np.int64))
