"""The baselines (ofa, dkd, dist, fitnet) as a user runs them: each trains a CNN and a token student end to end
through `patfast train`, logs its own loss terms, and resumes exactly after kill -9 (summary.csv and the final
weights bit for bit, --deterministic on the CPU). A small ImageFolder of the bundled digits keeps the runs short."""

import csv
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from patfast.cli import main

DISTILLERS = ("ofa", "dkd", "dist", "fitnet")
STUDENTS = {"cnn": "resnet10t", "tokens": "deit_tiny_patch16_224"}
TERMS = {"ofa": ["loss_gt", "loss_kd", "loss_ofa"], "dkd": ["loss_gt", "loss_kd"], "dist": ["loss_gt", "loss_kd"],
         "fitnet": ["loss_gt", "loss_fit"]}
# which student the kill/resume test uses for each (the other kind is covered by the end-to-end test): OFA's token
# branch and FitNet's token -> map projection are the harder halves
RESUME_STUDENT = {"ofa": "tokens", "dkd": "cnn", "dist": "tokens", "fitnet": "tokens"}
TIMING = ("img_per_s", "epoch_s")


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory):
    """8 training and 2 validation images of each bundled digit, as an ImageFolder (5 steps of 16 per epoch)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("data") / "digits"
    digits = load_digits()
    for split, first, n in (("train", 0, 8), ("val", 8, 2)):
        for label in range(10):
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            for i, image in enumerate(digits.images[digits.target == label][first:first + n]):
                Image.fromarray((image * 255 / 16).astype("uint8")).convert("RGB").save(folder / f"{i}.png")
    return root


def argv(data, teacher, out, distiller, student, *extra):
    return ["train", "--data", f"imagefolder:{data}", "--teacher", "convnext_atto", "--teacher-checkpoint", teacher,
            "--student", STUDENTS[student], "--distiller", distiller, "--img-size", "32", "--batch-size", "16",
            "--epochs", "2", "--warmup-epochs", "1", "--deterministic", "--no-progress", "--out", str(out), *extra]


def rows(out):
    with open(os.path.join(out, "summary.csv")) as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


@pytest.mark.slow
@pytest.mark.parametrize("student", STUDENTS)
@pytest.mark.parametrize("distiller", DISTILLERS)
def test_each_baseline_trains_a_cnn_and_a_token_student(tmp_path, small_digits, teacher, distiller, student):
    out = tmp_path / "run"
    assert main(argv(small_digits, teacher, out, distiller, student)) == 0
    got = rows(out)
    assert len(got) == 2
    for term in TERMS[distiller]:
        values = [float(r[term]) for r in got]
        assert all(math.isfinite(v) for v in values) and any(v != 0 for v in values), (term, values)
    log = (out / "log.txt").read_text()
    assert f"distiller: {distiller}" in log
    start = load_file(out / "student.safetensors")
    assert all(torch.isfinite(v).all() for v in start.values() if v.is_floating_point())


def _run(args, kill=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PATFAST_TEST_KILL", None)
    if kill:
        env["PATFAST_TEST_KILL"] = kill
    return subprocess.run([sys.executable, "-m", "patfast", *args], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("distiller", DISTILLERS)
def test_each_baseline_resumes_exactly_after_kill_9(tmp_path, small_digits, teacher, distiller):
    # 5 steps per epoch; checkpoints every 3 steps; killed after step 7 (mid-epoch 2, after the step-6 checkpoint).
    # DKD's warm-up over 4 epochs makes its weight differ per epoch (0.25, 0.5): the resumed epoch must set it.
    extra = ("--checkpoint-every", "3") + (("--dkd-warmup-epochs", "4") if distiller == "dkd" else ())
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    student = RESUME_STUDENT[distiller]
    done = _run(argv(small_digits, teacher, whole, distiller, student, *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    killed = _run(argv(small_digits, teacher, cut, distiller, student, *extra), kill="step:7")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = _run(["train", "--resume", str(cut)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert rows(cut) == rows(whole)
    for name in ("student.safetensors", "student_ema.safetensors"):
        a, b = load_file(cut / name), load_file(whole / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
