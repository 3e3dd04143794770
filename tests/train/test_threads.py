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


def test_a_run_lowers_its_threads_on_a_busy_machine_and_says_so(monkeypatch):
    import torch

    from patfast.train import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the suite pins it (tests/conftest.py)
    monkeypatch.setattr(threads, "runnable_now", lambda: 9)  # load 8 besides this process
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    before, lines = torch.get_num_threads(), []
    torch.set_num_threads(2)
    try:
        threads.set_cpu_threads(1, lines.append)
        assert torch.get_num_threads() == 1
        assert lines == ["CPU threads: 1 of 2 cores (1 process(es) of this run, 8 other runnable process(es) now)"]
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user chose: left alone
        torch.set_num_threads(2)
        threads.set_cpu_threads(1, lines.append)
        assert torch.get_num_threads() == 2 and len(lines) == 1
    finally:
        torch.set_num_threads(before)
