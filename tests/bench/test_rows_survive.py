"""`bench train` and `bench data` write their JSON as they measure: a path or backend that raises is FAILED in its
row (exception type and message) beside the rows measured before it, and a process killed midway leaves the rows
measured so far."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from patfast.bench import data as bench_data
from patfast.bench import train as bench_train
from patfast.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="uses the CPU dry-run sizes")


def run_until(argv: list[str], line_start: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m patfast ARGV`, SIGKILL it as soon as a stdout line starts with ``line_start``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "patfast", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.lstrip().startswith(line_start):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=timeout)
    finally:
        proc.kill()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]  # killed, not finished
    return subprocess.CompletedProcess(argv, proc.returncode, "".join(seen), "")


@pytest.mark.slow
@cpu_only
def test_bench_train_path_that_raises_is_failed_beside_the_measured_one(tmp_path, monkeypatch, capsys,
                                                                      one_thread_seeded):
    real = bench_train.time_steps
    calls = []

    def second_raises(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore text")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_train, "time_steps", second_raises)
    path = tmp_path / "e2e.json"
    code = main(["bench", "train", "--dry-run", "--paths", "fast,reference", "--no-split", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 1, out
    (row,) = json.loads(path.read_text())
    assert row["fast_img_s"] > 0
    assert row["reference_img_s"] is None
    assert row["paths"]["reference"]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert row["paths"]["reference"]["note"].startswith("FAILED: RuntimeError")
    assert "FAILED" in out


@pytest.mark.slow
@cpu_only
def test_bench_train_killed_midway_leaves_the_paths_measured_so_far(tmp_path):
    path = tmp_path / "e2e.json"
    run_until(["bench", "train", "--dry-run", "--paths", "fast,reference", "--no-split", "--json", str(path)],
              "fast (no torch.compile):")  # --dry-run compiles nothing
    (row,) = json.loads(path.read_text())
    assert row["fast_img_s"] > 0 and row["paths"]["fast"]["step_ms"] > 0
    assert row["reference_img_s"] is None
    assert row["paths"]["reference"]["note"] == "not measured: not reached"


def _fake_step_rate(*args, **kwargs):
    return {"img_s": 10.0, "step_ms": 400.0, "timer": "fake"}


@cpu_only
def test_bench_data_backend_that_raises_is_failed_and_the_others_are_kept(tmp_path, monkeypatch, capsys,
                                                                         one_thread_seeded):
    real = bench_data.bench_backend

    def gpu_raises(args, backend, device, dataset):
        if backend == "gpu":
            raise ValueError("batched augmentation broke")
        return real(args, backend, device, dataset)

    monkeypatch.setattr(bench_data, "bench_backend", gpu_raises)
    monkeypatch.setattr(bench_train, "pat_step_rate", _fake_step_rate)
    path = tmp_path / "data.json"
    code = main(["bench", "data", "--dry-run", "--workers", "0", "--no-progress", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 1, out
    doc = json.loads(path.read_text())
    rows = {r["backend"]: r for r in doc["data"]}
    assert rows["torch"]["img_s"] > 0
    assert rows["gpu"]["img_s"] is None and rows["gpu"]["error"] == "ValueError: batched augmentation broke"
    assert doc["step"]["img_s"] == 10.0  # the step after the failing backend still ran
    assert "FAILED: ValueError: batched augmentation broke" in out


@pytest.mark.slow
@cpu_only
def test_bench_data_killed_midway_leaves_the_backends_measured_so_far(tmp_path):
    path = tmp_path / "data.json"
    run_until(["bench", "data", "--dry-run", "--workers", "0", "--no-progress", "--json", str(path)], "torch:")
    doc = json.loads(path.read_text())
    rows = {r["backend"]: r for r in doc["data"]}
    assert rows["torch"]["img_s"] > 0
    assert rows["gpu"]["img_s"] is None and rows["gpu"]["note"] == "not measured: not reached"
    assert doc["step"]["img_s"] is None and doc["step"]["note"] == "not measured: not reached"
