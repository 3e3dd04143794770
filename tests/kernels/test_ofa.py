"""The fused Triton kernels of OFA's branch loss (patfast.kernels.ofa) and ops.ofa_loss's Triton backend.

On a machine without a GPU these run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
the compile-only test builds the same kernels for sm_80 / sm_90 and reads the PTX; tests marked ``gpu`` run only on
a CUDA machine. Truth: patfast.kernels.reference.ofa_loss_ref evaluated in float64 on the same (rounded) inputs.
The helpers follow test_dkd.py (same tiles, same judging of 16-bit results).
"""

import math
import os
import re

import pytest
import torch

from patfast import ops
from patfast.kernels import ofa, reference
from patfast.kernels._compile_check import compile_kernels, resource_usage

F64 = torch.float64
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

SMALL_BATCHES = (1, 3, 8)
CLASSES = (1, 2, 41, 1000, 1537)  # 1537 > MAX_BLOCK_K: the forward loops over class chunks
EPS_T = [(1.0, 1.0), (0.5, 2.0), (2.0, 1.0), (0.0, 1.0)]  # (eps, temperature); eps 0: weights 1 off the target
LARGE = [(256, 100, 1.0, 1.0), (256, 1000, 0.5, 1.0), (64, 1537, 2.0, 2.0)]
GRAD_OUT = 0.375  # upstream gradient != 1, exact in every dtype
FP32_RTOL = 1e-5
BF16_ULPS = 1.0 if os.environ.get("TRITON_INTERPRET") == "1" else 0.5  # the interpreter truncates fp32 -> bf16


def _logits(b, k, seed, *, dtype=torch.float32, scale=2.0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, k, generator=g, dtype=F64) * scale).to(device=device, dtype=dtype)


def _target(b, k, seed, device=DEV):
    return torch.randint(0, k, (b,), generator=torch.Generator().manual_seed(seed)).to(device)


def _grad_run(fn, inputs, grad_outs):
    """Calls fn(*inputs), back-propagates grad_outs; returns (losses, grads of every input) in float64."""
    leaves = [x.detach().requires_grad_(True) for x in inputs]  # detach, not clone: keeps every stride
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gos = [torch.tensor(g, dtype=o.dtype, device=o.device) for g, o in zip(grad_outs, outs)]
    torch.autograd.backward(outs, gos)
    return [o.detach().double() for o in outs], [x.grad.double() for x in leaves]


def _ref64(s, t, y, eps=1.0, temperature=1.0):
    return reference.ofa_loss_ref(s.double(), t.double(), y, eps, temperature)


def _assert_close_rel(actual, expected, rtol, what):
    """Max-norm relative error: |actual - expected| <= rtol * max(|expected|), elementwise."""
    scale = expected.abs().max().clamp_min(1e-30)
    err = ((actual.double().cpu() - expected.cpu()).abs().max() / scale).item()
    assert err <= rtol, f"{what}: max-norm relative error {err:.3g} > {rtol:g}"


def _check_fp32(s, t, y, eps=1.0, temperature=1.0, fn=None):
    fn = fn or (lambda a, b: ofa.ofa_loss(a, b, y, eps, temperature))
    (loss,), (gs, gt) = _grad_run(fn, (s, t), [GRAD_OUT])
    (ref,), (rs, rt) = _grad_run(lambda a, b: _ref64(a, b, y, eps, temperature), (s.double(), t.double()),
                                 [GRAD_OUT])
    assert loss.shape == ()
    for what, got, want in (("loss", loss, ref), ("grad logits_s", gs, rs), ("grad logits_t", gt, rt)):
        if want.abs().max() > 0:
            _assert_close_rel(got, want, FP32_RTOL, what)
        else:  # K = 1 (the loss is 0), eps = 0 (the weights do not depend on the teacher): exactly 0 in float64
            assert got.abs().max() <= 1e-7, f"{what} should be 0, got {got.abs().max():.3g}"


# ----------------------------------------------------------------------------------------------------------------
# fp32 values and gradients against float64
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("eps", "temperature"), EPS_T)
@pytest.mark.parametrize("k", CLASSES)
@pytest.mark.parametrize("b", SMALL_BATCHES)
def test_ofa_loss_fp32_matches_float64(b, k, eps, temperature):
    s = _logits(b, k, seed=b * 7 + k, scale=2.0)
    t = _logits(b, k, seed=b * 7 + k + 1, scale=3.0)
    y = _target(b, k, seed=b + k)
    _check_fp32(s, t, y, eps, temperature,
                fn=lambda a, c: ops.ofa_loss(a, c, y, eps, temperature, backend="triton"))


