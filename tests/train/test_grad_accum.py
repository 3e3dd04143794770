"""--grad-accum N: N micro-batches forwarded and backpropagated alone, one update. Without batch statistics it is
one batch of N times the size (float rounding aside); with BatchNorm each micro-batch is normalised alone.
Plus the two ablation switches the recipes use (no AFP, AFP without feedback)."""

import csv
import os
import subprocess
import sys

import pytest
import torch

from patfast.distill.build import DistillSettings, build_distiller
from patfast.models.create import create_model
from patfast.train.optim import make_optimizer
from patfast.train.step import Speed, TrainStep

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
EAGER = Speed(compile=False, compile_mode="default", amp=None, channels_last=False)


def steps(make, accum, data, opt="sgd"):
    """make() builds the distiller (the same weights each time: it seeds); SGD, whose update is linear in the
    gradient (Adam's normalisation would turn rounding in near-zero gradients into whole steps)."""
    d = make().train()
    params = d.trainable_parameters()
    step = TrainStep(d, make_optimizer(params, opt, 1e-3, 0.05, fused=True), params, EAGER, torch.device("cpu"),
                     clip=5.0, accum=accum)
    losses = [step(x, y) for x, y in data]
    return d, losses


def batches(n=2, size=16, classes=10):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n)]


def max_diff(a, b):
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.trainable_parameters(), b.trainable_parameters()))


def maker(name, student="deit_tiny_patch16_224", teacher="convnext_atto", **kw):
    def make():
        torch.manual_seed(0)
        t = create_model(teacher, 10, 32) if name != "none" else None
        common = {"pat_dim": 64, "pat_heads": 4} if name == "pat" else {}
        return build_distiller(name, create_model(student, 10, 32), t, DistillSettings(**common, **kw), img_size=32,
                               data_mean=MEAN, data_std=STD)
    return make


@pytest.mark.parametrize("name", ["none", "kd"])
def test_two_micro_batches_of_8_are_one_batch_of_16_without_batch_statistics(name):
    make = maker(name)  # LayerNorm everywhere: a ConvNeXt teacher, a DeiT student
    data = batches()
    one, l1 = steps(make, 1, data)
    two, l2 = steps(make, 2, data)
    assert max_diff(one, two) < 1e-6  # float rounding of the two halves' sums
    for a, b in zip(l1, l2):
        assert a.keys() == b.keys() and all(abs(a[k].item() - b[k].item()) < 1e-5 for k in a)
    assert max_diff(one, make()) > 1e-4  # the steps did move the weights


def test_batchnorm_normalises_each_micro_batch_alone():
    make = maker("none", student="resnet10t")
    data = batches(n=1)
    one, _ = steps(make, 1, data)
    two, _ = steps(make, 2, data)
    bn = [m for m in two.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    bn_one = [m for m in one.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    assert bn.num_batches_tracked.item() == 2 and bn_one.num_batches_tracked.item() == 1  # running stats: 2 updates
    assert max_diff(one, two) > 1e-5  # other batch statistics: other gradients (as N processes without SyncBN)


def test_a_batch_that_does_not_split_is_refused():
    with pytest.raises(ValueError, match="micro-batches"):
        steps(maker("none", student="resnet10t"), 3, batches(n=1, size=16))


def test_ablations_no_afp_and_afp_without_feedback():
    no_afp, losses = steps(maker("pat", student="resnet10t", pat_afp_stage=()), 1, batches())
    assert len(no_afp.prompts) == 0
    assert all(step_losses["loss_reg"].item() == 0.0 for step_losses in losses)  # no prompt: z'_T = z_T
    no_fb, _ = steps(maker("pat", student="resnet10t", pat_feedback=False), 1, batches())
    assert len(no_fb.prompts) == 4 and all(p.feedback is None for p in no_fb.prompts.values())
    with_fb, _ = steps(maker("pat", student="resnet10t"), 1, batches())
    assert all(p.feedback is not None for p in with_fb.prompts.values())


@pytest.mark.slow
def test_the_cli_run_with_accumulation_matches_the_run_with_the_whole_batch(tmp_path):
    # the loader yields 2 x 32 images per step, the same 64 samples as --batch-size 64: the runs agree to rounding
    def run(out, *extra):
        argv = [sys.executable, "-m", "patfast", "train", "--data", "digits", "--distiller", "none", "--student",
                "deit_tiny_patch16_224", "--img-size", "32", "--epochs", "1", "--no-progress", "--device", "cpu",
                "--no-model-ema", "--out", str(out), *extra]
        proc = subprocess.run(argv, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        with open(out / "summary.csv") as f:
            return list(csv.DictReader(f))[-1], proc.stdout

    (whole, _), (accum, log) = run(tmp_path / "a", "--batch-size", "64"), run(tmp_path / "b", "--batch-size", "32",
                                                                              "--grad-accum", "2")
    assert "32 x 2 accumulated" in log
    assert abs(float(whole["loss_gt"]) - float(accum["loss_gt"])) < 1e-4 * float(whole["loss_gt"])
    assert abs(float(whole["eval_top1"]) - float(accum["eval_top1"])) <= 0.5


def test_sync_bn_converts_what_learns_and_refuses_the_cpu():
    from patfast.errors import UserError
    from patfast.train.distributed import World, sync_batchnorm

    def count(module, kind):
        return sum(isinstance(m, kind) for m in module.modules())

    said = []
    # MobileNetV2: timm's BatchNormAct2d (BatchNorm + activation in one module), and a stage tap on one of them
    d = maker("pat", student="mobilenetv2_100", teacher="resnet10t")()
    x = batches(n=1, size=2)[0][0]
    with torch.no_grad():
        before = d.student.eval()(x)
    sync_batchnorm(d, World(), torch.device("cpu"), said.append)  # one process: nothing to do
    assert "ignored" in said[0] and count(d, torch.nn.SyncBatchNorm) == 0
    with pytest.raises(UserError, match="CUDA"):
        sync_batchnorm(d, World(rank=0, size=2), torch.device("cpu"), said.append)
    teacher_bn = count(d.teacher, torch.nn.BatchNorm2d)
    learning_bn = count(d, torch.nn.modules.batchnorm._BatchNorm) - teacher_bn
    # the conversion itself touches no device; SyncBatchNorm's training forward would need CUDA (not run here)
    sync_batchnorm(d, World(rank=0, size=2), torch.device("cuda"), said.append)
    assert count(d, torch.nn.SyncBatchNorm) == learning_bn > 0
    assert count(d.teacher, torch.nn.BatchNorm2d) == teacher_bn and count(d.teacher, torch.nn.SyncBatchNorm) == 0
    with torch.no_grad():  # eval mode runs on the CPU: the activations survived, and the stage taps still capture
        after = d.student.eval()(x)
    assert torch.equal(before, after)
    assert all(r is not None for r in d.student_taps._raw)
