"""Monocular FLAME head tracker with DenseMarks dense correspondences."""

__version__ = "0.1.0"
