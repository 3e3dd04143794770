"""The command line: the end-to-end run on bundled data, its output files, and one-line user errors (exit 2)."""

import csv
import os
import subprocess
import sys

import pytest
import torch
import yaml

from patfast.cli import main
from patfast.models.create import create_model
from patfast.models.weights import save_weights

FAST = ["--epochs", "1", "--teacher-epochs", "1", "--batch-size", "64", "--pat-dim", "64", "--no-progress"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, needle):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("patfast: error: "), err
    assert needle in lines[0], err
    assert "Traceback" not in err


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PATFAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.slow
def test_train_on_bundled_data_writes_every_output(tmp_path, cache, capsys, assert_config_reusable):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", *FAST, "--out", str(out))
    assert code == 0, err
    # the teacher was trained first and cached
    cached = list(cache.glob("teachers/*/teacher.safetensors"))
    assert len(cached) == 1
    for args_yaml in (out / "args.yaml", cached[0].parent / "args.yaml"):  # a train and a teacher run's
        assert_config_reusable(args_yaml)
    for name in ("args.yaml", "summary.csv", "last.pth", "student.safetensors", "student_ema.safetensors",
                 "curves.png", "log.txt"):
        assert (out / name).is_file(), name
    cfg = yaml.safe_load((out / "args.yaml").read_text())
    assert cfg["distiller"] == "pat" and cfg["data"] == "digits" and cfg["epochs"] == 1
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == 1
    for col in ("epoch", "lr", "train_loss", "loss_gt", "loss_kd", "loss_fd", "loss_reg", "eval_top1", "eval_top5",
                "ema_top1", "img_per_s", "epoch_s"):
        assert rows[0][col] != "", col
    terms = sum(float(rows[0][t]) for t in ("loss_gt", "loss_kd", "loss_fd", "loss_reg"))
    assert float(rows[0]["train_loss"]) == pytest.approx(terms, rel=1e-4)
    assert 0 <= float(rows[0]["eval_top1"]) <= 100
    # the paper's metric: the best over epochs (one here) of max(raw, EMA)
    assert float(rows[0]["best_top1"]) == max(float(rows[0]["eval_top1"]), float(rows[0]["ema_top1"]))
    assert "== result on the digits test split" in stdout and "teacher resnet10t" in stdout
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["epoch"] == 1 and not any(k.startswith("teacher.") for k in state["distiller"])

    # eval of the saved student reproduces the accuracy the run reported
    code, stdout, err = run_cli(capsys, "eval", "--checkpoint", str(out / "student.safetensors"), "--no-progress")
    assert code == 0, err
    assert f"top-1 {float(rows[0]['eval_top1']):.2f}%" in stdout
    code, stdout, err = run_cli(capsys, "eval", "--checkpoint", str(out / "last.pth"), "--no-progress")
    assert code == 0, err
    assert f"top-1 {float(rows[0]['eval_top1']):.2f}%" in stdout

    # a second run reuses the cached teacher; an existing run directory is refused
    code, stdout, err = run_cli(capsys, "train", *FAST, "--distiller", "kd", "--out", str(tmp_path / "run2"))
    assert code == 0, err
    assert "using the cached resnet10t" in stdout
    code, _, err = run_cli(capsys, "train", *FAST, "--out", str(out))
    assert_user_error(code, err, "already holds a run")


def test_info(capsys):
    code, out, _ = run_cli(capsys, "info")
    assert code == 0
    assert "torch" in out and "op backends" in out and "digits" in out


@pytest.fixture
def other_checkpoint(tmp_path):
    path = str(tmp_path / "resnet.safetensors")
    save_weights(create_model("resnet10t", 10, 32), path, {"model": "resnet10t"})
    return path


@pytest.mark.parametrize("argv, needle", [
    (["train", "--data", "cifar100:/no/such/dir"], "directory not found"),
    (["train", "--data", "mnist"], "unknown data spec"),
    (["train", "--student", "resnet1000"], "unknown timm model 'resnet1000'"),
    (["train", "--teacher", "swin_tinny_patch4_window7_224", "--teacher-checkpoint", "x.safetensors"],
     "unknown timm model"),
    (["train", "--pat-afp-stage", "5"], "--pat-afp-stage"),
    (["train", "--img-size", "8"], "too small"),
    (["train", "--config", "/no/such.yaml"], "config file not found"),
    (["train", "--epochs", "-1"], "--epochs"),
    (["train", "--bogus-flag"], "unrecognized arguments"),
    (["train", "--device", "cuda"], "CUDA is not available"),
    (["train", "--teacher-checkpoint", "/no/such.safetensors"], "checkpoint not found"),
    (["eval"], "--checkpoint is required"),
    ([], "choose a command"),
])
def test_user_errors_are_one_line_exit_2(argv, needle, capsys, cache, tmp_path):
    if torch.cuda.is_available() and "cuda" in argv:
        pytest.skip("CUDA is available here")
    argv = argv + (["--out", str(tmp_path / "o")] if argv[:1] == ["train"] else [])
    code, _, err = run_cli(capsys, *argv)
    assert_user_error(code, err, needle)


