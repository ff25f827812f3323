"""Speed benchmark of the tracker: seconds per frame of each stage per configuration (`python -m eval.bench`)."""
