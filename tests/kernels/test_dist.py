"""The fused Triton DIST kernels (patfast.kernels.dist) and ops.dist_loss's Triton backend.

On a machine without a GPU these run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
the compile-only test builds the same kernels for sm_80 / sm_90 and reads the PTX; tests marked ``gpu`` run only on
a CUDA machine (torch.compile, CUDA graphs, launch count, bitwise determinism at a large batch).

Truth: patfast.kernels.reference.dist_loss_ref evaluated in float64 on the same (rounded) input values. fp32: a
max-norm relative error of at most max(1e-5, 2x eager PyTorch's own fp32 error on the same inputs): the gradient of a
correlation is a difference that cancels where the correlation is near +-1 or its divisor is near the eps, which a
batch of 3 rows makes common for the class correlations; there PyTorch's fp32 error itself reaches ~1e-5 (at B = 2,
where two centred values are always parallel, ~1e-4). Everywhere else the 1e-5 bound is what holds.
K = 1 and B = 1 are allowed: a correlation of vectors with no variance is 0 (the eps in the divisor), so the term
is its weight times T^2 and has no gradient, as in the reference.
"""

import math
import os
import re

import pytest
import torch

from patfast import ops
from patfast.kernels import dist, reference
from patfast.kernels._compile_check import compile_kernels, resource_usage

F64 = torch.float64
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

CLASSES = (2, 41, 100, 1000, 1537)  # 1537 > MAX_BLOCK_K: the forward's second walk and the backward's two passes
SMALL = [(b, k) for b in (1, 3, 8) for k in CLASSES if (b, k) != (1, 2)]  # (1, 2): no gradient, tested apart
TEMPERATURES = (1.0, 4.0)
LARGE = [(256, 100, 1.0), (256, 100, 4.0), (256, 1000, 4.0), (24, 1537, 1.0)]  # few: the interpreter is slow
WEIGHTS = (1.0, 2.0)  # beta, gamma: the two terms with different weights
GRAD_OUT = 0.375  # upstream gradient != 1 (the loss is "not the last layer"), exact in every dtype
FP32_RTOL = 1e-5
BF16_ULPS = 1.0 if os.environ.get("TRITON_INTERPRET") == "1" else 0.5  # the interpreter truncates fp32 -> bf16


def _logits(b, k, seed, *, dtype=torch.float32, scale=2.0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, k, generator=g, dtype=F64) * scale).to(device=device, dtype=dtype)


def _grad_run(fn, inputs, grad_outs):
    """Calls fn(*inputs), back-propagates grad_outs; returns (losses, grads of every input) in float64."""
    leaves = [x.detach().requires_grad_(True) for x in inputs]  # detach, not clone: keeps every stride
    assert all(leaf.stride() == x.stride() for leaf, x in zip(leaves, inputs))
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gos = [torch.tensor(g, dtype=o.dtype, device=o.device) for g, o in zip(grad_outs, outs)]
    torch.autograd.backward(outs, gos)
    return [o.detach().double() for o in outs], [x.grad.double() for x in leaves]


def _ref64(s, t, beta=1.0, gamma=1.0, temperature=1.0):
    return reference.dist_loss_ref(s.double(), t.double(), beta, gamma, temperature)


def _rel_err(actual, expected) -> float:
    """Max-norm relative error: max |actual - expected| / max |expected|."""
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.double().cpu() - expected.cpu()).abs().max() / scale).item()


def _assert_close_rel(actual, expected, rtol, what):
    err = _rel_err(actual, expected)
    assert err <= rtol, f"{what}: max-norm relative error {err:.3g} > {rtol:g}"


