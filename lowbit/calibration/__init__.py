"""Calibration: text sources, token windows, and range observers."""