@pytest.mark.parametrize(("b", "k", "eps", "temperature"), LARGE)
def test_ofa_loss_fp32_matches_float64_large_batch(b, k, eps, temperature):
    s, t = _logits(b, k, seed=k + 1, scale=2.0), _logits(b, k, seed=k + 2, scale=3.0)
    _check_fp32(s, t, _target(b, k, seed=k + 3), eps, temperature)


def test_ofa_loss_output_dtype_and_grad_dtypes():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        s = _logits(3, 41, seed=1, dtype=dtype).requires_grad_()
        t = _logits(3, 41, seed=2, dtype=dtype).requires_grad_()
        loss = ofa.ofa_loss(s, t, _target(3, 41, seed=3), 1.0, 2.0)
        assert loss.dtype == torch.float32 and loss.shape == ()
        loss.backward()
        assert s.grad.dtype == dtype and t.grad.dtype == dtype
        assert s.grad.shape == s.shape and t.grad.shape == t.shape and s.grad.is_contiguous()


def test_only_the_inputs_that_require_grad_get_one():
    b, k = 3, 100
    y = _target(b, k, seed=8)
    s, t = _logits(b, k, seed=9), _logits(b, k, seed=10)
    _, (rs, rt) = _grad_run(lambda a, c: _ref64(a, c, y, 0.5), (s, t), [1.0])
    sg = s.clone().requires_grad_()
    ofa.ofa_loss(sg, t, y, 0.5).backward()  # the teacher as in training: no grad
    assert t.grad is None
    _assert_close_rel(sg.grad, rs, FP32_RTOL, "grad logits_s")
    tg = t.clone().requires_grad_()
    ofa.ofa_loss(s, tg, y, 0.5).backward()
    assert s.grad is None
    _assert_close_rel(tg.grad, rt, FP32_RTOL, "grad logits_t")
    assert not ofa.ofa_loss(s, t, y).requires_grad


# ----------------------------------------------------------------------------------------------------------------
# 16-bit and mixed dtypes: at most 2x PyTorch's own error at the same dtype
# ----------------------------------------------------------------------------------------------------------------


def _judge(what, got, torch_got, want, dtype):
    """As test_dkd.py's: a 16-bit result within 2x eager PyTorch's error at that dtype plus the rounding of the
    result itself; an fp32 result of fp32 inputs within FP32_RTOL."""
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


