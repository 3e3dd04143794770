"""`python -m patfast.launch [torchrun options] COMMAND ...`: torchrun for patfast, with patfast's exit statuses.

torchrun turns a failing process into its own exit status 1, a ChildFailedError report and a traceback (on Ctrl-C a
SignalException traceback). This runs the same launcher (torch.distributed.run, in this process) and ends as one
patfast process does: rank 0's one line, then exit status 2 for a mistake, 3 for non-finite losses, 130 / 143 for
SIGINT / SIGTERM. `python -m patfast.launch --nproc-per-node 2 train --out D ...` = `torchrun --nproc-per-node 2
-m patfast train --out D ...`.
"""

from __future__ import annotations

import logging
import os
import sys

SAID = (2, 3, 130, 143)  # statuses whose reason patfast's rank 0 has already printed


def _quiet_launcher() -> None:
    """torchrun's own warnings and failure report repeat what rank 0 has said (the loggers set their own levels)."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    from patfast.cli import COMMANDS

    argv = sys.argv[1:] if argv is None else argv
    at = next((i for i, a in enumerate(argv) if a in COMMANDS), None)
    if at is None:
        print(f"patfast.launch: error: give torchrun's options, then a patfast command ({', '.join(COMMANDS)}) and "
              "its options", file=sys.stderr)
        return 2
    # a stopping run finishes its step and writes its checkpoint before torchrun kills it (read by torch 2.14's
    # LaunchConfig; torch 2.11 keeps its 30 s)
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args([*argv[:at], "-m", "patfast", *argv[at:]])
    _quiet_launcher()
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        status = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # killed by a signal: 128 + it
        if status not in SAID:
            print(f"patfast.launch: the process of rank {rank} exited with status {failure.exitcode} (its output is "
                  "above)", file=sys.stderr)
        return status
    except SignalException as e:  # this launcher was signalled: it passed the signal on; the processes checkpointed
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
