"""Maintenance scripts (not needed to track): building the files shipped in flame_assets/."""
