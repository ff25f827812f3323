"""Monocular FLAME head tracker with DenseMarks dense correspondences.

    import tracker
    result = tracker.track("clip.mp4", video__max_frames=100)   # tracks and writes output/clip/
    result = tracker.load("output/clip")                        # or read a finished run
    result["expr"], result.K, result.valid, result.vertices(0)

`import tracker` stays light (no torch): the heavy modules load when `track` or `vertices` first needs them.
"""

__version__ = "0.1.0"


def track(video, config=None, show_progress=True, **overrides):
    """Track a video; returns a `tracker.result.TrackingResult` (see tracker/api.py for the arguments)."""
    from tracker.api import track as _track

    return _track(video, config, show_progress, **overrides)


def load(path):
    """Read a finished run (its folder or flame_params.npz) into a `tracker.result.TrackingResult`."""
    from tracker.result import load as _load

    return _load(path)
