"""The multi-input ops PAT uses (hcl_loss_stages, kd_loss_pair): Triton (interpreter on CPU) against reference."""

import pytest
import torch

from patfast import ops


def _leaf(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 2).requires_grad_()


def _grads(fn, inputs):
    out = fn(*inputs)
    total = sum(o * (i + 1.5) for i, o in enumerate(out if isinstance(out, tuple) else (out,)))
    return out, torch.autograd.grad(total, [x for x in inputs if x.requires_grad])


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_pair_matches_reference(temperature):
    s, pt, t = _leaf(3, 41, seed=1), _leaf(3, 41, seed=2), _leaf(3, 41, seed=3).detach()
    ref, ref_g = _grads(lambda a, b, c: ops.kd_loss_pair(a, b, c, temperature, backend="reference"), (s, pt, t))
    tri, tri_g = _grads(lambda a, b, c: ops.kd_loss_pair(a, b, c, temperature, backend="triton"), (s, pt, t))
    for a, b in zip(ref + ref_g, tri + tri_g):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # and the pair is the two separate KL terms
    torch.testing.assert_close(ref[0], ops.kd_loss(s, t, temperature, backend="reference"))
    torch.testing.assert_close(ref[1], ops.kd_loss(pt, t, 1.0, backend="reference"))


def test_hcl_loss_stages_matches_reference():
    s = [_leaf(3, 5, 7, 7, seed=4), _leaf(3, 49, 6, seed=5), _leaf(3, 4, 6, 10, seed=6)]
    t = [_leaf(*x.shape, seed=10 + i) for i, x in enumerate(s)]
    ref, ref_g = _grads(lambda *xs: ops.hcl_loss_stages(xs[:3], xs[3:], backend="reference"), (*s, *t))
    tri, tri_g = _grads(lambda *xs: ops.hcl_loss_stages(xs[:3], xs[3:], backend="triton"), (*s, *t))
    torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(ref_g, tri_g):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref, sum(ops.hcl_loss(a, b, backend="reference") for a, b in zip(s, t)))


def test_multi_op_input_checks():
    with pytest.raises(ValueError, match="same non-zero number"):
        ops.hcl_loss_stages([torch.randn(2, 3, 4, 4)], [])
    with pytest.raises(ValueError, match="same shape"):
        ops.kd_loss_pair(torch.randn(2, 5), torch.randn(2, 6), torch.randn(2, 5))
