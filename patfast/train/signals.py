"""SIGINT / SIGTERM during training: finish the current step, write a checkpoint, exit 130 / 143.

`with StopSignals() as stop:` installs handlers (main thread only) that only record the signal; the loop checks
`stop.signum` after each step. A second SIGINT while stopping raises KeyboardInterrupt at once.
"""

from __future__ import annotations

import os
import signal
import threading

from patfast.errors import TrainingStopped

NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class StopSignals:
    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signum = signum
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process is signalled: rank 0 says it
            print(f"patfast: {NAMES.get(signum, signum)} received: finishing this step, then writing a checkpoint",
                  flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in NAMES:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def stopped(self, checkpoint: str, out: str, mid_epoch: bool) -> TrainingStopped:
        where = "mid-epoch " if mid_epoch else ""
        return TrainingStopped(f"stopped by {NAMES.get(self.signum, self.signum)}: {where}checkpoint written to "
                               f"{checkpoint}; continue with --resume {out}", 128 + int(self.signum))
