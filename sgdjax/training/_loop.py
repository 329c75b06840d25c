"""Names that lived here before the training engine (``_engine.py``) replaced the old loop.

Kept for code that still imports them from here; new code imports from ``_report``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sgdjax.training._report import environment, plot_curves, plot_diagnostics

_plot_curves = plot_curves
_plot_diagnostics = plot_diagnostics


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as stream:
        stream.write(json.dumps(row) + "\n")


__all__ = ["_append_jsonl", "_plot_curves", "_plot_diagnostics", "environment"]