def _check_fp32(s, t, beta=1.0, gamma=1.0, temperature=1.0, fn=None):
    """fp32 loss and gradients against float64: max(FP32_RTOL, 2x eager PyTorch's fp32 error) (module docstring)."""
    fn = fn or (lambda a, b: dist.dist_loss(a, b, beta, gamma, temperature))
    ours = _grad_run(fn, (s, t), [GRAD_OUT])
    torch32 = _grad_run(lambda a, b: reference.dist_loss_ref(a, b, beta, gamma, temperature), (s, t), [GRAD_OUT])
    truth = _grad_run(lambda a, b: _ref64(a, b, beta, gamma, temperature), (s.double(), t.double()), [GRAD_OUT])
    assert ours[0][0].shape == ()
    for what, a, h, r in zip(("loss", "grad logits_s", "grad logits_t"), [*ours[0], *ours[1]],
                             [*torch32[0], *torch32[1]], [*truth[0], *truth[1]]):
        _assert_close_rel(a, r, max(FP32_RTOL, 2 * _rel_err(h, r)), what)


# ----------------------------------------------------------------------------------------------------------------
# fp32 values and gradients against float64
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize(("b", "k"), SMALL)
def test_dist_loss_fp32_matches_float64(b, k, temperature):
    s = _logits(b, k, seed=b * 7 + k, scale=2.0)
    t = _logits(b, k, seed=b * 7 + k + 1, scale=3.0)
    _check_fp32(s, t, *WEIGHTS, temperature,
                fn=lambda a, c: ops.dist_loss(a, c, *WEIGHTS, temperature, backend="triton"))


@pytest.mark.parametrize(("b", "k", "temperature"), LARGE)
def test_dist_loss_fp32_matches_float64_large_batch(b, k, temperature):
    s, t = _logits(b, k, seed=k + 1, scale=2.0), _logits(b, k, seed=k + 2, scale=3.0)
    _check_fp32(s, t, *WEIGHTS, temperature)


@pytest.mark.parametrize("k", [41, 1537])
def test_one_row(k):
    # B = 1: every class correlation is 0 (a batch of one has no variance): the intra term is gamma T^2, no gradient
    s, t = _logits(1, k, seed=3), _logits(1, k, seed=4, scale=3.0)
    _check_fp32(s, t, 1.0, 2.0, 2.0)
    _check_fp32(s, t, 0.0, 2.0, 2.0)  # the intra term alone: a constant
    assert dist.dist_loss(s, t, 0.0, 2.0, 2.0).item() == pytest.approx(8.0, rel=1e-6)


@pytest.mark.parametrize(("b", "k"), [(1, 1), (5, 1), (1, 2)])
def test_degenerate_shapes_are_constant_without_gradient(b, k):
    # K = 1: both softmaxes are 1, every correlation 0: loss (beta + gamma) T^2, gradients exactly 0. (1, 2): the
    # class correlations are 0 and the one row's is +-1 (two centred classes are always parallel) but for the eps
    # in its divisor: a constant up to eps, whose gradient is eps-sized (~4e-6 here in float64) and is a
    # cancellation no fp32 code resolves (eager fp32 PyTorch is 12% off, the kernel 25%): only its size is checked.
    s, t = _logits(b, k, seed=5), _logits(b, k, seed=6, scale=3.0)
    (loss,), (gs, gt) = _grad_run(lambda a, c: dist.dist_loss(a, c, 1.0, 2.0, 2.0), (s, t), [GRAD_OUT])
    (ref,), (rs, rt) = _grad_run(lambda a, c: _ref64(a, c, 1.0, 2.0, 2.0), (s, t), [GRAD_OUT])
    _assert_close_rel(loss, ref, FP32_RTOL, "loss")
    if k == 1:
        assert loss.item() == 12.0
        assert torch.count_nonzero(gs) == 0 and torch.count_nonzero(gt) == 0
    for g in (gs, gt, rs, rt):
        assert g.abs().max().item() <= 1e-5


