"""Hold-out synthetic benchmark, independent of the tracker's renderer: FLAME sequences rendered by a small numpy
rasteriser (raster), scripted (scenes) and written in eval.synthetic's ground-truth format (generate), tracked and
scored beside their baselines (benchmark; `python -m eval.holdout`)."""
