"""Never lose a run: kill -9 at several points (mid-epoch, at an epoch end, inside a checkpoint write), resume, and
get the uninterrupted run's summary.csv (timing columns aside) and final weights, bit for bit (CPU, --deterministic).
Also: SIGTERM finishes the step, checkpoints and exits 143; a run of NaN losses stops with exit 3 and an intact
checkpoint; an incompatible resume is refused."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

TIMING = ("img_per_s", "epoch_s")


def train(out, teacher, *extra, kill=None, check=True):
    argv = [sys.executable, "-m", "patfast", "train", "--data", "digits", "--teacher", "convnext_atto",
            "--student", "resnet10t", "--teacher-checkpoint", teacher, "--img-size", "32", "--batch-size", "128",
            "--epochs", "2", "--checkpoint-every", "4", "--deterministic", "--no-progress", "--out", str(out),
            "--pat-dim", "64", "--pat-heads", "4", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PATFAST_CACHE=str(out) + "-cache")
    env.pop("PATFAST_TEST_KILL", None)
    if kill:
        env["PATFAST_TEST_KILL"] = kill
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def summary(out):
    with open(os.path.join(out, "summary.csv")) as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, teacher):
    out = tmp_path_factory.mktemp("runs") / "whole"
    train(out, teacher)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["step:6", "step:11", "step:14", "save:2", "save:3"],
                         ids=["mid-epoch-1", "end-of-epoch-1", "mid-epoch-2", "inside-a-mid-epoch-save",
                              "inside-the-epoch-end-save"])
def test_kill_and_resume_gives_the_uninterrupted_run(tmp_path, teacher, uninterrupted, kill):
    # 11 steps per epoch (1,437 images, batch 128): checkpoints after steps 4, 8, (end of epoch 1), 12, 16, 20
    # and at the end of epoch 2; "step:N" kills after step N (before its checkpoint), "save:N" inside write N
    out = tmp_path / "run"
    killed = train(out, teacher, kill=kill, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert os.path.isfile(out / "last.pth")  # the previous checkpoint survived (a kill inside a save included)
    resumed = train(out, teacher, "--resume", str(out))
    assert "resumed from" in resumed.stdout
    assert summary(out) == summary(uninterrupted)
    a, b = load_file(out / "student.safetensors"), load_file(uninterrupted / "student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    e1, e2 = load_file(out / "student_ema.safetensors"), load_file(uninterrupted / "student_ema.safetensors")
    assert all(torch.equal(e1[k], e2[k]) for k in e1)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_143(tmp_path, teacher):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "patfast", "train", "--data", "digits", "--teacher", "convnext_atto",
            "--student", "resnet10t", "--teacher-checkpoint", teacher, "--img-size", "32", "--batch-size", "128",
            "--epochs", "50", "--no-progress", "--out", str(out), "--pat-dim", "64", "--pat-heads", "4"]
    proc = subprocess.Popen(argv, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "log.txt").exists() or "step: " not in (out / "log.txt").read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.5)
    time.sleep(2)  # inside the first epoch's steps
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err and "--resume" in err
    assert (out / "log.txt").read_text().strip().splitlines()[-1] == err.strip().splitlines()[-1]  # the log says it
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["step"] >= 1


@pytest.mark.slow
def test_nonfinite_losses_stop_with_status_3_and_keep_the_checkpoint(tmp_path, teacher):
    out = tmp_path / "run"
    proc = train(out, teacher, "--lr", "1e12", "--nonfinite-patience", "3", "--distiller", "none",
                 "--checkpoint-every", "1", check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("patfast: 3 consecutive steps with a non-finite loss (loss_gt)"), line
    state = torch.load(out / "last.pth", weights_only=True)  # the last checkpoint before the NaNs, readable
    assert all(torch.isfinite(v).all() for v in state["distiller"].values() if v.is_floating_point())


def test_resume_refuses_another_config(tmp_path, teacher, uninterrupted):
    proc = train(uninterrupted, teacher, "--resume", str(uninterrupted), "--lr", "0.3", check=False)
    assert proc.returncode == 2
    assert "cannot resume from" in proc.stderr and "lr" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def bare_resume(out, *extra):
    """`patfast train --resume OUT` and nothing else (what the stop message prints), in train()'s environment."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PATFAST_CACHE=str(out) + "-cache")
    env.pop("PATFAST_TEST_KILL", None)
    argv = [sys.executable, "-m", "patfast", "train", "--resume", str(out), *extra]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_resume_dir_alone_continues_with_the_runs_config_and_epochs_extend_it(tmp_path, teacher, uninterrupted):
    # issue 16 bug 2: `--resume D` was refused ("another config: epochs (2 -> 15)"): the command line's defaults
    # were compared with the run's config instead of starting from it
    out = tmp_path / "run"
    killed = train(out, teacher, kill="step:6", check=False)
    assert killed.returncode == -signal.SIGKILL
    resumed = bare_resume(out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert summary(out) == summary(uninterrupted)
    again = bare_resume(out)  # finished: nothing to train, said so
    assert again.returncode == 0 and "nothing left to train" in again.stdout, again.stderr[-2000:]
    longer = bare_resume(out, "--epochs", "3")  # extended: one more epoch, said so
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "--epochs 2 -> 3" in longer.stdout
    rows = summary(out)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and rows[:2] == summary(uninterrupted)
    shorter = bare_resume(out, "--epochs", "2")
    assert shorter.returncode == 2 and "reached epoch 3" in shorter.stderr
    other = bare_resume(out, "--lr", "0.3")  # what is given still counts as a change
    assert other.returncode == 2 and "lr" in other.stderr and "cannot resume" in other.stderr


@pytest.mark.slow
def test_ctrl_c_in_the_demo_teacher_phase_keeps_the_teacher(tmp_path):
    # issue 16 bug 3: the printed `--resume <cache>/....partial` was refused (a `patfast teacher` run) and a rerun
    # deleted the partial teacher; now the same command (or --resume OUT) continues the teacher where it stopped,
    # and the teacher it finishes is the one an uninterrupted run trains (bit for bit, --deterministic)
    def demo(out, cache, kill=None, resume=False):
        argv = [sys.executable, "-m", "patfast", "train", "--teacher", "resnet10t", "--student", "resnet10t",
                "--teacher-epochs", "1", "--epochs", "1", "--batch-size", "128", "--img-size", "32", "--pat-dim",
                "64", "--pat-heads", "4", "--deterministic", "--no-progress"]
        argv += ["--resume", str(out)] if resume else ["--out", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PATFAST_CACHE=str(cache))
        env.pop("PATFAST_TEST_KILL", None)
        if kill:
            env["PATFAST_TEST_KILL"] = kill
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)

    stopped = demo(tmp_path / "run", tmp_path / "cache", kill="step:5:int:0")
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert "while training the teacher" in last and f"--resume {tmp_path / 'run'}" in last, last
    (partial,) = (tmp_path / "cache" / "teachers").glob("*.partial")
    assert (partial / "last.pth").is_file()
    resumed = demo(tmp_path / "run", tmp_path / "cache", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "continuing the teacher stopped in" in resumed.stdout
    assert not partial.exists()
    whole = demo(tmp_path / "whole", tmp_path / "cache-whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    (a,) = (tmp_path / "cache" / "teachers").glob("*/teacher.safetensors")
    (b,) = (tmp_path / "cache-whole" / "teachers").glob("*/teacher.safetensors")
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
