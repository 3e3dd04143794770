"""The fused Triton Region-Aware Attention (patfast.kernels.raa) against the float64 reference.

Without a GPU the kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on CPU
tensors, which is slow: shapes are small and D = 512 appears only twice. The truth is ``raa_attention_ref`` (or a
plain softmax(q k^T * scale) v for the core) on the inputs cast to float64 (the same rounded values, exact
arithmetic), gradients by autograd through it, with a random upstream gradient. fp32: max-norm relative error
<= 1e-5 on the output and on the gradient of every input. 16-bit: error <= 2x PyTorch's own error at that dtype (the
reference run in that dtype) plus a small floor; bf16 only on a GPU (the interpreter's bf16 tl.dot is broken).
The compile-only test builds the core kernels for sm_80 and sm_90 at the PAT shape and reads the PTX.
"""

from __future__ import annotations

import re
import zlib

import pytest
import torch

from patfast import ops
from patfast.kernels import perf_model, reference
from patfast.kernels._compile_check import compile_kernels, resource_usage

triton = pytest.importorskip("triton")
raa = pytest.importorskip("patfast.kernels.raa")

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
F64 = torch.float64
FP32_RTOL = 1e-5
INPUT_NAMES = ("tokens", "norm_weight", "norm_bias", "q_weight", "q_bias", "kv_weight", "kv_bias", "pos")

# (B, N, D, heads, pos layout): every N of the issue (36, 64, 100, 144: masked key/query padding and several query
# blocks), head_dim 8 (padded to 16), 16, 32, 64; D = 512 with 8 heads (the PAT shape) once.
CASES_F32 = [
    (3, 36, 64, 8, "paper"),
    (3, 100, 64, 4, "official"),
    (1, 64, 256, 4, "official"),
    (1, 144, 256, 8, "paper"),
    (2, 64, 512, 8, "paper"),
]
CASES_F16 = [(3, 36, 64, 8, "official"), (1, 100, 256, 8, "paper"), (1, 64, 512, 8, "official")]
CASES_BF16_GPU = [(3, 36, 64, 8, "paper"), (3, 144, 256, 4, "official"), (8, 64, 512, 8, "paper")]


def _case_id(case) -> str:
    b, n, d, h, layout = case
    return f"B{b}-N{n}-D{d}-H{h}-{layout}"


@pytest.fixture
def seed(request) -> int:
    return zlib.crc32(request.node.nodeid.encode())


