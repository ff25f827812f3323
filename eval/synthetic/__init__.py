"""Synthetic benchmark with exact ground truth: FLAME heads rendered with photo textures over procedural
backgrounds (scenario, appearance, render, degrade, generate), and scoring of tracks against the truth
(evaluate). `suite` lists the sequences of the full and quick benchmarks."""
