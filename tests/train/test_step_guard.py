"""TrainStep decides the non-finite skip on the device: no host read inside a step, and a skipped step changes no
parameter, optimizer state or EMA value (CPU, real tensors, the fused optimizers the loop uses).

"No host read" is checked by making every way a tensor's value reaches Python (item, bool, float, int, index,
tolist, numpy) raise while the step runs: on the CPU such a read costs nothing, on CUDA each one waits for the GPU.
"""

import contextlib
import copy

import pytest
import torch
from timm.utils import ModelEmaV3

from patfast.distill.build import DistillSettings, build_distiller
from patfast.models.create import create_model
from patfast.train.ema import update_ema
from patfast.train.nonfinite import NonFiniteTally
from patfast.train.optim import make_optimizer
from patfast.train.step import Speed, TrainStep, supports_found_inf

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
EAGER = Speed(compile=False, compile_mode="default", amp=None, channels_last=False)
FP16 = Speed(compile=False, compile_mode="default", amp=torch.float16, channels_last=False)
HOST_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")


@contextlib.contextmanager
def no_host_reads():
    """Every read of a tensor value into Python raises inside the block."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read inside the step: Tensor.{name}")
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def make_step(opt="sgd", fused=True, speed=EAGER, distiller="pat", ema=True):
    torch.manual_seed(0)
    teacher = create_model("convnext_atto", 10, 32)
    student = create_model("resnet10t", 10, 32)
    d = build_distiller(distiller, student, teacher, DistillSettings(pat_dim=64, pat_heads=4), img_size=32,
                        data_mean=MEAN, data_std=STD)
    d.train()
    params = d.trainable_parameters()
    optimizer = make_optimizer(params, opt, 0.02, 1e-3, fused=fused)
    step = TrainStep(d, optimizer, params, speed, torch.device("cpu"), clip=5.0)
    step.ema = ModelEmaV3(student, decay=0.9) if ema else None
    return step


def batches(n, bad_at=()):
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        x = torch.randn(8, 3, 32, 32, generator=g)
        if i in bad_at:
            x[0, 0, 0, 0] = float("nan")  # one NaN pixel: every loss term becomes NaN
        yield x, torch.randint(0, 10, (8,), generator=g)


def snapshot(step: TrainStep) -> dict[str, torch.Tensor]:
    """Everything a skipped step must leave alone: parameters, optimizer state, EMA (parameters and buffers)."""
    out = {f"param {n}": p.detach().clone() for n, p in step.distiller.named_parameters() if p.requires_grad}
    for i, state in enumerate(step.optimizer.state.values()):
        out.update({f"opt {i} {k}": v.clone() for k, v in state.items() if torch.is_tensor(v)})
    if step.ema is not None:
        out.update({f"ema {k}": v.clone() for k, v in step.ema.module.state_dict().items()})
    return out


def assert_same(before, after):
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed on a skipped step"


@pytest.mark.slow
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_fused_step_reads_nothing_on_the_host_and_a_skipped_step_changes_nothing(one_thread_seeded, opt):
    step = make_step(opt)
    assert supports_found_inf(step.optimizer)
    tally = NonFiniteTally(["loss_gt", "loss_kd", "loss_fd", "loss_reg"], patience=2, device=torch.device("cpu"))
    for i, (x, y) in enumerate(batches(5, bad_at=(3,))):
        before = snapshot(step)
        # step 0 (eager everywhere, before the compiled graph exists) may read `bad` once: see _keep_feedback;
        # step 1 is the first with fusion-block gradients, step 3 the skipped one
        with no_host_reads() if i else contextlib.nullcontext():
            losses = step(x, y, step=i)
            tally.record(step.bad, losses, i + 1)
        if i == 3:
            assert bool(step.bad)
            assert_same(before, snapshot(step))
        else:
            assert not bool(step.bad)
            assert any(not torch.equal(v, snapshot(step)[k]) for k, v in before.items() if k.startswith("param"))
    seen = tally.read()
    assert (seen.skipped, seen.run, seen.stop_step) == (1, 0, -1)
    assert seen.terms == ("loss_gt", "loss_kd", "loss_fd", "loss_reg")


@pytest.mark.slow
def test_fused_sgd_matches_foreach_sgd_over_steps_with_late_gradients(one_thread_seeded):
    """PAT's fusion blocks get their first gradient on step 1: fused SGD alone raises there ("expected Tensor as
    element 1 ... NoneType"); with its buffers primed it follows the for-each SGD."""
    fused, plain = make_step(fused=True, ema=False), make_step(fused=False, ema=False)
    assert not supports_found_inf(plain.optimizer)
    for i, (x, y) in enumerate(batches(3)):
        fused(x, y, step=i)
        plain(x, y, step=i)
    for (n, a), b in zip(fused.distiller.named_parameters(), plain.distiller.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_unprimed_fused_sgd_fails_on_late_gradients():
    """Why prime_momentum exists (torch's fused SGD, 2.11-2.14): a parameter whose first gradient comes after
    the others have momentum buffers."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([a, b], lr=0.1, momentum=0.9, fused=True)
    a.grad = torch.ones(3)
    opt.step()
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    with pytest.raises(TypeError, match="NoneType"):
        opt.step()


@pytest.mark.slow
def test_fp16_scaler_step_skips_on_the_device_and_lowers_the_scale(one_thread_seeded):
    step = make_step(speed=FP16, distiller="kd")
    assert step.scaler is not None and supports_found_inf(step.optimizer)
    data = list(batches(3, bad_at=(2,)))
    for i, (x, y) in enumerate(data[:2]):
        with no_host_reads():
            step(x, y, step=i)
    scale, before = step.scaler.get_scale(), snapshot(step)
    with no_host_reads():
        step(*data[2], step=2)
    assert bool(step.bad)
    assert_same(before, snapshot(step))
    assert step.scaler.get_scale() == scale / 2


def test_masked_ema_update_is_timm_s_update_or_nothing(one_thread_seeded):
    model = create_model("resnet10t", 10, 32)
    ours, timms = ModelEmaV3(model, decay=0.99), ModelEmaV3(model, decay=0.99)
    model.train()(torch.randn(4, 3, 32, 32))  # BatchNorm statistics move too
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    before = copy.deepcopy(ours.module.state_dict())
    update_ema(ours, model, step=50, keep=torch.tensor(True))
    for k, v in ours.module.state_dict().items():
        assert torch.equal(v, before[k]), k
    update_ema(ours, model, step=50, keep=torch.tensor(False))
    timms.update(model, step=50)
    changed = 0
    for (k, a), b in zip(ours.module.state_dict().items(), timms.module.state_dict().values()):
        assert torch.equal(a, b), k
        changed += not torch.equal(a, before[k])
    assert changed > 20
