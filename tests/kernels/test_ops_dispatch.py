"""patfast.ops decides at import what is available: a traced call of every op is one graph without a break.

torch 2.11's Dynamo refuses to trace importlib.util.find_spec and importlib.import_module ("Attempted to call
function marked as skipped"), so a dispatch that looked for triton (or imported a kernel module) at call time broke
a compiled PAT step into several graphs. Here every public op runs on CPU tensors inside ``torch._dynamo.explain``
(backend "auto", which is the reference on the CPU, and "reference"), together with the dispatch decision for CUDA
tensors (``ops._select`` with a ``torch.device("cuda")``, which needs no GPU): the branch that picks Triton.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

from patfast import ops
from patfast.kernels import reference

CUDA = torch.device("cuda")  # a device object only: nothing is allocated on it
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _inputs(seed: int = 0) -> list[torch.Tensor]:
    """Small CPU inputs of every op: a feature pair, three logits, and RAA's tokens, six parameters and pos."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(shape, generator=g) + 0.1

    d = 8
    return [rnd(3, 2, 7, 7), rnd(3, 2, 7, 7), rnd(3, 41), rnd(3, 41), rnd(3, 41),
            rnd(3, 9, d), 1 + 0.1 * rnd(d), rnd(d), rnd(d, d), rnd(d), rnd(2 * d, d), rnd(2 * d), rnd(1, 9, d)]


def _every_op(backend: str):
    def step(fs, ft, s, pt, t, tokens, *params):
        loss = ops.hcl_loss(fs, ft, backend=backend)
        loss = loss + ops.hcl_loss_stages([fs, s[:, None, :, None]], [ft, t[:, None, :, None]], backend=backend)
        loss = loss + ops.kd_loss(s, t, 2.0, backend=backend)
        loss_kd, loss_reg = ops.kd_loss_pair(s, pt, t, 2.0, backend=backend)
        loss = loss + ops.dkd_loss(s, t, torch.tensor([0, 7, 40]), 1.0, 8.0, 4.0, backend=backend)
        loss = loss + ops.dkd_loss(s, t, pt.softmax(-1), 0.5, 2.0, 1.0, backend=backend)  # soft labels: argmax
        loss = loss + ops.dist_loss(s, t, 1.0, 2.0, 4.0, backend=backend)
        loss = loss + ops.ofa_loss(s, t, torch.tensor([0, 7, 40]), 0.5, 2.0, backend=backend)
        loss = loss + ops.ofa_loss(s, t, pt.softmax(-1), backend=backend)  # soft labels: argmax
        out = ops.raa_attention(tokens, *params, 2, backend=backend)
        return loss + loss_kd + loss_reg + out.square().mean()
    return step


def _picks(x: torch.Tensor, op: str) -> torch.Tensor:
    """x + 1 for each kernel dtype for which "auto" picks a Triton kernel for CUDA tensors, + 0 otherwise."""
    ref = ops._REFERENCE_IMPLS[op]
    x = x + (0.0 if ops._select(op, "auto", CUDA, torch.float32) is ref else 1.0)
    x = x + (0.0 if ops._select(op, "auto", CUDA, torch.float16) is ref else 1.0)
    return x + (0.0 if ops._select(op, "auto", CUDA, torch.bfloat16) is ref else 1.0)


def _cuda_choices(x: torch.Tensor) -> torch.Tensor:
    """(3 x + the picks of every op) * 2: tensor work before, between and after, and no loop (Dynamo cannot resume a
    frame inside a loop), so each break shows up as one more graph with its reason."""
    x = x * 3
    x = _picks(x, "hcl_loss")
    x = _picks(x, "hcl_loss_stages")
    x = _picks(x, "kd_loss")
    x = _picks(x, "kd_loss_pair")
    x = _picks(x, "raa_attention")
    x = _picks(x, "dkd_loss")
    x = _picks(x, "dist_loss")
    x = _picks(x, "ofa_loss")
    return x * 2


def _explain(fn, *args):
    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(fn)(*args)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_every_op_traces_as_one_graph_on_cpu(backend):
    xs = _inputs()
    report = _explain(_every_op(backend), *xs)
    assert (report.graph_count, report.graph_break_count) == (1, 0), [str(r.reason)[:300] for r in
                                                                      report.break_reasons]
    torch.testing.assert_close(torch.compile(_every_op(backend), backend="eager", fullgraph=True)(*xs),
                               _every_op("reference")(*xs))


def test_cuda_dispatch_decision_traces_as_one_graph():
    x = torch.randn(3)
    report = _explain(_cuda_choices, x)
    assert (report.graph_count, report.graph_break_count) == (1, 0), [str(r.reason)[:300] for r in
                                                                      report.break_reasons]
    # the traced decision is the eager one: every op has a kernel for every kernel dtype when triton is importable
    assert len(ops.triton_ops()) == 8
    picks = 8 * len(KERNEL_DTYPES) if HAS_TRITON else 0
    torch.testing.assert_close(_cuda_choices(x), (3 * x + picks) * 2)


def test_calls_never_look_for_or_import_modules(monkeypatch):
    # After import, choosing an implementation is dict lookups and attribute reads: importlib is never called.
    def forbidden(*args, **kwargs):
        raise AssertionError(f"importlib called at call time with {args}")

    xs = _inputs(1)
    monkeypatch.setattr(importlib.util, "find_spec", forbidden)
    monkeypatch.setattr(importlib, "import_module", forbidden)
    for backend in ("auto", "reference"):
        _every_op(backend)(*xs)
    _cuda_choices(torch.zeros(1))
    for op in ops.triton_ops():
        ops._select(op, "triton", torch.device("cpu"))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_auto_picks_triton_for_cuda_kernel_dtypes_only():
    for op in ops.triton_ops():
        for dtype in KERNEL_DTYPES:
            assert ops._select(op, "auto", CUDA, dtype) is ops._select(op, "triton", CUDA, dtype)
            assert ops._select(op, "auto", torch.device("cpu"), dtype) is ops._REFERENCE_IMPLS[op]
        assert ops._select(op, "auto", CUDA, torch.float32, torch.float64) is ops._REFERENCE_IMPLS[op]
    assert ops._select("kd_loss", "auto", CUDA, torch.bfloat16, torch.float32) is not reference.kd_loss_ref
