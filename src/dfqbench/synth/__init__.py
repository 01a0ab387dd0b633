"""Synthetic calibration data distilled from a teacher (no real images)."""