def test_dist_loss_output_dtype_and_grad_dtypes():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        s = _logits(3, 41, seed=1, dtype=dtype).requires_grad_()
        t = _logits(3, 41, seed=2, dtype=dtype).requires_grad_()
        loss = dist.dist_loss(s, t, 1.0, 1.0, 2.0)
        assert loss.dtype == torch.float32 and loss.shape == ()
        loss.backward()
        assert s.grad.dtype == dtype and t.grad.dtype == dtype
        assert s.grad.shape == s.shape and t.grad.shape == t.shape and s.grad.is_contiguous()


@pytest.mark.parametrize("k", [100, 1537])
def test_only_the_inputs_that_require_grad_get_one(k):
    b = 3
    s, t = _logits(b, k, seed=9), _logits(b, k, seed=10)
    _, (rs, rt) = _grad_run(lambda a, c: _ref64(a, c, 1.0, 2.0, 4.0), (s, t), [1.0])
    sg = s.clone().requires_grad_()
    dist.dist_loss(sg, t, 1.0, 2.0, 4.0).backward()  # the teacher as in training: no grad
    assert t.grad is None
    _assert_close_rel(sg.grad, rs, FP32_RTOL, "grad logits_s")
    tg = t.clone().requires_grad_()
    dist.dist_loss(s, tg, 1.0, 2.0, 4.0).backward()
    assert s.grad is None
    _assert_close_rel(tg.grad, rt, FP32_RTOL, "grad logits_t")
    assert not dist.dist_loss(s, t).requires_grad


# ----------------------------------------------------------------------------------------------------------------
# 16-bit and mixed dtypes: at most 2x PyTorch's own error at the same dtype
# ----------------------------------------------------------------------------------------------------------------


def _judge(what, got, torch_got, want, dtype):
    """A 16-bit result: at most 2x eager PyTorch's error on the same inputs, plus the rounding of the result itself
    (half an ulp of the largest true value; a whole one for bf16 under the interpreter) and the subnormal spacing.
    An fp32 result of fp32 inputs (a teacher gradient beside a 16-bit student): FP32_RTOL. Where eager PyTorch gives
    NaN at this dtype, the kernel must be within the rounding of its own result."""
    scale = want.abs().max().item()
    err = (got.double().cpu() - want.cpu()).abs().max().item()
    if dtype == torch.float32:
        assert err <= FP32_RTOL * scale, f"{what} (fp32): error {err:.3g} > {FP32_RTOL:g} x {scale:.3g}"
        return
    finfo = torch.finfo(dtype)
    floor = (BF16_ULPS if dtype == torch.bfloat16 else 0.5) * finfo.eps * scale + finfo.smallest_normal * finfo.eps
    torch_err = (torch_got.double().cpu() - want.cpu()).abs().max().item()
    torch_err = torch_err if math.isfinite(torch_err) else 0.0
    assert err <= 2 * torch_err + floor, f"{what} ({dtype}): error {err:.3g} > 2 x PyTorch's {torch_err:.3g}"


