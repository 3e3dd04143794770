"""The fast path computes what the reference path computes (CPU, fp32).

fast: torch.compile of the whole distiller forward (real Inductor on the CPU), channels_last, the aligners'
upsample-last rewrite, ops "auto". reference: eager, plain aligners, ops "reference". Same seed, same batches:
the loss terms and every trainable parameter's gradient agree at each of several steps (so do the weights after
them), and the feedback state that carries over between steps.
"""

import pytest
import torch

from patfast.distill.build import build_distiller
from patfast.models.create import create_model
from patfast.train.step import Speed, TrainStep

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
FAST = Speed(compile=True, compile_mode="default", amp=None, channels_last=True)
REFERENCE = Speed(compile=False, compile_mode="default", amp=None, channels_last=False)


def make_step(speed: Speed, backend: str) -> TrainStep:
    torch.manual_seed(0)
    teacher = create_model("convnext_atto", 10, 32)
    student = create_model("resnet10t", 10, 32)
    distiller = build_distiller("pat", student, teacher, img_size=32, data_mean=MEAN, data_std=STD, backend=backend,
                                dim=64, num_heads=4)
    distiller.train()
    params = distiller.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=0.02, momentum=0.9)
    return TrainStep(distiller, optimizer, params, speed, torch.device("cpu"), clip=5.0)


def grads(step: TrainStep) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in step.distiller.named_parameters()
            if p.requires_grad and not n.startswith("teacher.") and p.grad is not None}


@pytest.mark.slow
def test_fast_path_matches_reference_path_over_steps(one_thread_seeded):
    fast, ref = make_step(FAST, "auto"), make_step(REFERENCE, "reference")
    assert any(not a.upsample_last for a in ref.distiller.aligners if hasattr(a, "upsample_last"))
    g = torch.Generator().manual_seed(1)
    for i in range(4):  # step 0 has no feedback (runs eagerly); steps 1-3 fuse it through the compiled graph
        x = torch.randn(8, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        lf, lr = fast(x, y, step=i), ref(x, y, step=i)
        assert lf.keys() == lr.keys()
        for k in lr:
            torch.testing.assert_close(lf[k], lr[k], rtol=2e-4, atol=1e-5, msg=f"step {i}: {k}")
        gf, gr = grads(fast), grads(ref)
        assert gf.keys() == gr.keys() and len(gr) > 50
        for n in gr:
            scale = gr[n].abs().max().item()  # (atol: the k bias gradient is 0 up to rounding)
            err = (gf[n] - gr[n]).abs().max().item()
            assert err <= 2e-3 * scale + 1e-5, f"step {i}: gradient of {n} differs by {err:.3g} (max {scale:.3g})"
        for name, pf in fast.distiller.prompts.items():
            torch.testing.assert_close(pf.feedback, ref.distiller.prompts[name].feedback, rtol=1e-3, atol=1e-4)
    for (n, pf), pr in zip(fast.distiller.named_parameters(), ref.distiller.parameters()):
        torch.testing.assert_close(pf, pr, rtol=1e-4, atol=1e-5, msg=n)
