"""The bundled-data teacher cache: two runs started together share it without corrupting it (one trains, the other
waits and reuses the teacher), and a lock left by a dead run does not block the next one."""

import csv
import fcntl
import os
import subprocess
import sys
import time

import pytest

TINY = ["train", "--distiller", "kd", "--student", "resnet10t", "--teacher-epochs", "2", "--epochs", "1",
        "--no-progress", "--device", "cpu"]


@pytest.mark.slow
def test_two_runs_started_together_train_one_teacher_and_both_finish(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PATFAST_CACHE=str(tmp_path / "cache"))
    first = subprocess.Popen([sys.executable, "-m", "patfast", *TINY, "--out", str(tmp_path / "a")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    teachers = tmp_path / "cache" / "teachers"
    deadline = time.time() + 300
    while not (teachers.is_dir() and any(p.name.endswith(".partial") for p in teachers.iterdir())):
        assert time.time() < deadline and first.poll() is None, "the first run never started its teacher"
        time.sleep(0.2)
    second = subprocess.run([sys.executable, "-m", "patfast", *TINY, "--out", str(tmp_path / "b")], env=env,
                            capture_output=True, text=True, timeout=600)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    assert "waiting for it" in second.stdout and "another run has just trained" in second.stdout
    folders = [p for p in teachers.iterdir() if p.is_dir()]
    assert [p.suffix for p in folders] == [""], folders  # one finished teacher, no .partial left behind
    with open(folders[0] / "summary.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]  # one writer: its epochs, in order


def test_a_lock_held_by_another_process_is_waited_for_and_a_dead_holders_is_not(tmp_path):
    from patfast.train.teacher_cache import _only_writer

    lock = tmp_path / "t.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(1.5)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    lines, t0 = [], time.monotonic()
    with _only_writer(str(lock), lines.append):
        waited = time.monotonic() - t0
        with open(lock) as f:  # held by us now
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder.wait(timeout=30)
    assert waited > 0.5 and len(lines) == 1 and "waiting for it" in lines[0]
    killed = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    assert killed.stdout.readline() == "held\n"
    killed.kill()
    killed.wait(timeout=30)
    lines.clear()
    with _only_writer(str(lock), lines.append):  # the kernel released the dead holder's lock
        pass
    assert lines == []
