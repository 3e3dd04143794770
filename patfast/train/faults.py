"""The one fault-injection seam, for tests: kill or signal a run at a chosen point, to prove nothing is lost.

PATFAST_TEST_KILL=where:N sends SIGKILL to the process the N-th time `where` is reached ("step": after a training
step; "save": inside a checkpoint write, before its rename); where:N:term:R sends SIGTERM instead, and only in the
process of rank R (torchrun's RANK); where:N:int:R, SIGINT (what Ctrl-C sends). The variable is read once, when a
run starts (`arm`); unarmed, `reached` is one comparison.
"""

from __future__ import annotations

import os
import signal

_armed: dict = {}  # where -> {"at": N, "signal": ..., "count": reached so far}


def arm(environ=os.environ) -> None:
    """Read PATFAST_TEST_KILL (once per run); clears any earlier arming."""
    _armed.clear()
    spec = environ.get("PATFAST_TEST_KILL")
    if not spec:
        return
    where, n, *term = spec.split(":")
    if term and environ.get("RANK", "0") != term[1]:
        return
    sent = {"term": signal.SIGTERM, "int": signal.SIGINT}[term[0]] if term else signal.SIGKILL
    _armed[where] = {"at": int(n), "signal": sent, "count": 0}


def reached(where: str) -> None:
    if not _armed:
        return
    point = _armed.get(where)
    if point is None:
        return
    point["count"] += 1
    if point["count"] == point["at"]:
        os.kill(os.getpid(), point["signal"])