def _check_dtypes(ds, dt, b, k, temperature, seed):
    s = _logits(b, k, seed=seed, dtype=ds, scale=2.0)
    t = _logits(b, k, seed=seed + 1, dtype=dt, scale=3.0)
    ours = _grad_run(lambda a, c: dist.dist_loss(a, c, *WEIGHTS, temperature), (s, t), [GRAD_OUT])
    torch_run = _grad_run(lambda a, c: reference.dist_loss_ref(a, c, *WEIGHTS, temperature), (s, t), [GRAD_OUT])
    truth = _grad_run(lambda a, c: _ref64(a, c, *WEIGHTS, temperature), (s.double(), t.double()), [GRAD_OUT])
    half = ds if ds != torch.float32 else dt  # the loss: judged at the 16-bit input's dtype
    for what, a, h, r, dtype in zip(("loss", "grad logits_s", "grad logits_t"), [*ours[0], *ours[1]],
                                    [*torch_run[0], *torch_run[1]], [*truth[0], *truth[1]], (half, ds, dt)):
        _judge(what, a, h, r, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize(("b", "k"), [(3, 41), (8, 100), (32, 1000), (8, 1537)])
def test_dist_loss_16bit_within_2x_pytorch_error(dtype, b, k, temperature):
    _check_dtypes(dtype, dtype, b, k, temperature, seed=b + 11 * k)


@pytest.mark.parametrize(("ds", "dt"), [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                        (torch.float32, torch.bfloat16)], ids=["bf16-fp32", "fp16-fp32", "fp32-bf16"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_dist_loss_mixed_dtypes(ds, dt, temperature):
    # bf16 student logits against fp32 teacher logits (a step under bf16 autocast), read without a promotion copy
    _check_dtypes(ds, dt, 5, 100, temperature, seed=17)


# ----------------------------------------------------------------------------------------------------------------
# Layouts and extremes
# ----------------------------------------------------------------------------------------------------------------


def _column_slice(b, k, seed):  # rows of a wider tensor: row stride k + 7, data pointer 12 bytes in
    return _logits(b, k + 7, seed=seed)[:, 3:3 + k]


def _transposed_slice(b, k, seed):  # class stride b, row stride 1
    return _logits(k + 5, b, seed=seed).t()[:, 2:2 + k]


@pytest.mark.parametrize(("make_s", "make_t"), [(_column_slice, _transposed_slice), (_transposed_slice, _column_slice)],
                         ids=["slice-s", "transposed-s"])
@pytest.mark.parametrize("k", [41, 1537])
def test_non_contiguous_inputs(make_s, make_t, k):
    b = 5
    s, t = make_s(b, k, seed=21), make_t(b, k, seed=22)
    assert not s.is_contiguous() and not t.is_contiguous()
    _check_fp32(s, t, 0.5, 2.0, 4.0)


def test_broadcast_class_axis_and_expanded_rows():
    # A stride-0 class axis (every class equal: a uniform softmax, the row correlation's eps regime) and an
    # expanded (stride-0) row; the batch is 4 so that a class's batch mean of equal values is exact in both.
    b, k = 4, 100
    s = _logits(b, k, seed=23)
    t = _logits(b, k, seed=24, scale=3.0)
    c = _logits(b, 1, seed=25).expand(b, k)
    _check_fp32(s, c, 1.0, 2.0, 2.0)
    _check_fp32(c, t, 1.0, 2.0, 2.0)
    e = _logits(1, k, seed=26).expand(b, k)
    _check_fp32(s, e, 1.0, 0.0, 2.0)  # every teacher row the same: only the row term is well-posed


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_extreme_logits_give_finite_exact_gradients(temperature):
    b, k = 6, 100
    s = _logits(b, k, seed=31, scale=1.0)
    t = _logits(b, k, seed=32, scale=1.0)
    s[0, 0] += 30.0  # the student sure of one class, the teacher of another
    t[0, 7] += 30.0
    t[2, 2] += 60.0  # the teacher certain
    s[3] = s[3] + 500.0  # a large common offset changes nothing
    t[3] = -t[3] - 300.0
    (loss,), (gs, gt) = _grad_run(lambda a, c: dist.dist_loss(a, c, 1.0, 2.0, temperature), (s, t), [GRAD_OUT])
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    _check_fp32(s, t, 1.0, 2.0, temperature)


@pytest.mark.parametrize("k", [1000, 1537])
def test_forward_is_deterministic(k):
    s, t = _logits(24, k, seed=41), _logits(24, k, seed=42)
    first = dist.dist_loss(s, t, 1.0, 2.0, 4.0)
    assert torch.equal(first, dist.dist_loss(s, t, 1.0, 2.0, 4.0))


# ----------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------


def _bad_calls():
    x = torch.randn(3, 41)
    meta = torch.empty(3, 41, device="meta")
    return [
        ("shape", lambda: dist.dist_loss(x, torch.randn(3, 40)), r"same shape.*\(3, 41\).*\(3, 40\)"),
        ("ops-shape", lambda: ops.dist_loss(x, torch.randn(3, 40)), r"dist_loss: .*same shape"),
        ("dtype-f64", lambda: dist.dist_loss(x.double(), x.double()), r"float64.*float32, float16 or bfloat16"),
        ("dtype-int", lambda: dist.dist_loss(x.long(), x.long()), r"int64"),
        ("rank1", lambda: dist.dist_loss(x[0], x[0]), r"2-D \(B, num_classes\).*\(41,\)"),
        ("rank3", lambda: ops.dist_loss(x[None], x[None]), r"dist_loss: expected \(B, num_classes\)"),
        ("empty", lambda: dist.dist_loss(x[:0], x[:0]), r"empty.*\(0, 41\)"),
        ("devices", lambda: dist.dist_loss(x, meta), r"same device.*cpu.*meta"),
        ("temperature-0", lambda: dist.dist_loss(x, x, 1.0, 1.0, 0.0), r"temperature must be positive"),
        ("temperature-inf", lambda: dist.dist_loss(x, x, 1.0, 1.0, float("inf")), r"positive and finite"),
        ("ops-temperature", lambda: ops.dist_loss(x, x, 1.0, 1.0, -1.0, backend="triton"), r"temperature"),
        ("beta-inf", lambda: dist.dist_loss(x, x, float("inf")), r"beta must be finite"),
        ("gamma-tensor", lambda: dist.dist_loss(x, x, 1.0, torch.tensor(1.0)), r"gamma must be a Python number"),
        ("not-a-tensor", lambda: dist.dist_loss(x, x.tolist()), r"logits_t must be a torch.Tensor"),
        ("ops-backend", lambda: ops.dist_loss(x, x, backend="fast"), r"unknown backend 'fast'"),
        ("ops-dtype", lambda: ops.dist_loss(x, x.double(), backend="triton"), r"logits_t.*float64"),
    ]


@pytest.mark.parametrize(("call", "match"), [c[1:] for c in _bad_calls()], ids=[c[0] for c in _bad_calls()])
def test_input_errors_are_clear_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_registered_in_ops():
    assert "dist_loss" in ops.triton_ops()
    s, t = _logits(3, 41, seed=81), _logits(3, 41, seed=82)
    torch.testing.assert_close(ops.dist_loss(s, t, 1.0, 2.0, 4.0, backend="triton"),
                               dist.dist_loss(s, t, 1.0, 2.0, 4.0), rtol=0, atol=0)
    want = ops.dist_loss(s.double(), t.double(), 1.0, 2.0, 4.0, backend="auto")  # float64: the reference
    _assert_close_rel(ops.dist_loss(s, t, 1.0, 2.0, 4.0, backend="triton"), want, FP32_RTOL, "triton vs reference")
    if not CUDA:  # "auto" on CPU tensors is the reference
        assert ops._select("dist_loss", "auto", s.device, s.dtype, t.dtype) is reference.dist_loss_ref


# ----------------------------------------------------------------------------------------------------------------
# Compile-only: PTX/cubin for sm_80 and sm_90 without a GPU
# ----------------------------------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _build(kernel, config, dtypes, arch, constexprs, unit_class_stride=True):
    """A compile_kernels build as the launcher specialises ``kernel`` for contiguous (aligned) inputs.

    dtypes: {"s": ..., "t": ...}, the dtype of each logits input (and of its gradient)."""
    pointer_input = {"s_ptr": "s", "t_ptr": "t", "ds_ptr": "s", "dt_ptr": "t"}
    cx = {**constexprs, "BLOCK_B": config["BLOCK_B"], "BLOCK_K": config["BLOCK_K"]}
    if unit_class_stride:
        cx.update({"s_stride_k": 1, "t_stride_k": 1})
    signature = {}
    for name in kernel.arg_names:
        if name in cx:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = f"*{_TRITON_DTYPE[dtypes[pointer_input[name]]]}" if name in pointer_input else "*fp32"
        else:
            signature[name] = "fp32" if name in ("beta", "gamma", "temperature", "eps") else "i32"
    aligned = [n for n in kernel.arg_names if n.endswith("_ptr")]
    return dict(kernel=kernel, signature=signature, constexprs=cx, arch=arch, num_warps=config["num_warps"],
                aligned=aligned)


def _compile_only_builds():
    fwd, bwd = dist._dist_fwd_kernel, dist._dist_bwd_kernel
    grads = {"GRAD_S": True, "GRAD_T": True}
    fp32 = dict.fromkeys("st", torch.float32)
    mixed = {"s": torch.bfloat16, "t": torch.float32}
    one = {"ONE_CHUNK": True, "ALIGN": 4}
    builds = []
    for arch in (90, 80):
        builds += [
            ("fwd fp32 K=1000", _build(fwd, dist._fwd_config(128, 1000), fp32, arch, one)),
            ("bwd fp32 K=1000", _build(bwd, dist._bwd_config(128, 1000), fp32, arch, {**one, **grads})),
            # bf16 student logits against fp32 teacher logits (under bf16 autocast), ALIGN 4 for the fp32 rows
            ("fwd bf16-fp32 K=100 mixed", _build(fwd, dist._fwd_config(128, 100), mixed, arch, one)),
            ("bwd bf16-fp32 K=100 mixed", _build(bwd, dist._bwd_config(128, 100), mixed, arch,
                                                 {**one, "GRAD_S": True, "GRAD_T": False})),
        ]
    chunks = {"ONE_CHUNK": False, "ALIGN": 1}
    fp16 = dict.fromkeys("st", torch.float16)
    builds += [("fwd fp16 K=1537 strided", _build(fwd, dist._fwd_config(256, 1537), fp16, 90, chunks,
                                                  unit_class_stride=False)),
               ("bwd fp16 K=1537 strided", _build(bwd, dist._bwd_config(256, 1537), fp16, 90, {**chunks, **grads},
                                                  unit_class_stride=False))]
    return builds


@pytest.mark.slow
def test_compile_only_sm80_sm90_ptx_with_vectorised_loads():
    pytest.importorskip("triton.backends.nvidia")

    builds = _compile_only_builds()
    results = compile_kernels([b for _, b in builds])
    for (name, build), asm in zip(builds, results):
        ptx = asm["ptx"]
        assert f".target sm_{build['arch']}" in ptx, name
        assert asm.get("cubin"), f"{name}: no cubin"
        if "fp32 K=1000" in name:  # contiguous fp32 rows, K = 1000 = 4 * 250: 16-byte row loads
            assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx), f"{name}: row loads are not vectorised"
        if name.startswith("bwd fp32"):
            assert re.search(r"st\.global(\.\w+)*\.v4\.b32", ptx), f"{name}: gradient stores are not vectorised"
        assert "atom." not in ptx, f"{name}: no atomics (determinism)"
        if name.endswith("strided") and name.startswith("fwd"):  # the barrier between the two walks
            assert "bar.sync" in ptx or "barrier.sync" in ptx, f"{name}: no barrier before the class walk"
        if name.endswith("mixed"):  # bf16 logits widened in registers, their gradient rounded to nearest even
            assert "cvt.f32.bf16" in ptx, name
            if name.startswith("bwd"):
                assert re.search(r"cvt\.rn\.bf16(x2)?\.f32", ptx), f"{name}: gradient not rounded to nearest"
        usage = resource_usage(asm["cubin"])
        assert usage is None or max(u["STACK"] for u in usage) == 0, f"{name}: register spills: {usage}"


# ----------------------------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------------------------


def _check_compiled(step, dtype, k=1000):
    s, t = _logits(64, k, seed=90, dtype=dtype), _logits(64, k, seed=91, dtype=dtype)
    want = _grad_run(step, (s, t), [1.0])  # eager first (same kernels), then compiled
    torch._dynamo.reset()
    got = _grad_run(torch.compile(step, fullgraph=True), (s, t), [1.0])
    rtol = FP32_RTOL if dtype == torch.float32 else 1e-2
    for a, r in zip([*got[0], *got[1]], [*want[0], *want[1]]):
        _assert_close_rel(a, r, rtol, "torch.compile vs eager")


@pytest.mark.gpu
@pytest.mark.parametrize(("b", "k"), [(512, 1000), (300, 1537)])
def test_gpu_large_batches_match_float64(b, k):
    # On hardware: the class walk after the barrier (K = 1537) and many row tiles, against the float64 truth
    s, t = _logits(b, k, seed=140), _logits(b, k, seed=141, scale=3.0)
    _check_fp32(s, t, 1.0, 2.0, 4.0)
    _check_dtypes(torch.bfloat16, torch.float32, b, k, 1.0, seed=142)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32])  # one compile: the GPU test step's budget is shared
