"""What a new user sees from `patfast bench` on a machine without a GPU: no profiler noise on stderr, --no-compile
taking a warm-up of 1 and saying its fast path is not compiled, no unit after a figure that is not there, and a
compact plain-text kernel table (markdown only with --md). Every test runs the real CLI, at tiny sizes."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from patfast.bench import train as bench_train
from patfast.cli import main
from patfast.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA prints")
TINY_TRAIN = ["bench", "train", "--teacher", "convnext_atto", "--student", "resnet10t", "--img-size", "32",
              "--batch-size", "2", "--classes", "10", "--pat-dim", "64", "--pat-heads", "4", "--steps", "1",
              "--device", "cpu"]
# what Kineto (torch.profiler's backend) writes to stderr from C++ when it looks for a GPU that is not there
PROFILER_NOISE = re.compile(r"gpuGetDeviceCount|profiler_start|profiler_stop|USDT:|Kineto|CUPTI", re.IGNORECASE)


def patfast(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-m", "patfast", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@cpu_only
def test_the_time_split_prints_no_profiler_noise_without_cuda(tmp_path):
    path = tmp_path / "e2e.json"
    train = patfast(*TINY_TRAIN, "--paths", "reference", "--warmup", "2", "--json", str(path))
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert not PROFILER_NOISE.search(train.stderr), train.stderr
    (row,) = json.loads(path.read_text())
    assert row["split"]["reference"]["student"] > 0 and row["split"]["reference"]["teacher_prompted"] > 0


@cpu_only
def test_the_launch_count_prints_no_profiler_noise_without_cuda():
    # --interpret-check (the dry run) runs the launch counter's profiler code once per op on the CPU
    kernels = patfast("bench", "kernels", "--op", "kd", "--classes", "41", "--interpret-check")
    assert kernels.returncode == 0, kernels.stdout[-3000:] + kernels.stderr[-3000:]
    assert not PROFILER_NOISE.search(kernels.stderr), kernels.stderr


@cpu_only
def test_interpret_check_switches_to_the_interpreter_itself():
    # without TRITON_INTERPRET in the environment: bench kernels sets it before Triton is first imported
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "patfast", "bench", "kernels", "--op", "kd", "--classes", "41",
                           "--interpret-check"], cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Triton through the interpreter" in proc.stdout, proc.stdout


def test_no_compile_takes_a_warmup_of_1_and_compiling_still_needs_2(tmp_path, capsys):
    path = tmp_path / "e2e.json"
    code = main([*TINY_TRAIN, "--no-compile", "--warmup", "1", "--paths", "fast,reference", "--no-split",
                 "--json", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    (row,) = json.loads(path.read_text())
    assert row["fast_img_s"] > 0 and row["reference_img_s"] > 0
    for argv, needle in (([*TINY_TRAIN, "--warmup", "1"], "--warmup must be >= 2 when the fast path or the floor "
                          "is compiled"),
                         ([*TINY_TRAIN, "--no-compile", "--warmup", "0"], "--warmup must be >= 1")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("patfast: error: ") and needle in err and len(err.strip().splitlines()) == 1, err
    # the reference path is never compiled: 1 is enough for it alone; so is 1 for anything uncompiled
    bench_train.check_warmup(1, True, ["reference"])
    bench_train.check_warmup(1, False, ["fast", "reference", "floor"])
    with pytest.raises(UserError):
        bench_train.check_warmup(1, True, ["floor"])


def test_no_compile_labels_the_fast_column_as_not_compiled(tmp_path, capsys):
    md = tmp_path / "e2e.md"
    assert main([*TINY_TRAIN, "--no-compile", "--warmup", "2", "--paths", "fast", "--no-split", "--md", str(md)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^fast \(no torch\.compile\): [\d.]+ img/s", out, re.MULTILINE), out
    for text in (out, md.read_text()):
        assert "| fast (no torch.compile) img/s |" in text and "| fast img/s |" not in text, text
        assert "is the fast path without torch.compile" in text, text


@cpu_only
def test_bench_data_writes_no_unit_after_a_figure_that_is_missing(capsys, monkeypatch):
    import patfast.data.dali as dali

    monkeypatch.setattr(dali, "dali_available", lambda: False)  # the backend that cannot run here
    code = main(["bench", "data", "--data-backend", "dali", "--img-size", "32", "--batch-size", "8", "--batches",
                 "1", "--workers", "0", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "not measured img/s" not in out and "FAILED img/s" not in out, out
    assert re.search(r"^ +dali: not measured \(NVIDIA DALI is not installed here", out, re.MULTILINE), out
    assert "PAT step swin_tiny_patch4_window7_224 -> resnet18 at batch 8, 32 px: not measured (no CUDA GPU here)" \
        in out, out


@cpu_only
def test_bench_kernels_prints_a_compact_table_and_markdown_only_with_md(tmp_path, capsys):
    code = main(["bench", "kernels", "--op", "kd", "--classes", "41"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "## Kernels" not in out and not [line for line in out.splitlines() if line.startswith("|")], out
    for op in ("kd_loss_pair", "kd_loss"):
        for mode in ("fwd", "fwd+bwd"):  # one aligned line per kernel and shape, the time in the eager column
            assert re.search(rf"^{re.escape(op)} +K=41 +1  {re.escape(mode)} +[\d.]+ (us|ms)$", out, re.MULTILINE), out
    assert "triton: no CUDA" in out and "--md PATH" in out  # the summary: what was not measured, why; where the rest is
    assert len(out.splitlines()) <= 25, out
    assert not re.search(r"issue\s*#?\s*\d", out, re.IGNORECASE), out
    md = tmp_path / "k.md"
    assert main(["bench", "kernels", "--op", "kd", "--classes", "41", "--md", str(md)]) == 0
    out = capsys.readouterr().out
    for text in (out, md.read_text()):
        assert "## Kernels" in text and "| K | B | mode | provider |" in text, text
        assert not re.search(r"issue\s*#?\s*\d", text, re.IGNORECASE), text
    with pytest.raises(SystemExit):
        main(["bench", "kernels", "--help"])
    assert not re.search(r"issue\s*#?\s*\d", capsys.readouterr().out, re.IGNORECASE)