def test_mismatched_teacher_checkpoint_names_the_problem(other_checkpoint, capsys, cache, tmp_path):
    code, _, err = run_cli(capsys, "train", "--teacher", "convnext_atto", "--teacher-checkpoint", other_checkpoint,
                           "--out", str(tmp_path / "o"), *FAST)
    assert_user_error(code, err, "does not fit the model")
    assert "saved for resnet10t" in err and "missing keys" in err


def test_invalid_config_file(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: [1, 2\n")
    code, _, err = run_cli(capsys, "train", "--config", str(f))
    assert_user_error(code, err, "cannot read config file")


def test_corrupt_data_is_a_user_error(tmp_path, capsys):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(b"\x80\x04not a pickle")
    code, _, err = run_cli(capsys, "train", "--data", f"cifar100:{folder}", "--teacher-checkpoint", "x",
                           "--out", str(tmp_path / "o"))
    assert code == 2 and err.startswith("patfast: error: ") and len(err.strip().splitlines()) == 1


def test_console_script_exit_status(tmp_path):
    env = {**os.environ, "PATFAST_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "patfast", "train", "--data", "nope"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("patfast: error: unknown data spec 'nope'")


@pytest.mark.slow
def test_what_a_checkpoint_says_about_itself_is_used(tmp_path, cache, capsys):
    # issue 16 item 12: a last.pth is a teacher checkpoint; its model needs no --teacher; a ViT teacher trained at
    # 64px used at 32px says which --img-size to use; eval without --data evaluates on the data the model was trained on
    torch.manual_seed(0)
    atto = create_model("convnext_atto", 10, 32).state_dict()
    last = tmp_path / "teacher-run" / "last.pth"
    last.parent.mkdir()
    torch.save({"version": 1, "distiller": {f"student.{k}": v for k, v in atto.items()}, "ema": None,
                "config": {"command": "teacher", "teacher": "convnext_atto", "img_size": 32, "data": "digits"}}, last)
    code, stdout, err = run_cli(capsys, "train", "--teacher-checkpoint", str(last), "--student", "resnet10t",
                                "--distiller", "kd", "--epochs", "1", "--img-size", "32", "--batch-size", "128",
                                "--no-progress", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert f"teacher: convnext_atto from {last}" in stdout

    vit = tmp_path / "vit64.safetensors"
    save_weights(create_model("deit_tiny_patch16_224", 10, 64), str(vit), {"model": "deit_tiny_patch16_224",
                                                                          "img_size": 64, "num_classes": 10})
    code, _, err = run_cli(capsys, "train", "--teacher-checkpoint", str(vit), "--student", "resnet10t", "--distiller",
                           "kd", "--epochs", "1", "--img-size", "32", "--no-progress", "--out", str(tmp_path / "r2"))
    assert_user_error(code, err, "was trained at 64px and does not fit a deit_tiny_patch16_224 built for 32px: use "
                                 "--img-size 64")

    from PIL import Image

    root = tmp_path / "icons"
    for split in ("train", "val"):
        for c, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (12, 12), colour).save(root / split / c / f"{i}.png")
    model = tmp_path / "icons.safetensors"
    save_weights(create_model("resnet10t", 2, 32), str(model), {"model": "resnet10t", "img_size": 32,
                                                                "num_classes": 2, "data": f"imagefolder:{root}"})
    code, stdout, err = run_cli(capsys, "eval", "--checkpoint", str(model), "--no-progress")
    assert code == 0, err
    assert f"resnet10t on imagefolder:{root} val split (4 images, 32px)" in stdout


def test_help_groups_the_flags_and_shows_the_defaults_that_apply(capsys):
    # issue 16 item 8: one flat list of 60 flags, defaults the demo does not use, "(default: None)", doubled texts
    import re

    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    headings = re.findall(r"^(\w[\w ()]*):$", text, flags=re.M)
    assert headings[:1] == ["options"] and headings[1:] == ["data", "models", "distiller", "optimisation", "speed",
                                                            "output and resuming", "distributed (torchrun)"]
    flat = " ".join(text.split())
    assert "default: None" not in flat and "(default: True)" not in flat
    assert "--epochs EPOCHS training epochs (default on the bundled digits: 10; other data: 300)" in flat
    assert "--student STUDENT student timm model name (default on the bundled digits: deit_tiny_patch16_224" in flat
    assert "--lr LR peak learning rate (default: CNN students 0.05, ViT/MLP students 0.0005)" in flat
    for option in re.split(r"\n  (?=--)", text):  # one default text per flag
        assert option.count("default:") + option.count("(default on") <= 1, option
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "(.safetensors or last.pth) (required)" in flat
    assert "--img-size SIZE input size (default: the checkpoint's, else 224)" in flat
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip().startswith("patfast 0.")
