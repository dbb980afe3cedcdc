"""Checkpoints and exporters."""
