"""Options several commands share."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

ThreadsOpt = Annotated[
    Optional[int],
    typer.Option("--threads", "-j", help="torch threads for calibration, solves, evaluation and generation (default: torch's, one per physical core); recorded in report.json and eval.json.", show_default=False),
]