def _raa_inputs(b, n, d, layout, seed, dtype=torch.float32, device=DEV):
    """tokens, the six parameters and pos, never zero, scaled so the softmax is neither flat nor one-hot."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, mean=0.0):
        return torch.randn(shape, generator=g, dtype=F64) * std + mean

    w_std = 1.5 / d**0.5
    pos = rnd(1, n, d) if layout == "paper" else rnd(b, 1, d)
    xs = (rnd(b, n, d, std=1.5, mean=0.2), rnd(d, std=0.2, mean=1.0), rnd(d, std=0.2), rnd(d, d, std=w_std),
          rnd(d, std=0.2), rnd(2 * d, d, std=w_std), rnd(2 * d, std=0.2), pos)
    return [x.to(device=device, dtype=dtype) for x in xs]


def _grad_run(fn, inputs, grad_out):
    """(output, gradients of every input) of fn(*inputs) with upstream gradient grad_out, in float64 on the CPU."""
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.to(device=out.device, dtype=out.dtype))
    return [out.detach().double().cpu(), *(g.double().cpu() for g in grads)]


def _upstream(shape, seed, dtype):
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(shape, generator=g, dtype=F64) * 2.0 + 0.5).to(dtype)


def _triton_raa(num_heads):
    return lambda *xs: ops.raa_attention(*xs, num_heads, backend="triton")


def _truth_raa(inputs, num_heads, grad_out):
    return _grad_run(lambda *xs: reference.raa_attention_ref(*xs, num_heads),
                     [x.detach().cpu().double() for x in inputs], grad_out.double())


def _assert_rel(actual, expected, rtol, what):
    """Max-norm relative error: max |actual - expected| <= rtol * max |expected|."""
    err = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()
    assert err <= rtol, f"{what}: max-norm relative error {err:.3g} > {rtol:g}"


def _assert_within_2x_torch(dtype, got, torch_run, truth, names):
    """error <= 2 x PyTorch's error + half an ulp (in dtype) of the largest true value: the rounding of the result
    itself, which no kernel avoids (a gradient summed over many tokens can come out of PyTorch with an error of
    one such rounding by luck), + the spacing of the subnormals."""
    finfo = torch.finfo(dtype)
    tiny = finfo.smallest_normal * finfo.eps
    for name, a, t, want in zip(names, got, torch_run, truth):
        err = (a - want).abs().max().item()
        torch_err = (t - want).abs().max().item()
        floor = 0.5 * finfo.eps * want.abs().max().item() + tiny
        assert err <= 2 * torch_err + floor, f"{dtype} {name}: error {err:.3g} > 2 x PyTorch's {torch_err:.3g}"


# ----------------------------------------------------------------------------------------------------------------
# The whole op: values and the gradients of all seven inputs (plus pos)
# ----------------------------------------------------------------------------------------------------------------


def test_registered_in_ops():
    assert "raa_attention" in ops.triton_ops()
    xs = _raa_inputs(2, 36, 64, "paper", seed=1)
    torch.testing.assert_close(ops.raa_attention(*xs, 8, backend="triton"), raa.raa_attention(*xs, 8), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES_F32, ids=_case_id)
def test_float32_output_and_all_gradients_match_float64(case, seed):
    b, n, d, h, layout = case
    xs = _raa_inputs(b, n, d, layout, seed)
    go = _upstream((b, n, d), seed, torch.float32)
    got = _grad_run(_triton_raa(h), xs, go)
    assert got[0].shape == (b, n, d)
    for name, a, want in zip(("output", *INPUT_NAMES), got, _truth_raa(xs, h, go)):
        assert a.shape == want.shape, name
        _assert_rel(a, want, FP32_RTOL, name)


def _check_half(dtype, case, seed):
    b, n, d, h, layout = case
    xs = _raa_inputs(b, n, d, layout, seed, dtype)
    go = _upstream((b, n, d), seed, dtype)
    got = _grad_run(_triton_raa(h), xs, go)
    torch_run = _grad_run(lambda *t: reference.raa_attention_ref(*t, h), xs, go)
    truth = _truth_raa(xs, h, go)
    _assert_within_2x_torch(dtype, got, torch_run, truth, ("output", *INPUT_NAMES))


@pytest.mark.parametrize("case", CASES_F16, ids=_case_id)
def test_float16_error_at_most_twice_torch(case, seed):
    _check_half(torch.float16, case, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES_BF16_GPU, ids=_case_id)
def test_gpu_bfloat16_error_at_most_twice_torch(case, seed):
    _check_half(torch.bfloat16, case, seed)


def test_output_and_gradient_dtypes_and_partial_requires_grad(seed):
    b, n, d, h = 2, 36, 64, 4
    xs = _raa_inputs(b, n, d, "official", seed, torch.float16)
    tokens, pos = xs[0].requires_grad_(), xs[7].requires_grad_()  # the parameters do not require grad
    out = raa.raa_attention(*xs, h)
    assert out.dtype == torch.float16 and out.shape == (b, n, d)
    out.backward(_upstream((b, n, d), seed, torch.float16))
    assert tokens.grad.dtype == torch.float16 and pos.grad.shape == pos.shape
    assert all(x.grad is None for x in xs[1:7])
    truth = _truth_raa(xs, h, _upstream((b, n, d), seed, torch.float16))
    _assert_rel(tokens.grad.double().cpu(), truth[1], 2e-2, "fp16 grad tokens")


# ----------------------------------------------------------------------------------------------------------------
# The core alone: softmax(q k^T * scale) v, the saved log-sum-exp, and dQ, dK, dV
# ----------------------------------------------------------------------------------------------------------------


def _qkv(b, h, n, hd, seed, dtype=torch.float32, strided=False):
    """q, k, v of shape (B, H, N, hd); strided: q as the (B, N, H, hd) layout raa_attention makes, v a slice of a
    (B, N, 2, H, hd) buffer (like [k | v]), k an ordinary contiguous tensor."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(shape, generator=g, dtype=F64) * 1.5).to(device=DEV, dtype=dtype)

    if not strided:
        return rnd(b, h, n, hd), rnd(b, h, n, hd), rnd(b, h, n, hd)
    return rnd(b, n, h, hd).transpose(1, 2), rnd(b, h, n, hd), rnd(b, n, 2, h, hd)[:, :, 1].transpose(1, 2)


