"""How a benchmark records what it measured, row by row, so that nothing measured is ever lost.

Every figure ends in one of three outcomes:
    measured       the figure itself (and its timer)
    not measured   deliberately not run, with the reason: "not measured: <why>" (no CUDA GPU, past a time budget,
                   not installed, not reached before the step was stopped)
    FAILED         the code raised: "FAILED: <ExceptionType>: <message>", and the row's "error" holds the same
                   "<ExceptionType>: <message>" (a part of a row that raised, e.g. the backward alone, goes into
                   "<part>_error", e.g. "bwd_error"); the benchmark's exit status is then non-zero
Benchmarks rewrite their JSON after every row with ``write_json`` (a temporary file renamed over the old one), so a
process killed at any moment leaves the last complete file, with every row measured so far.
"""

from __future__ import annotations

import json
import os

NOT_REACHED = "not measured: not reached"  # a row written before it ran; gpu_check says why it never ran
FAILED = "FAILED"


def error_text(e: BaseException) -> str:
    """"<ExceptionType>: <first line of the message>" (at most 300 characters of it)."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"


def mark_failed(row: dict, e: BaseException, what: str = "") -> str:
    """Record ``e`` in ``row``: "error" (type and message) and a "FAILED: ..." note; returns the error text."""
    text = (f"{what}: " if what else "") + error_text(e)
    row["error"] = text
    row["note"] = f"{FAILED}: {text}"
    return text


def row_failures(row: dict) -> list[str]:
    """Every exception recorded in ``row``: its "error" as is, each "<part>_error" as "<part>: <error>"."""
    return [v if k == "error" else f"{k.removesuffix('_error').replace('_', ' ')}: {v}"
            for k, v in row.items() if v and (k == "error" or k.endswith("_error"))]


def write_json(doc, path: str) -> None:
    """Write ``doc`` to ``path`` atomically: a reader, or a kill mid-write, never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
