"""Options several commands share."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

ThreadsOpt = Annotated[
    Optional[int],
    typer.Option("--threads", "-j", help="torch threads for calibration, solves, evaluation and generation (default: torch's, one per physical core); recorded in report.json and eval.json.", show_default=False),
]

StreamOpt = Annotated[
    bool,
    typer.Option("--stream/--no-stream", help="Read a float model's decoder blocks from disk only when the work reaches each (peak memory: the embeddings and one block, not the whole model); --no-stream loads it whole first. A checkpoint loads whole and is evaluated a block at a time (each block dequantized only while it runs)."),
]
