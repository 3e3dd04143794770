"""Short real runs of the loop (small model, bundled digits): teacher command, precision modes, mixup, determinism."""

import csv

import pytest
import torch

from patfast.cli import main

SMALL = ["--teacher", "resnet10t", "--epochs", "1", "--batch-size", "64", "--no-progress", "--img-size", "32"]


def summary(folder):
    with open(folder / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_teacher_command_and_fine_tune(tmp_path, capsys):
    assert main(["teacher", *SMALL, "--out", str(tmp_path / "t1")]) == 0
    weights = tmp_path / "t1" / "teacher.safetensors"
    assert weights.is_file()
    first = summary(tmp_path / "t1")[0]
    # fine-tuning from those weights starts where the first run ended: its first-epoch loss is lower
    assert main(["teacher", *SMALL, "--init-checkpoint", str(weights), "--out", str(tmp_path / "t2")]) == 0
    second = summary(tmp_path / "t2")[0]
    assert float(second["train_loss"]) < float(first["train_loss"])
    assert "teacher resnet10t" in capsys.readouterr().out


@pytest.fixture
def tiny_folder(tmp_path):
    """An ImageFolder of 2 colour classes, 16 train and 4 val images each: one training step per epoch at batch 32."""
    from PIL import Image

    for split, n in (("train", 16), ("val", 4)):
        for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            folder = tmp_path / "tiny" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 12), tuple(max(0, c - 3 * i) for c in colour)).save(folder / f"{i}.png")
    return tmp_path / "tiny"


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, tiny_folder, amp):
    # 16-bit convolutions are slow on a CPU: one step (fp16 also goes through the grad scaler)
    argv = ["teacher", "--data", f"imagefolder:{tiny_folder}", "--teacher", "resnet10t", "--epochs", "1",
            "--batch-size", "32", "--img-size", "32", "--no-progress", "--amp", amp, "--out", str(tmp_path / amp)]
    assert main(argv) == 0
    row = summary(tmp_path / amp)[0]
    assert float(row["train_loss"]) > 0 and 0 <= float(row["eval_top1"]) <= 100


def test_mixup_cutmix_run(tmp_path):
    assert main(["teacher", *SMALL, "--mixup", "0.8", "--cutmix", "1.0", "--out", str(tmp_path / "m")]) == 0
    assert float(summary(tmp_path / "m")[0]["loss_gt"]) > 0


def test_same_seed_same_run_with_deterministic(tmp_path):
    argv = ["teacher", *SMALL, "--deterministic", "--seed", "3"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    torch.use_deterministic_algorithms(False)
    a, b = summary(tmp_path / "a")[0], summary(tmp_path / "b")[0]
    for key in ("train_loss", "eval_top1", "eval_top5", "ema_top1"):
        assert a[key] == b[key], key
