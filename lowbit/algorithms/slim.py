"""SliM-LLM (Huang et al., 2024): GPTQ on per-group mixed widths chosen by salience.

The method is GPTQ (algorithms.gptq) on the ``mixed`` format (formats.mixed): each group of
128 input columns gets 1, 2 or 3 bits so that the average stays at 2 bits per weight, the
widths chosen for the least Hessian-diagonal-weighted error (the paper's salience-determined
bit allocation, with the budget kept per weight), and each (row, group)'s range searched
for the least weighted error (its salience-weighted quantizer calibration). The GPTQ solve
then rounds every column on those grids with error feedback. 3 bits on average:
``--format mixed234``.
"""

from __future__ import annotations

from .base import register
from .gptq import GPTQ


@register
class SliMLLM(GPTQ):
    name = "slim-llm"
    summary = "SliM-LLM: GPTQ on 1/2/3-bit groups allocated by salience at a 2-bit average (mixed format)"
    default_weight = {"format": "mixed123", "group_size": 128}
    defaults_source = "groups of 128, widths 1/2/3 at 2 bits on average, GPTQ with act-order and damping 0.01: the paper's SliM-LLM+ setting on GPTQ"