def test_gpu_torch_compile_fullgraph_kernels(dtype):
    _check_compiled(lambda s, t: 2.0 * dist.dist_loss(s, t, 1.0, 2.0, 4.0) + dist.dist_loss(s, t), dtype)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph_ops_dispatch():
    # backend="auto" on CUDA tensors resolves to the Triton kernel inside the compiled graph
    _check_compiled(lambda s, t: ops.dist_loss(s, t) + ops.dist_loss(s, t, 2.0, 1.0, 4.0), torch.float32, k=1537)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_forward_backward():
    b, k = 128, 1000
    s = _logits(b, k, seed=101).requires_grad_()
    t = _logits(b, k, seed=102)
    ones = torch.ones((), device=DEV)

    def step():
        loss = dist.dist_loss(s, t, 1.0, 2.0, 4.0)
        return (loss, *torch.autograd.grad(loss, (s,), 2.0 * ones))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    new = [_logits(b, k, seed=110 + i) for i in range(2)]
    with torch.no_grad():
        for x, n in zip((s, t), new):
            x.copy_(n)
    graph.replay()
    torch.cuda.synchronize()
    (want,), (want_s, _) = _grad_run(lambda a, c: _ref64(a, c, 1.0, 2.0, 4.0), [n.double() for n in new], [2.0])
    for a, r in zip(static, (want, want_s)):
        _assert_close_rel(a, r, FP32_RTOL, "CUDA graph replay")


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1000, 1537])
def test_gpu_one_launch_forward_one_launch_backward(k):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    s, t = (_logits(128, k, seed=120 + i, dtype=torch.bfloat16) for i in range(2))
    s.requires_grad_()
    t.requires_grad_()
    go = torch.ones((), device=DEV)
    for _ in range(2):  # compile the kernels first
        torch.autograd.grad(dist.dist_loss(s, t), (s, t), go)
    torch.cuda.synchronize()

    def kernels(fn):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = fn()
            torch.cuda.synchronize()
        return out, [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]

    loss, fwd = kernels(lambda: dist.dist_loss(s, t))
    _, bwd = kernels(lambda: torch.autograd.grad(loss, (s, t), go))
    assert len(fwd) == 1 and "_dist_fwd_kernel" in fwd[0], fwd
    assert len(bwd) == 1 and "_dist_bwd_kernel" in bwd[0], bwd


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1537])  # the two walks with the barrier between them
def test_gpu_forward_is_bitwise_deterministic(k):
    s, t = _logits(4096, k, seed=130), _logits(4096, k, seed=131)
    first = dist.dist_loss(s, t, 1.0, 2.0, 4.0)
    for _ in range(3):
        assert torch.equal(dist.dist_loss(s, t, 1.0, 2.0, 4.0), first)
