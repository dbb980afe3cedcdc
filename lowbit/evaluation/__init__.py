"""Evaluation protocol: perplexity, KL and top-1 agreement against the original; plots."""
