"""torch's intra-op threads for a run: never more than this process's share of the cores that are free.

torch starts one thread per core. Two runs (or torchrun's processes) on the same cores then each spin-wait for
threads the other keeps descheduled: a run on a 2-core machine at load 8 fell from ~130 to 3-11 img/s. Each process
takes cores // (processes of this run on the machine), less the cores other processes keep busy right now (the
runnable count of /proc/loadavg, sampled a few times), at least 1; an explicit OMP_NUM_THREADS or a lower
torch.set_num_threads is kept.
"""

from __future__ import annotations

import os
import statistics
import time


def cpu_threads(cores: int, local_processes: int, runnable: int, current: int) -> int:
    """Threads for one process. runnable: processes running or ready now on the machine, this run's included."""
    local = max(1, local_processes)
    others = max(0, runnable - local)
    free = max(1, cores - others)
    return max(1, min(current, cores // local, free // local))


def runnable_now(samples: int = 5, every_s: float = 0.05) -> int | None:
    """The median runnable count (running or ready tasks) of /proc/loadavg over a few samples; None off Linux."""
    counts = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]))
        except (OSError, ValueError, IndexError):
            return None
        time.sleep(every_s)
    return int(statistics.median(counts))


def set_cpu_threads(local_processes: int, log) -> None:
    """Lower torch's intra-op threads to cpu_threads(...) and say why when it changes anything."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return  # the user (or a launcher) chose
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    runnable = runnable_now()
    current = torch.get_num_threads()
    n = cpu_threads(cores, local_processes, runnable if runnable is not None else local_processes, current)
    if n < current:
        torch.set_num_threads(n)
        others = max(0, (runnable or 0) - local_processes)
        log(f"CPU threads: {n} of {cores} cores ({local_processes} process(es) of this run, {others} other "
            "runnable process(es) now)")
