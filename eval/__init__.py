"""Evaluation harness of the head tracker: metrics (eval.metrics) and benchmarks (eval.geometry, ...)."""
