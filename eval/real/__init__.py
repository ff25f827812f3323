"""Evaluation on real videos without 3D ground truth: held-out detector NME, photometric consistency, jitter."""
