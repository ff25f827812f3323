"""The hold-out sequences: what the head, face, eyes, light and a hand do in every frame.

Four kinds, each starting with a few still frames (neutral face, head not moving) unless said otherwise:

- yaw_sweep: the head turns to +85 degrees, over to -85 and back (profiles, where detectors give up).
- fast_motion: straight moves between random poses every few frames, yaw within +-37 degrees (up to ~15 degrees
  per frame), pitch and roll, some translation.
- talking_head: the head never moves while the jaw talks, sparse expressions come and go and the eyes blink
  (the jitter test: the truth moves only in the face).
- hand_occluder: slow head motion and light talking while a hand crosses in front of the face.

Identities are drawn from N(0, I) over the model's identity coefficients (unit-variance PCA). Expressions are
the stand-in's ARKit-style blendshapes, activations in [0, 1], sparse: short bumps of one or two shapes at a
time; blinks close the eyelid blendshapes (eyelidClose_L/R). Everything is drawn from one seeded generator.
Poses are yaw, pitch, roll in degrees (R = Ry Rx Rz, as eval.synthetic) and a translation in metres; the
camera is at the origin looking down -z.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from eval.synthetic.scenario import cosine_keys, smooth_noise

KINDS = ("yaw_sweep", "fast_motion", "talking_head", "hand_occluder")
SEGMENT_KIND = {"yaw_sweep": "turn", "fast_motion": "fast", "talking_head": "talk", "hand_occluder": "occlusion"}
"""The eval.synthetic segment kind each sequence kind is recorded as in its ground truth."""
TALK_SHAPES = (("mouthSmile_L", "mouthSmile_R"), ("mouthFunnel",), ("mouthPucker",), ("mouthStretch_L",
               "mouthStretch_R"), ("mouthRollLower",), ("mouthUpperUp_L", "mouthUpperUp_R"), ("mouthLowerDown_L",
               "mouthLowerDown_R"), ("mouthFrown_L", "mouthFrown_R"), ("mouthPress_L", "mouthPress_R"),
               ("browInnerUp_L", "browInnerUp_R"), ("browDown_L", "browDown_R"), ("cheekPuff_L", "cheekPuff_R"),
               ("mouthLeft",), ("mouthRight",), ("noseSneer_L", "noseSneer_R"), ("mouthSmile_L",))
"""Groups of blendshapes that activate together in an expression event (names missing from a model are skipped)."""
BLINK_SHAPES = ("eyelidClose_L", "eyelidClose_R")
BLINK_FRAMES = 5
BLINK_EVERY_S = 2.5
SYLLABLE_HZ = 4.0
FAST_KEY_FRAMES = 5
"""Frames between the random poses of fast_motion."""
MAX_FAST_YAW_DEG = 37.0
MAX_SWEEP_YAW_DEG = 85.0
MAX_GAZE_DEG = 8.0


@dataclass(frozen=True)
class HoldoutSpec:
    """One hold-out sequence: its script kind, person, camera and seed."""

    name: str
    kind: str
    frames: int
    still_frames: int
    """Leading frames in which nothing moves."""
    focal_px: float
    distance_m: float
    photo: int
    """FFHQ photo the face texture is made from (shared/data/images/FFHQ)."""
    seed: int
    image_size: int = 512
    fps: float = 25.0
    noise_sigma: float = 2.0
    """Sensor noise, standard deviation in 8-bit levels."""
    blur_sigma_px: float = 0.5
    """Optical blur (also softens the silhouette's pixel steps)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown hold-out sequence kind {self.kind!r} (known: {', '.join(KINDS)})")
        if not 0 <= self.still_frames < self.frames:
            raise ValueError(f"{self.name}: still frames must be fewer than the {self.frames} frames")

    def to_dict(self) -> dict:
        return asdict(self)


def holdout_suite(quick: bool) -> tuple[HoldoutSpec, ...]:
    """The four sequences: 120 frames each at 512 x 512, or 7 each for --quick. Narrow cameras as real footage
    from a distance (focal 1400-1600 px at 512, head 0.85-1.15 m away) and one wide-angle close camera
    (fast_motion, ~45 degrees), so focal estimates are tested both ways from the tracker's initial guess."""
    frames, still = (7, 2) if quick else (120, 8)
    return (
        HoldoutSpec("yaw_sweep", "yaw_sweep", frames, still, focal_px=1500.0, distance_m=1.0, photo=1, seed=2001),
        HoldoutSpec("fast_motion", "fast_motion", frames, still, focal_px=620.0, distance_m=0.5, photo=5, seed=2002),
        HoldoutSpec("talking_head", "talking_head", frames, 0, focal_px=1400.0, distance_m=0.85, photo=6, seed=2003),
        HoldoutSpec("hand_occluder", "hand_occluder", frames, still, focal_px=1600.0, distance_m=1.15, photo=8,
                    seed=2004),
    )


@dataclass
class HoldoutScript:
    """Everything that varies over the T frames of a sequence, and the person."""

    shape: np.ndarray
    """(n_shape,) identity coefficients."""
    pose: np.ndarray
    """(T, 6) yaw, pitch, roll (degrees), translation x, y, z (metres)."""
    jaw_open: np.ndarray
    """(T,) jaw rotation about x, radians."""
    expr: np.ndarray
    """(T, n_expr) blendshape activations in [0, 1]."""
    gaze: np.ndarray
    """(T, 2) eyeball yaw and pitch, degrees."""
    hand: np.ndarray
    """(T, 5) hand: visible (0/1), centre offset from the face centre x, y (face widths), size (face widths),
    angle (degrees)."""
    light: np.ndarray
    """(5,) ambient, diffuse, azimuth, elevation (degrees), skin tone of the hand (0..1)."""


def sparse_expressions(rng: np.random.Generator, n: int, names: list[str], every_frames: float) -> np.ndarray:
    """(n, len(names)) activations: events of one TALK_SHAPES group at a time on average every `every_frames`
    frames, each a smooth bump (8-25 frames) to an amplitude in [0.3, 1]; overlaps are summed and clipped."""
    expr = np.zeros((n, len(names)))
    groups = [[names.index(s) for s in group if s in names] for group in TALK_SHAPES]
    groups = [g for g in groups if g]
    t = rng.exponential(every_frames / 2)
    while groups and t < n:
        length = int(rng.integers(8, 26))
        bump = np.sin(np.linspace(0, np.pi, length)) ** 2 * rng.uniform(0.3, 1.0)
        start, group = int(t), groups[rng.integers(len(groups))]
        stop = min(n, start + length)
        expr[start:stop, group] += bump[:stop - start, None]
        t += rng.exponential(every_frames)
    return np.clip(expr, 0.0, 1.0)


def blink_curve(rng: np.random.Generator, n: int, fps: float) -> np.ndarray:
    """(n,) eyelid closing 0..1 with blinks at random times."""
    closing = np.zeros(n)
    shape = 1 - np.abs(np.linspace(-1, 1, BLINK_FRAMES))
    t = rng.exponential(BLINK_EVERY_S * fps / 2)
    while t < n:
        start = int(t)
        stop = min(n, start + BLINK_FRAMES)
        closing[start:stop] = np.maximum(closing[start:stop], shape[:stop - start])
        t += BLINK_FRAMES + rng.exponential(BLINK_EVERY_S * fps)
    return closing


def jaw_talk(rng: np.random.Generator, n: int, fps: float, strength: float) -> np.ndarray:
    """(n,) jaw opening (radians) at syllable rate with varying loudness."""
    t = np.arange(n) / fps
    syllables = np.clip(np.sin(2 * np.pi * SYLLABLE_HZ * t + rng.uniform(0, 2 * np.pi)), 0, None)
    loudness = 0.5 + 0.5 * np.abs(smooth_noise(rng, n, 1, sigma_frames=6)[:, 0]).clip(0, 1)
    return strength * 0.3 * syllables * loudness


def fast_poses(rng: np.random.Generator, n: int, start: np.ndarray) -> np.ndarray:
    """(n, 6) straight moves between random poses every FAST_KEY_FRAMES frames, yaw alternating sides up to
    +-MAX_FAST_YAW_DEG (both extremes reached)."""
    n_keys = max(3, n // FAST_KEY_FRAMES + 1)
    sides = np.where(np.arange(n_keys) % 2 == 0, 1.0, -1.0) * rng.choice([-1.0, 1.0])
    keys = np.repeat(start[None], n_keys, 0)
    keys[:, 0] = sides * rng.uniform(15.0, MAX_FAST_YAW_DEG, n_keys)
    keys[1, 0], keys[2, 0] = sides[1] * MAX_FAST_YAW_DEG, sides[2] * MAX_FAST_YAW_DEG
    keys[:, 1] += rng.uniform(-15, 15, n_keys)
    keys[:, 2] += rng.uniform(-8, 8, n_keys)
    keys[:, 3:] += rng.uniform(-1, 1, (n_keys, 3)) * [0.03, 0.02, 0.04]
    keys[0] = start
    s = np.linspace(0, n_keys - 1, n)
    k = np.minimum(s.astype(int), n_keys - 2)
    return keys[k] + (keys[k + 1] - keys[k]) * (s - k)[:, None]


def build_script(spec: HoldoutSpec, expression_names: list[str], n_shape: int) -> HoldoutScript:
    """The sequence's script (see the module docstring)."""
    rng = np.random.default_rng(spec.seed)
    shape = rng.normal(0.0, 1.0, n_shape)
    n, still = spec.frames, spec.still_frames
    moving = n - still
    start = np.array([rng.uniform(-5, 5), rng.uniform(-5, 5), 0.0, 0.0, 0.0, -spec.distance_m])
    light = np.array([rng.uniform(0.45, 0.6), rng.uniform(0.5, 0.65), rng.uniform(-40, 40), rng.uniform(10, 40),
                      rng.uniform(0, 1)])
    if spec.kind == "yaw_sweep":
        keys = np.repeat(start[None], 4, 0)
        keys[1, 0], keys[2, 0] = MAX_SWEEP_YAW_DEG, -MAX_SWEEP_YAW_DEG
        motion = cosine_keys(keys, moving)
        motion[:, 1] += 5 * np.sin(np.linspace(0, 2 * np.pi, moving))
    elif spec.kind == "fast_motion":
        motion = fast_poses(rng, moving, start)
    elif spec.kind == "talking_head":
        motion = np.repeat(start[None], moving, 0)
    else:  # hand_occluder
        motion = start + np.outer(np.sin(np.linspace(0, 2 * np.pi, moving)), [15, 3, 0, 0, 0, 0])
    names = list(expression_names)
    talk_strength, every = {"talking_head": (1.0, 8.0), "hand_occluder": (0.6, 12.0)}.get(spec.kind, (0.3, 15.0))
    expr = sparse_expressions(rng, moving, names, every)
    blinks = blink_curve(rng, moving, spec.fps)
    for name in BLINK_SHAPES:
        if name in names:
            expr[:, names.index(name)] = np.maximum(expr[:, names.index(name)], blinks)
    jaw = jaw_talk(rng, moving, spec.fps, talk_strength)
    gaze = np.clip(MAX_GAZE_DEG * 0.6 * smooth_noise(rng, moving, 2, sigma_frames=5), -MAX_GAZE_DEG, MAX_GAZE_DEG)
    hand = hand_path(rng, moving) if spec.kind == "hand_occluder" else np.zeros((moving, 5))
    pad = lambda values, first: np.concatenate([np.repeat(first[None], still, 0), values])  # noqa: E731
    return HoldoutScript(
        shape=shape, pose=pad(motion, start), jaw_open=pad(jaw, np.zeros(())), expr=pad(expr, np.zeros(len(names))),
        gaze=pad(gaze, np.zeros(2)), hand=pad(hand, np.zeros(5)), light=light)


def hand_path(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 5) a hand entering from one side, crossing the face (over the mouth and cheeks) and leaving."""
    side = rng.choice([-1.0, 1.0])
    height = rng.uniform(0.0, 0.3)  # face widths below the face centre
    angle = side * rng.uniform(10, 30)
    hand = np.zeros((n, 5))
    first, last = int(0.15 * n), int(0.9 * n)
    crossing = np.linspace(side * 1.3, -side * 1.3, max(last - first, 1))
    hand[first:last] = np.stack([np.ones_like(crossing), crossing, np.full_like(crossing, height),
                                 np.full_like(crossing, rng.uniform(0.55, 0.7)), np.full_like(crossing, angle)], 1)
    return hand


HAND_SUPERSAMPLE = 4


def hand_alpha(height: int, width: int, centre: np.ndarray, size_px: float, angle_deg: float) -> np.ndarray:
    """(H, W) coverage of a hand seen from the palm side: palm, four fingers and a thumb, fingers pointing up
    (turned by angle_deg), about size_px wide; antialiased by supersampling."""
    k = HAND_SUPERSAMPLE
    mask = np.zeros((height * k, width * k), np.uint8)
    r = 0.5 * size_px * k
    turn = np.radians(angle_deg)
    rot = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    at = lambda x, y: tuple(np.round(centre * k + rot @ np.array([x, y]) * r).astype(int))  # noqa: E731
    cv2.ellipse(mask, at(0, 0), (int(0.85 * r), int(r)), angle_deg, 0, 360, 255, -1)
    for x, length in ((-0.6, 1.0), (-0.2, 1.25), (0.2, 1.2), (0.6, 0.95)):
        cv2.line(mask, at(x, -0.5), at(x, -0.5 - length), 255, max(1, int(0.36 * r)), cv2.LINE_8)
        cv2.circle(mask, at(x, -0.5 - length), max(1, int(0.18 * r)), 255, -1)
    cv2.line(mask, at(-0.7, 0.3), at(-1.35, -0.35), 255, max(1, int(0.4 * r)))
    cv2.circle(mask, at(-1.35, -0.35), max(1, int(0.2 * r)), 255, -1)
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_AREA).astype(np.float64) / 255.0
