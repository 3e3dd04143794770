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


@pytest.mark.slow
def test_a_run_that_trains_the_teacher_gives_what_a_run_with_it_cached_gives(tmp_path):
    # the teacher's training used to move the global RNG before PAT's modules were built: the first demo run (teacher
    # trained in-process) and every later one (teacher cached) gave different students for the same seed
    from safetensors.torch import load_file

    # a student other than the teacher: models of different sizes draw different amounts of random numbers
    argv = ["train", "--student", "resnet14t", "--teacher", "resnet10t", "--teacher-epochs", "1", "--epochs", "1",
            "--batch-size", "128", "--pat-dim", "64", "--pat-heads", "4", "--deterministic", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PATFAST_CACHE=str(tmp_path / "cache"))
    for run in ("first", "cached"):
        proc = subprocess.run([sys.executable, "-m", "patfast", *argv, "--out", str(tmp_path / run)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "using the cached resnet10t" in (tmp_path / "cached" / "log.txt").read_text()
    rows = []
    for run in ("first", "cached"):
        with open(tmp_path / run / "summary.csv") as f:
            rows.append([{k: v for k, v in r.items() if k not in ("img_per_s", "epoch_s")} for r in csv.DictReader(f)])
    assert rows[0] == rows[1]
    a, b = (load_file(tmp_path / run / "student.safetensors") for run in ("first", "cached"))
    assert all((a[k] == b[k]).all() for k in a)
