"""The map aligner's exact rewrite (BatchNorm + 1x1 conv on the grid, nearest resize last) against the plain order."""

import copy

import pytest
import torch

from patfast.distill.aligners import MapAligner, nearest_counts
from patfast.models.stages import StageShape


def test_nearest_counts_follow_interpolate():
    for src, dst in [(4, 56), (4, 7), (4, 14), (4, 3), (4, 4), (2, 9)]:
        counts = nearest_counts(src, dst)
        assert counts.sum() == dst
        x = torch.arange(src, dtype=torch.float64).view(1, 1, src)
        up = torch.nn.functional.interpolate(x, size=dst, mode="nearest").view(-1)
        assert counts.tolist() == [float((up == i).sum()) for i in range(src)]


def _pair(hw, dtype):
    target = StageShape("map", 24, hw[0], hw[1])
    plain = MapAligner(32, target, upsample_last=False).to(dtype)
    with torch.no_grad():  # non-trivial affine parameters
        plain.bn.weight.uniform_(0.5, 1.5)
        plain.bn.bias.uniform_(-0.5, 0.5)
    fast = copy.deepcopy(plain)
    fast.upsample_last = True
    return plain, fast


def _step(module, x, grad):
    x = x.detach().clone().requires_grad_()
    module.zero_grad()
    y = module(x)
    (y * grad).sum().backward()
    stats = [module.bn.running_mean.clone(), module.bn.running_var.clone()]
    return [y, x.grad] + [p.grad for p in module.parameters()] + stats


HW = [(56, 56), (7, 7), (14, 10), (3, 5), (4, 4)]


@pytest.mark.parametrize("hw", HW)
def test_upsample_last_is_the_same_computation_in_float64(hw):
    # In exact arithmetic the two orders are the same function; in float64 they agree to rounding.
    torch.manual_seed(0)
    plain, fast = _pair(hw, torch.float64)
    for step in range(3):  # several training steps: running statistics too
        x = torch.randn(5, 16, 32, dtype=torch.float64) * 2 + 0.3
        grad = torch.randn(5, 24, *hw, dtype=torch.float64)
        for a, b in zip(_step(fast, x, grad), _step(plain, x, grad)):
            torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)
        assert int(fast.bn.num_batches_tracked) == int(plain.bn.num_batches_tracked) == step + 1
    plain.eval()
    fast.eval()
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    torch.testing.assert_close(fast(x), plain(x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("hw", HW)
def test_upsample_last_in_float32_is_as_accurate_as_the_plain_order(hw):
    # float32: both orders round differently; against a float64 run, the rewrite's error (values, input, parameter
    # gradients and running statistics) is no larger than the plain order's own, up to a factor 2 + 1e-6.
    torch.manual_seed(0)
    plain, fast = _pair(hw, torch.float32)
    truth = copy.deepcopy(plain).double()
    for _ in range(2):
        x = torch.randn(5, 16, 32) * 2 + 0.3
        grad = torch.randn(5, 24, *hw)
        exact = _step(truth, x.double(), grad.double())
        for name, a, b, t in zip(["y", "x.grad", "bn.weight.grad", "bn.bias.grad", "conv.weight.grad",
                                  "running_mean", "running_var"], _step(fast, x, grad), _step(plain, x, grad), exact):
            err_fast, err_plain = (a.double() - t).abs().max(), (b.double() - t).abs().max()
            assert err_fast <= 2 * err_plain + 1e-6 * t.abs().max(), (name, err_fast.item(), err_plain.item())


def test_upsample_last_under_bf16_autocast_is_close():
    torch.manual_seed(1)
    target = StageShape("map", 24, 14, 14)
    plain = MapAligner(32, target, upsample_last=False)
    fast = copy.deepcopy(plain)
    fast.upsample_last = True
    x = torch.randn(4, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = plain(x), fast(x)
    assert y2.dtype == y1.dtype
    torch.testing.assert_close(y2.float(), y1.float(), atol=0.05, rtol=0.02)
