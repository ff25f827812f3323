"""The synthetic benchmark: which sequences `python -m eval.run` generates (full run and --quick subset)."""

from __future__ import annotations

from eval.synthetic.scenario import Segment, SequenceSpec


def _segments(*pairs: tuple[str, int]) -> tuple[Segment, ...]:
    return tuple(Segment(kind, frames) for kind, frames in pairs)


QUICK_SUITE: tuple[SequenceSpec, ...] = (
    SequenceSpec("quick_mix", _segments(("static", 6), ("turn", 14), ("talk", 10), ("occlusion", 6)),
                 photo=2, seed=101),
)
"""36 frames: a static stretch, a turn to +-90 degrees, talking, an occluder (CI)."""

FULL_SUITE: tuple[SequenceSpec, ...] = (
    SequenceSpec("turns", _segments(("static", 12), ("turn", 40), ("nod", 24), ("static", 8)), photo=2, seed=11),
    SequenceSpec("talking", _segments(("static", 10), ("talk", 40), ("lighting", 24)), photo=3, seed=12),
    SequenceSpec("fast_occluded", _segments(("talk", 10), ("fast", 24), ("static", 10), ("occlusion", 30)),
                 photo=4, seed=13, noise_sigma=4.0),
    SequenceSpec("mixed", _segments(("turn", 30), ("talk", 20), ("fast", 12), ("lighting", 16)), photo=7, seed=14,
                 max_yaw_deg=60.0, fov_deg=40.0, distance_m=0.6),
)
"""310 frames over four people: profile turns and nods, speech, lighting changes, fast motion with blur,
occlusion, static stretches for jitter, and a wider-angle closer camera."""


def suite(quick: bool) -> tuple[SequenceSpec, ...]:
    return QUICK_SUITE if quick else FULL_SUITE