def _attention64(q, k, v, scale):
    s = (q.double() @ k.double().transpose(-2, -1)) * scale
    return torch.softmax(s, dim=-1) @ v.double(), torch.logsumexp(s, dim=-1)


# (B, H, N, head_dim): N = 1 (one key), N = 17 and head_dim = 40 (both padded), the N, the limits
CORE_SHAPES = [(2, 2, 1, 16), (2, 3, 17, 40), (3, 2, 36, 8), (1, 4, 64, 64), (1, 1, 256, 128)]


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("shape", CORE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_core_float32_output_lse_and_gradients(shape, strided, seed):
    b, h, n, hd = shape
    scale = hd**-0.5
    q, k, v = _qkv(b, h, n, hd, seed, strided=strided)
    o_want, lse_want = _attention64(q.cpu(), k.cpu(), v.cpu(), scale)
    o, lse = raa._core_forward(q, k, v, scale)  # the kernel's raw outputs: O as (B, N, H, hd), LSE (B, H, N)
    assert o.shape == (b, n, h, hd) and o.is_contiguous() and lse.shape == (b, h, n) and lse.dtype == torch.float32
    _assert_rel(o.transpose(1, 2).double().cpu(), o_want, FP32_RTOL, "O")
    _assert_rel(lse.double().cpu(), lse_want, FP32_RTOL, "LSE")
    go = _upstream((b, h, n, hd), seed, torch.float32)
    got = _grad_run(lambda *t: raa.raa_core(*t, scale), (q, k, v), go)
    want = _grad_run(lambda *t: _attention64(*t, scale)[0], [t.cpu().double() for t in (q, k, v)], go.double())
    for name, a, w in zip(("O", "dQ", "dK", "dV"), got, want):
        _assert_rel(a, w, FP32_RTOL, name)


@pytest.mark.parametrize("shape", [(3, 2, 36, 8), (1, 4, 64, 64)], ids=lambda s: "x".join(map(str, s)))
def test_core_float16_error_at_most_twice_torch(shape, seed):
    b, h, n, hd = shape
    scale = hd**-0.5
    qkv = _qkv(b, h, n, hd, seed, torch.float16, strided=True)
    go = _upstream((b, h, n, hd), seed, torch.float16)

    def torch_attention(q, k, v):  # eager PyTorch in float16
        return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v

    got = _grad_run(lambda *t: raa.raa_core(*t, scale), qkv, go)
    torch_run = _grad_run(torch_attention, qkv, go)
    truth = _grad_run(lambda *t: _attention64(*t, scale)[0], [t.cpu().double() for t in qkv], go.double())
    _assert_within_2x_torch(torch.float16, got, torch_run, truth, ("O", "dQ", "dK", "dV"))


def test_core_output_layout_mixed_dtypes_and_only_needed_grads(seed):
    b, h, n, hd = 2, 2, 36, 16
    q, k, v = _qkv(b, h, n, hd, seed)
    o = raa.raa_core(q, k.half(), v, 0.25)  # promoted to float32
    assert o.dtype == torch.float32 and o.shape == (b, h, n, hd)
    assert o.transpose(1, 2).is_contiguous()  # heads merge into (B, N, H * hd) for free
    _assert_rel(o.double().cpu(), _attention64(q.cpu(), k.half().cpu(), v.cpu(), 0.25)[0], FP32_RTOL, "O")
    v = v.requires_grad_()
    raa.raa_core(q, k, v, 0.25).sum().backward()
    assert q.grad is None and k.grad is None and v.grad.shape == v.shape


def test_core_non_unit_feature_stride_inputs_and_upstream_gradient(seed):
    # q with a strided feature axis is copied once; an upstream gradient with a strided feature axis too
    b, h, n, hd = 2, 2, 36, 16
    q, k, v = _qkv(b, h, n, hd, seed)
    q = q.transpose(-2, -1).contiguous().transpose(-2, -1)
    assert q.stride(-1) != 1
    go = _upstream((b, h, hd, n), seed, torch.float32).to(DEV).transpose(-2, -1)
    got = _grad_run(lambda *t: raa.raa_core(*t, 0.3), (q, k, v), go)
    want = _grad_run(lambda *t: _attention64(*t, 0.3)[0], [t.cpu().double() for t in (q, k, v)], go.double())
    for name, a, w in zip(("O", "dQ", "dK", "dV"), got, want):
        _assert_rel(a, w, FP32_RTOL, name)


# ----------------------------------------------------------------------------------------------------------------
# Input checks and dispatch
# ----------------------------------------------------------------------------------------------------------------


def _bad_calls():
    q = torch.randn(2, 2, 36, 16, device=DEV)
    xs = _raa_inputs(2, 36, 64, "paper", seed=5)
    return [
        ("core-rank", lambda: raa.raa_core(q[0], q[0], q[0], 0.25), r"\(B, H, N, head_dim\).*\(2, 36, 16\)"),
        ("core-shape", lambda: raa.raa_core(q, q[:, :, :35], q, 0.25), r"same shape.*k \(2, 2, 35, 16\)"),
        ("core-dtype", lambda: raa.raa_core(q.double(), q, q, 0.25), r"float64.*float32, float16 or bfloat16"),
        ("core-long-n", lambda: raa.raa_core(*[torch.randn(1, 1, 257, 8, device=DEV)] * 3, 0.25), r"257"),
        ("core-head-dim", lambda: raa.raa_core(*[torch.randn(1, 1, 4, 130, device=DEV)] * 3, 0.25), r"130"),
        ("core-empty", lambda: raa.raa_core(q[:0], q[:0], q[:0], 0.25), r"empty"),
        ("core-device", lambda: raa.raa_core(q, q.to("meta"), q, 0.25), r"same device"),
        ("core-scale", lambda: raa.raa_core(q, q, q, torch.tensor(0.25)), r"Python number"),
        ("rank", lambda: raa.raa_attention(xs[0][0], *xs[1:], 8), r"\(B, N, D\)"),
        ("heads", lambda: raa.raa_attention(*xs, 5), r"divisible by num_heads.*5"),
        ("dtype", lambda: raa.raa_attention(*[x.double() for x in xs], 8), r"float64"),
    ]


@pytest.mark.parametrize(("call", "match"), [c[1:] for c in _bad_calls()], ids=[c[0] for c in _bad_calls()])
def test_input_errors_are_clear_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_ops_dispatch_passes_every_input_dtype(monkeypatch):
    # "auto" must see every input's dtype: float64 anywhere on CUDA goes to the reference, not to the kernel.
    seen = []
    select = ops._select
    monkeypatch.setattr(ops, "_select", lambda *args: seen.append(args) or select(*args))
    xs = _raa_inputs(2, 16, 32, "paper", seed=7, dtype=F64, device="cpu")
    ops.raa_attention(*xs, 4)
    assert seen[-1][3:] == (F64,) * 8  # tokens, the six parameters and pos
    cuda = torch.device("cuda", 0)
    assert select("raa_attention", "auto", cuda, F64) is reference.raa_attention_ref
    assert select("raa_attention", "auto", cuda, torch.float16, *[torch.float32] * 7) is raa.raa_attention
    assert select("raa_attention", "auto", cuda, *[torch.float32] * 7, F64) is reference.raa_attention_ref


# ----------------------------------------------------------------------------------------------------------------
# Compile-only: PTX/cubin for sm_80 and sm_90 without a GPU
# ----------------------------------------------------------------------------------------------------------------

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
PAT = {"b": 128, "n": 64, "d": 512, "heads": 8}


def _pat_strides():
    """The (batch, head, token) strides raa_attention launches the core with at the PAT shape (meta tensors)."""
    b, n, d, h = PAT["b"], PAT["n"], PAT["d"], PAT["heads"]

    def heads(t):
        return t.unflatten(-1, (h, d // h)).transpose(1, 2)

    q = heads(torch.empty(b, n, d, device="meta"))  # Linear + pos: contiguous (B, N, D)
    v = heads(torch.empty(b, n, 2 * d, device="meta")[..., d:])  # the v half of [k | v]
    do = torch.empty(b, n, h, d // h, device="meta")  # upstream gradient of the (B, N, H, hd) output
    strides = {"q": q.stride()[:3], "k": q.stride()[:3], "v": v.stride()[:3],
               "do": (do.stride(0), do.stride(2), do.stride(1))}
    return {f"{t}_s{axis}": s for t, st in strides.items() for axis, s in zip("bhn", st)}


def _build(kernel, dtype, arch):
    """A compile_kernels build as the JIT would specialise it at the PAT shape: every pointer and every int that is
    a multiple of 16 marked 16-divisible. dtype: one torch dtype for every tensor but LSE, or
    {"q": ..., "k": ..., "v": ..., "o": ...}: q, k, v (and their gradients) each in its own, O and dO in "o"."""
    dtypes = dtype if isinstance(dtype, dict) else dict.fromkeys("qkvo", dtype)
    of_pointer = {"q_ptr": "q", "k_ptr": "k", "v_ptr": "v", "o_ptr": "o", "do_ptr": "o", "dq_ptr": "q", "dk_ptr": "k",
                  "dv_ptr": "v"}
    hd = PAT["d"] // PAT["heads"]
    cfg = (raa._fwd_config if kernel is raa._raa_fwd_kernel else raa._bwd_config)(PAT["n"], hd, dtypes["o"])
    values = {"H": PAT["heads"], "N": PAT["n"], **_pat_strides()}
    constexprs = {"HEAD_DIM": hd, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": cfg["BLOCK_D"]}
    signature, aligned = {}, []
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name == "lse_ptr" else "*" + _TRITON_TYPES[dtypes[of_pointer[name]]]
            aligned.append(name)
        elif name == "scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if values[name] % 16 == 0:
                aligned.append(name)
    return {"kernel": kernel, "signature": signature, "constexprs": constexprs, "aligned": aligned, "arch": arch,
            "num_warps": cfg["num_warps"], "maxnreg": cfg["maxnreg"]}


# Mixed dtypes (issue #11), as bf16 / fp16 autocast hands them to the core: q and k fp32 (Linear in the autocast
# dtype + an fp32 pos), v in the autocast dtype; the core computes in the autocast dtype, dQ and dK come back fp32.
_AUTOCAST = {half: {"q": torch.float32, "k": torch.float32, "v": half, "o": half}
             for half in (torch.bfloat16, torch.float16)}
COMPILE_CASES = [
    (f"{kernel}-{_TRITON_TYPES[dtype]}-sm{arch}", kernel, dtype, arch)
    for arch in (80, 90) for dtype in (torch.bfloat16, torch.float16) for kernel in ("fwd", "bwd")
] + [
    (f"{kernel}-fp32-qk-{_TRITON_TYPES[half]}-v-sm{arch}-mixed", kernel, _AUTOCAST[half], arch)
    for arch, half in ((80, torch.bfloat16), (90, torch.bfloat16), (80, torch.float16)) for kernel in ("fwd", "bwd")
]


@pytest.mark.slow
def test_compile_only_sm80_sm90_pat_shape_uses_tensor_cores():
    pytest.importorskip("triton.backends.nvidia")

    kernels = {"fwd": raa._raa_fwd_kernel, "bwd": raa._raa_bwd_kernel}
    builds = [_build(kernels[k], dtype, arch) for _, k, dtype, arch in COMPILE_CASES]
    for (name, kernel, dtype, arch), asm in zip(COMPILE_CASES, compile_kernels(builds)):
        ptx = asm["ptx"]
        assert f".target sm_{arch}" in ptx and ".entry" in ptx, name
        assert asm.get("cubin"), f"{name}: no cubin"
        if arch == 80:
            assert "mma.sync" in ptx, f"{name}: the dots did not become mma.sync"
        else:
            assert "wgmma" in ptx or "mma.sync" in ptx, f"{name}: the dots did not become wgmma / mma"
        assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx), f"{name}: 16-byte loads expected (unit feature stride)"
        assert "atom." not in ptx, f"{name}: no atomics"
        usage = resource_usage(asm["cubin"])
        assert usage is None or max(u["STACK"] for u in usage) == 0, f"{name}: register spills ({usage})"
        if usage is not None:  # issue 15: <= 128 registers, so 2 backward (8 warps) / 4 forward programs per SM
            regs = usage[0]["REG"]
            assert regs <= 128, f"{name}: {regs} registers per thread"
            cfg = (raa._fwd_config if kernel == "fwd" else raa._bwd_config)(PAT["n"], PAT["d"] // PAT["heads"],
                                                                            dtype["o"] if isinstance(dtype, dict)
                                                                            else dtype)
            want = 4 if kernel == "fwd" else 2
            assert perf_model.resident_per_sm(regs, cfg["num_warps"]) >= want, f"{name}: {regs} registers"
        if name.endswith("mixed"):  # fp32 q and k rounded to the compute dtype in registers (to nearest even)
            half = _TRITON_TYPES[dtype["o"]].replace("fp", "f")
            assert re.search(rf"cvt\.rn\.{half}(x2)?\.f32", ptx), f"{name}: no fp32 -> {half} conversion"


# ----------------------------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------------------------


def _step(num_heads):
    def step(*xs):  # backend="auto" on CUDA tensors picks the Triton kernel inside the compiled graph
        return ops.raa_attention(*xs, num_heads)
    return step


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["paper", "official"])
def test_gpu_torch_compile_fullgraph_ops(layout, seed):
    b, n, d, h = 8, 64, 512, 8
    assert ops._select("raa_attention", "auto", DEV, torch.float32) is raa.raa_attention
    xs = _raa_inputs(b, n, d, layout, seed)
    go = _upstream((b, n, d), seed, torch.float32)
    torch._dynamo.reset()
    got = _grad_run(torch.compile(_step(h), fullgraph=True), xs, go)
    for name, a, want in zip(("output", *INPUT_NAMES), got, _truth_raa(xs, h, go)):
        _assert_rel(a, want, FP32_RTOL, f"compiled {name}")
    xs16 = [x.bfloat16() for x in xs]  # bf16: within 2x the error of eager PyTorch (the reference) in bf16
    go16 = go.bfloat16()
    compiled = _grad_run(torch.compile(_step(h), fullgraph=True), xs16, go16)
    torch_run = _grad_run(lambda *t: reference.raa_attention_ref(*t, h), xs16, go16)
    _assert_within_2x_torch(torch.bfloat16, compiled, torch_run, _truth_raa(xs16, h, go16), ("output", *INPUT_NAMES))


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_forward_backward(seed):
    b, n, d, h = 16, 64, 512, 8
    xs = [x.requires_grad_() for x in _raa_inputs(b, n, d, "paper", seed, torch.bfloat16)]
    go = _upstream((b, n, d), seed, torch.bfloat16).to(DEV)

    def step():
        out = raa.raa_attention(*xs, h)
        return (out, *torch.autograd.grad(out, xs, go))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    new = _raa_inputs(b, n, d, "paper", seed + 1, torch.bfloat16)
    with torch.no_grad():
        for x, fresh in zip(xs, new):
            x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    eager = _grad_run(lambda *t: raa.raa_attention(*t, h), new, go)
    for name, a, want in zip(("output", *INPUT_NAMES), static, eager):
        _assert_rel(a.double().cpu(), want, 1e-2, f"graph replay {name}")  # new inputs, not the captured ones


@pytest.mark.gpu
def test_gpu_autocast_bf16_within_2x_torch(seed):
    b, n, d, h = 8, 64, 512, 8
    xs = _raa_inputs(b, n, d, "official", seed)
    go = _upstream((b, n, d), seed, torch.float32)

    def under_autocast(fn):
        def run(*t):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return fn(*t)
        return run

    got = _grad_run(under_autocast(lambda *t: raa.raa_attention(*t, h)), xs, go)
    torch_run = _grad_run(under_autocast(lambda *t: reference.raa_attention_ref(*t, h)), xs, go)
    _assert_within_2x_torch(torch.bfloat16, got, torch_run, _truth_raa(xs, h, go), ("output", *INPUT_NAMES))