def _check_dtypes(ds, dt, b, k, eps, temperature, seed):
    s = _logits(b, k, seed=seed, dtype=ds, scale=2.0)
    t = _logits(b, k, seed=seed + 1, dtype=dt, scale=3.0)
    y = _target(b, k, seed=seed + 2)
    ours = _grad_run(lambda a, c: ofa.ofa_loss(a, c, y, eps, temperature), (s, t), [GRAD_OUT])
    torch_run = _grad_run(lambda a, c: reference.ofa_loss_ref(a, c, y, eps, temperature), (s, t), [GRAD_OUT])
    truth = _grad_run(lambda a, c: _ref64(a, c, y, eps, temperature), (s.double(), t.double()), [GRAD_OUT])
    half = ds if ds != torch.float32 else dt  # the loss: judged at the 16-bit input's dtype
    for what, a, h, r, dtype in zip(("loss", "grad logits_s", "grad logits_t"), [*ours[0], *ours[1]],
                                    [*torch_run[0], *torch_run[1]], [*truth[0], *truth[1]], (half, ds, dt)):
        _judge(what, a, h, r, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("eps", "temperature"), [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize(("b", "k"), [(3, 41), (8, 100), (64, 1000), (8, 1537)])
def test_ofa_loss_16bit_within_2x_pytorch_error(dtype, b, k, eps, temperature):
    _check_dtypes(dtype, dtype, b, k, eps, temperature, seed=b + 11 * k)


@pytest.mark.parametrize(("ds", "dt"), [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                        (torch.float32, torch.bfloat16)], ids=["bf16-fp32", "fp16-fp32", "fp32-bf16"])
def test_ofa_loss_mixed_dtypes(ds, dt):
    # a bf16 branch's logits against fp32 teacher logits (a step under bf16 autocast), read without a promotion copy
    _check_dtypes(ds, dt, 5, 100, 1.0, 1.0, seed=17)


# ----------------------------------------------------------------------------------------------------------------
# Targets, layouts and extremes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_soft_labels_give_the_argmax_result(backend):
    b, k = 7, 41
    s, t = _logits(b, k, seed=12), _logits(b, k, seed=13)
    soft = torch.softmax(_logits(b, k, seed=14, scale=3.0), dim=1)  # e.g. mixup / label-smoothed targets
    hard = soft.argmax(dim=1)
    for eps in (1.0, 0.5):
        got = _grad_run(lambda a, c, e=eps: ops.ofa_loss(a, c, soft, e, backend=backend), (s, t), [GRAD_OUT])
        want = _grad_run(lambda a, c, e=eps: ops.ofa_loss(a, c, hard, e, backend=backend), (s, t), [GRAD_OUT])
        for a, w in zip([*got[0], *got[1]], [*want[0], *want[1]]):
            assert torch.equal(a, w), (backend, eps)
    if backend == "triton":
        _check_fp32(s, t, hard, 0.5, fn=lambda a, c: ops.ofa_loss(a, c, soft, 0.5, backend="triton"))


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
    y = _target(2 * b, k, seed=23)[::2]  # a strided target too
    assert not s.is_contiguous() and not t.is_contiguous() and not y.is_contiguous()
    _check_fp32(s, t, y, 0.5, 2.0)


def test_broadcast_rows_and_uniform_logits():
    b, k = 4, 100
    y = _target(b, k, seed=24)
    s = _logits(b, k, seed=25)
    t = _logits(1, k, seed=26).expand(b, k)
    c = _logits(b, 1, seed=27).expand(b, k)
    for x, z in ((s, t), (s, c), (c, t)):
        _check_fp32(x, z, y, 2.0)


@pytest.mark.parametrize(("eps", "temperature"), [(1.0, 1.0), (0.5, 2.0)])
def test_extreme_logits_give_finite_exact_gradients(eps, temperature):
    # where OFA-KD's log(softmax) gives -inf and then NaN: a student certain of a wrong class, a teacher certain
    # of the target, large common offsets (no cancellation: the loss is a sum of non-negative terms)
    b, k = 4, 100
    y = torch.tensor([0, 1, 2, 3], device=DEV)
    s = _logits(b, k, seed=31, scale=1.0)
    t = _logits(b, k, seed=32, scale=1.0)
    s[0, 7] += 120.0
    t[0, 0] += 60.0
    s[1, 5] -= 40.0
    t[2, 2] += 90.0
    s[3] = s[3] + 500.0
    t[3] = -t[3] - 300.0
    (loss,), (gs, gt) = _grad_run(lambda a, c: ofa.ofa_loss(a, c, y, eps, temperature), (s, t), [GRAD_OUT])
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    _check_fp32(s, t, y, eps, temperature)


def test_out_of_range_target_on_the_gpu_path_is_nan_not_a_wild_read():
    b, k = 3, 41
    s, t = _logits(b, k, seed=33), _logits(b, k, seed=34)
    for bad in (k, -1):
        y = torch.tensor([0, bad, 5], device=DEV)
        loss, stats = ofa._forward(s, t, y, 1.0, 1.0)
        assert torch.isnan(loss)
        ds, dt = ofa._backward(s, t, y, stats, torch.ones((), device=DEV), 1.0, 1.0, True, True)
        assert torch.isnan(ds[1]).all() and torch.isnan(dt[1]).all()
        assert torch.isfinite(ds[[0, 2]]).all() and torch.isfinite(dt[[0, 2]]).all()


def test_forward_is_deterministic():
    s, t, y = _logits(64, 1537, seed=41), _logits(64, 1537, seed=42), _target(64, 1537, seed=43)
    first = ofa.ofa_loss(s, t, y, 0.5)
    assert torch.equal(first, ofa.ofa_loss(s, t, y, 0.5))


# ----------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------


def _bad_calls():
    x = torch.randn(3, 41)
    y = torch.tensor([0, 5, 40])
    meta = torch.empty(3, 41, device="meta")
    return [
        ("shape", lambda: ofa.ofa_loss(x, torch.randn(3, 40), y), r"same shape.*\(3, 41\).*\(3, 40\)"),
        ("dtype-f64", lambda: ofa.ofa_loss(x.double(), x.double(), y), r"float64.*float32, float16 or bfloat16"),
        ("rank1", lambda: ofa.ofa_loss(x[0], x[0], y), r"2-D \(B, num_classes\).*\(41,\)"),
        ("empty", lambda: ofa.ofa_loss(x[:0], x[:0], y[:0]), r"empty.*\(0, 41\)"),
        ("devices", lambda: ofa.ofa_loss(x, meta, y), r"same device.*cpu.*meta"),
        ("target-int32", lambda: ofa.ofa_loss(x, x, y.int()), r"int64.*torch.int32"),
        ("target-rows", lambda: ofa.ofa_loss(x, x, y[:2]), r"one class index per row \(3\).*\(2,\)"),
        ("target-too-big", lambda: ofa.ofa_loss(x, x, torch.tensor([0, 41, 3])), r"in \[0, 41\).*\[0, 41\]"),
        ("target-negative", lambda: ops.ofa_loss(x, x, torch.tensor([-1, 0, 3])), r"in \[0, 41\).*\[-1, 3\]"),
        ("soft-to-kernel", lambda: ofa.ofa_loss(x, x, torch.rand(3, 41)), r"\(B,\) class indices.*patfast.ops"),
        ("soft-shape", lambda: ops.ofa_loss(x, x, torch.rand(3, 40)), r"soft labels.*\(3, 41\).*\(3, 40\)"),
        ("temperature-0", lambda: ofa.ofa_loss(x, x, y, 1.0, 0.0), r"temperature must be positive"),
        ("eps-negative", lambda: ofa.ofa_loss(x, x, y, -0.5), r"eps must be >= 0"),
        ("eps-nan", lambda: ofa.ofa_loss(x, x, y, float("nan")), r"eps must be finite"),
        ("ops-eps-tensor", lambda: ops.ofa_loss(x, x, y, torch.tensor(1.0)), r"eps must be a finite number"),
        ("ops-backend", lambda: ops.ofa_loss(x, x, y, backend="fast"), r"unknown backend 'fast'"),
        ("ops-dtype", lambda: ops.ofa_loss(x, x.double(), y, backend="triton"), r"logits_t.*float64"),
    ]


@pytest.mark.parametrize(("call", "match"), [c[1:] for c in _bad_calls()], ids=[c[0] for c in _bad_calls()])
def test_input_errors_are_clear_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_registered_in_ops():
    assert "ofa_loss" in ops.triton_ops()
    s, t, y = _logits(3, 41, seed=81), _logits(3, 41, seed=82), _target(3, 41, seed=83)
    torch.testing.assert_close(ops.ofa_loss(s, t, y, 0.5, 2.0, backend="triton"), ofa.ofa_loss(s, t, y, 0.5, 2.0),
                               rtol=0, atol=0)
    want = ops.ofa_loss(s.double(), t.double(), y, 0.5, 2.0, backend="auto")  # float64: the reference
    _assert_close_rel(ops.ofa_loss(s, t, y, 0.5, 2.0, backend="triton"), want, FP32_RTOL, "triton vs reference")
    if not CUDA:  # "auto" on CPU tensors is the reference
        assert ops._select("ofa_loss", "auto", s.device, s.dtype, t.dtype) is reference.ofa_loss_ref


# ----------------------------------------------------------------------------------------------------------------
# Compile-only: PTX/cubin for sm_80 and sm_90 without a GPU
# ----------------------------------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _build(kernel, config, dtypes, arch, constexprs, unit_class_stride=True):
    """A compile_kernels build as the launcher specialises ``kernel`` for contiguous (aligned) inputs."""
    pointer_input = {"s_ptr": "s", "t_ptr": "t", "ds_ptr": "s", "dt_ptr": "t"}
    cx = {**constexprs, "BLOCK_B": config["BLOCK_B"], "BLOCK_K": config["BLOCK_K"], "y_stride": 1}
    if unit_class_stride:
        cx.update({"s_stride_k": 1, "t_stride_k": 1})
    signature = {}
    for name in kernel.arg_names:
        if name in cx:
            signature[name] = "constexpr"
        elif name == "y_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = f"*{_TRITON_DTYPE[dtypes[pointer_input[name]]]}" if name in pointer_input else "*fp32"
        else:
            signature[name] = "fp32" if name in ("eps", "temperature") else "i32"
    aligned = [n for n in kernel.arg_names if n.endswith("_ptr")]
    return dict(kernel=kernel, signature=signature, constexprs=cx, arch=arch, num_warps=config["num_warps"],
                aligned=aligned)


def _compile_only_builds():
    fwd, bwd = ofa._ofa_fwd_kernel, ofa._ofa_bwd_kernel
    grads = {"GRAD_S": True, "GRAD_T": True}
    fp32 = dict.fromkeys("st", torch.float32)
    mixed = {"s": torch.bfloat16, "t": torch.float32}
    builds = []
    for arch in (90, 80):
        builds += [
            ("fwd fp32 K=1000", _build(fwd, ofa._fwd_config(128, 1000), fp32, arch, {"ALIGN": 4})),
            ("bwd fp32 K=1000", _build(bwd, ofa._bwd_config(128, 1000), fp32, arch, {"ALIGN": 4, **grads})),
            ("fwd bf16-fp32 K=100 mixed", _build(fwd, ofa._fwd_config(128, 100), mixed, arch, {"ALIGN": 4})),
            ("bwd bf16-fp32 K=100 mixed", _build(bwd, ofa._bwd_config(128, 100), mixed, arch,
                                                 {"ALIGN": 4, "GRAD_S": True, "GRAD_T": False})),
        ]
    builds += [("fwd fp16 K=1537 strided", _build(fwd, ofa._fwd_config(256, 1537), dict.fromkeys("st", torch.float16),
                                                  90, {"ALIGN": 1}, unit_class_stride=False)),
               ("bwd fp16 K=1537 strided", _build(bwd, ofa._bwd_config(256, 1537), dict.fromkeys("st", torch.float16),
                                                  90, {"ALIGN": 1, **grads}, unit_class_stride=False))]
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
        if name.startswith("fwd"):
            assert "atom." not in ptx, f"{name}: the forward must not use atomics (determinism)"
        if name.endswith("mixed"):  # bf16 logits widened in registers, their gradient rounded to nearest even
            assert "cvt.f32.bf16" in ptx, name
            if name.startswith("bwd"):
                assert re.search(r"cvt\.rn\.bf16(x2)?\.f32", ptx), f"{name}: gradient not rounded to nearest"
        usage = resource_usage(asm["cubin"])
        assert usage is None or max(u["STACK"] for u in usage) == 0, f"{name}: register spills: {usage}"
        print(f"{name} sm_{build['arch']}: {usage}")


# ----------------------------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_large_batch_and_compile_fullgraph():
    b, k = 512, 1000
    s, t, y = _logits(b, k, seed=140), _logits(b, k, seed=141, scale=3.0), _target(b, k, seed=142)
    _check_fp32(s, t, y, 0.5)
    _check_dtypes(torch.bfloat16, torch.float32, b, k, 1.0, 1.0, seed=143)
    step = lambda a, c: ops.ofa_loss(a, c, y, 1.0) + 0.5 * ops.ofa_loss(a, c, y, 0.5, 2.0)  # noqa: E731
    want = _grad_run(step, (s, t), [1.0])
    torch._dynamo.reset()
    got = _grad_run(torch.compile(step, fullgraph=True), (s, t), [1.0])
    for a, r in zip([*got[0], *got[1]], [*want[0], *want[1]]):
        _assert_close_rel(a, r, FP32_RTOL, "torch.compile vs eager")


@pytest.mark.gpu
def test_gpu_one_launch_each_way_and_bitwise_deterministic():
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    s, t = (_logits(128, 1000, seed=120 + i, dtype=torch.bfloat16) for i in range(2))
    y = _target(128, 1000, seed=122)
    s.requires_grad_()
    go = torch.ones((), device=DEV)
    for _ in range(2):  # compile the kernels first
        torch.autograd.grad(ofa.ofa_loss(s, t, y), (s,), go)
    torch.cuda.synchronize()

    def kernels(fn):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = fn()
            torch.cuda.synchronize()
        return out, [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]

    loss, fwd = kernels(lambda: ofa.ofa_loss(s, t, y))
    _, bwd = kernels(lambda: torch.autograd.grad(loss, (s,), go))
    assert len(fwd) == 1 and "_ofa_fwd_kernel" in fwd[0], fwd
    assert len(bwd) == 1 and "_ofa_bwd_kernel" in bwd[0], bwd
    big = [_logits(4096, 1000, seed=130 + i) for i in range(2)]
    yb = _target(4096, 1000, seed=132)
    first = ofa.ofa_loss(*big, yb)
    assert all(torch.equal(ofa.ofa_loss(*big, yb), first) for _ in range(3))
