"""torch's intra-op threads: a process's share of the free cores, never more than it had; the projection line."""

from patfast.train.threads import cpu_threads, runnable_now
from patfast.train.training import projection


def test_an_idle_machine_keeps_every_core():
    assert cpu_threads(cores=16, local_processes=1, runnable=1, current=16) == 16


def test_other_runnable_processes_take_their_cores():
    assert cpu_threads(cores=2, local_processes=1, runnable=9, current=2) == 1  # load 8 on 2 cores: 1 thread
    assert cpu_threads(cores=16, local_processes=1, runnable=5, current=16) == 12


def test_torchrun_processes_share_the_cores():
    assert cpu_threads(cores=16, local_processes=4, runnable=4, current=16) == 4
    assert cpu_threads(cores=16, local_processes=4, runnable=12, current=16) == 2  # 8 others busy: 8 free / 4


def test_never_more_than_before_and_at_least_one():
    assert cpu_threads(cores=16, local_processes=1, runnable=1, current=3) == 3
    assert cpu_threads(cores=1, local_processes=4, runnable=50, current=1) == 1


def test_runnable_count_is_read_on_linux():
    n = runnable_now(samples=2, every_s=0.0)
    assert n is None or n >= 1  # at least this process


def test_projection_after_the_first_epoch():
    line = projection(12.0, 10, compiled=False, now=0.0)
    assert line.startswith("projected: 2.0 min more for the remaining 10 epoch(s), done at about ")
    assert "upper bound" in projection(600.0, 299, compiled=True) and "49.8 h" in projection(600.0, 299, True)
