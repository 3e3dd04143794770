"""Every op with inputs of different dtypes (issue #11): each read in its own dtype, each gradient in its own dtype.

Under bf16 autocast PAT hands the ops mixed inputs: a bf16 aligned student map against an fp32 teacher feature,
bf16 student logits against fp32 teacher logits, fp32 q / k (Linear + an fp32 pos) beside a bf16 v. The matrix
follows flash-attention's tests/ops/triton/test_layer_norm.py (input_dtype x residual_dtype): every (student,
teacher) pair of float32 / float16 / bfloat16 for HCL and KD (no tl.dot, so bf16 runs in the interpreter too);
float32 / float16 for RAA, whose core uses tl.dot (bf16 tl.dot is broken in the interpreter, triton issue 11584:
RAA bf16 numerics are GPU-only, in test_raa_kernel.py).

Truth: the reference in float64 on the same rounded inputs. Each result is judged by the rule of its own dtype:
float32 results (the losses always; gradients of float32 inputs when the op computes in float32) to a max-norm
relative error of 1e-5; 16-bit results to at most 2x PyTorch's own error (the reference run eagerly on the same
mixed inputs: in their promoted dtype, or under the same autocast) plus half an ulp of the largest true value (the
rounding of the result itself, which no kernel avoids: with one 16-bit input and an fp32 partner PyTorch computes
in fp32 and its error is that rounding alone, which can come out smaller by luck) and the subnormal spacing. Under
the interpreter a bf16 result gets a whole ulp instead: its fp32 -> bf16 conversion truncates (triton 3.6 and 3.8,
runtime/interpreter.py: cast_impl calls _convert_float with no rounding mode), where the GPU rounds to nearest even.
Odd shapes (batch 3, 7x7 maps, 41 classes, widths 5 / 9 / 24), mixed layouts, grad_output != 1, fresh random
inputs (never zeros) seeded by the test id.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from patfast import ops
from patfast.kernels import reference

raa = pytest.importorskip("patfast.kernels.raa")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
ALL = (F32, F16, BF16)
DOT_SAFE = (F32, F16)  # dtypes whose tl.dot the interpreter computes correctly
NAMES = {F32: "fp32", F16: "fp16", BF16: "bf16"}
PAIRS = [(a, b) for a in ALL for b in ALL]
FP32_RTOL = 1e-5
# Interpreted kernels (the default without a GPU) round fp32 -> bf16 toward zero: up to one ulp, not half.
BF16_ULPS = 1.0 if os.environ.get("TRITON_INTERPRET") == "1" else 0.5


def _pair_id(pair) -> str:
    return "-".join(NAMES[d] for d in pair)


@pytest.fixture
def seed(request) -> int:
    return zlib.crc32(request.node.nodeid.encode())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rnd(g, *shape, std=1.0, mean=0.0, dtype=F32):
    return (torch.randn(shape, generator=g, dtype=F64) * std + mean).to(device=DEV, dtype=dtype)


def _grad_run(fn, inputs, grad_outs):
    """(outputs, gradients of every input) of fn(*inputs) under upstream gradients ``grad_outs``; nothing cast."""
    leaves = [x.detach().requires_grad_(True) for x in inputs]  # detach keeps dtype, strides and layout
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gos = [g.to(device=o.device, dtype=o.dtype) for g, o in zip(grad_outs, outs)]
    grads = torch.autograd.grad(outs, leaves, gos)
    return [o.detach() for o in outs], list(grads)


def _truth(fn, inputs, grad_outs):
    """float64 on the CPU, from the same rounded input values."""
    return _grad_run(fn, [x.detach().cpu().double() for x in inputs], [g.cpu().double() for g in grad_outs])


def _err(x, want) -> float:
    return (x.detach().cpu().double() - want).abs().max().item()


def _judge(what, got, torch_got, want, fp32_exact: bool):
    """got: the kernel's result; torch_got: eager PyTorch's on the same inputs; want: the float64 truth."""
    scale = want.abs().max().item()
    if got.dtype == F32 and fp32_exact:
        rel = _err(got, want) / max(scale, 1e-30)
        assert rel <= FP32_RTOL, f"{what} (fp32): max-norm relative error {rel:.3g} > {FP32_RTOL:g}"
        return
    finfo = torch.finfo(got.dtype)
    ulps = BF16_ULPS if got.dtype == BF16 else 0.5
    floor = ulps * finfo.eps * scale + finfo.smallest_normal * finfo.eps
    err, torch_err = _err(got, want), _err(torch_got, want)
    assert err <= 2 * torch_err + floor, (
        f"{what} ({NAMES[got.dtype]}): error {err:.3g} > 2 x PyTorch's {torch_err:.3g} + {floor:.2g}"
    )


def _check(names, inputs, ours, torch_run, truth, fp32_exact=True):
    """Every output and gradient judged by its dtype's rule; each gradient in its input's dtype, shape and layout."""
    (outs, grads), (t_outs, t_grads), (w_outs, w_grads) = ours, torch_run, truth
    for i, (o, t, w) in enumerate(zip(outs, t_outs, w_outs)):
        _judge(f"output {i}", o, t, w, fp32_exact)
    for name, x, g, t, w in zip(names, inputs, grads, t_grads, w_grads):
        assert g.dtype == x.dtype and g.shape == x.shape, f"grad {name}: {g.dtype} {tuple(g.shape)}"
        _judge(f"grad {name}", g, t, w, fp32_exact)


def _exact(x: torch.Tensor) -> torch.Tensor:
    """x rounded so that float32, float16 and bfloat16 all hold it exactly (float64): an upstream gradient the
    kernel, eager PyTorch (whatever its output dtype) and the float64 truth all see with the same value."""
    return x.to(BF16).to(F16).to(F64)


def _scalar_go(seed: int) -> torch.Tensor:
    """An upstream gradient in [2, 3): the loss is not the last layer."""
    return _exact(2.0 + torch.rand((), generator=_gen(seed + 1), dtype=F64))


# ----------------------------------------------------------------------------------------------------------------
# HCL: every (student, teacher) dtype pair, NCHW / channels_last / tokens
# ----------------------------------------------------------------------------------------------------------------


def _hcl_features(layout, dtypes, seed):
    """A (student, teacher) pair in ``dtypes``: independent draws with different means (the pooled terms matter)."""
    g = _gen(seed)
    (ds, dt) = dtypes
    if layout == "nchw-7x7":
        return _rnd(g, 3, 4, 7, 7, mean=0.5, dtype=ds), _rnd(g, 3, 4, 7, 7, std=0.8, mean=-0.3, dtype=dt)
    if layout == "channels_last-vs-nchw":  # the aligned student in channels_last, the teacher map NCHW
        fs = _rnd(g, 3, 5, 7, 9, mean=0.5, dtype=ds).to(memory_format=torch.channels_last)
        return fs, _rnd(g, 3, 5, 7, 9, std=0.8, mean=-0.3, dtype=dt)
    # tokens (B, L, C): a teacher with its class token sliced off, read in place
    return _rnd(g, 3, 49, 5, mean=0.5, dtype=ds), _rnd(g, 3, 50, 5, std=0.8, mean=-0.3, dtype=dt)[:, 1:]


@pytest.mark.parametrize("layout", ["nchw-7x7", "channels_last-vs-nchw", "tokens"])
@pytest.mark.parametrize("dtypes", PAIRS, ids=_pair_id)
def test_hcl_loss_each_input_in_its_own_dtype(dtypes, layout, seed):
    fs, ft = _hcl_features(layout, dtypes, seed)
    go = [_scalar_go(seed)]
    ours = _grad_run(lambda a, b: ops.hcl_loss(a, b, backend="triton"), (fs, ft), go)
    torch_run = _grad_run(reference.hcl_loss_ref, (fs, ft), go)
    _check(("feat_s", "feat_t"), (fs, ft), ours, torch_run, _truth(reference.hcl_loss_ref, (fs, ft), go))
    assert ours[0][0].dtype == F32
    if layout.startswith("channels_last"):  # a dense input's gradient keeps its layout
        assert ours[1][0].is_contiguous(memory_format=torch.channels_last) and ours[1][1].is_contiguous()


def test_hcl_loss_stages_each_stage_with_its_own_dtypes(seed):
    # Three stages, three dtype pairs, three layouts, in one call of the Triton op and of the reference op.
    stages = [("tokens", (BF16, F32)), ("nchw-7x7", (F32, F16)), ("channels_last-vs-nchw", (F16, BF16))]
    pairs = [_hcl_features(layout, dtypes, seed + i) for i, (layout, dtypes) in enumerate(stages)]
    feats = [x for pair in pairs for x in pair]
    names = [f"stage {i // 2} {'st'[i % 2]}" for i in range(len(feats))]

    def stages_op(backend):
        return lambda *xs: ops.hcl_loss_stages(xs[0::2], xs[1::2], backend=backend)

    go = [_scalar_go(seed)]
    truth = _truth(stages_op("reference"), feats, go)
    torch_run = _grad_run(stages_op("reference"), feats, go)
    _check(names, feats, _grad_run(stages_op("triton"), feats, go), torch_run, truth)
    # the reference op on mixed inputs: computes in each pair's promoted dtype (fp32 here), so it is fp32-exact
    for i, (o, w) in enumerate(zip(torch_run[0] + torch_run[1], truth[0] + truth[1])):
        if o.dtype == F32:
            assert _err(o, w) <= FP32_RTOL * w.abs().max().item(), f"reference result {i}"


# ----------------------------------------------------------------------------------------------------------------
# KD: every (student, teacher) pair; the PAT pair with a third dtype for the prompted teacher
# ----------------------------------------------------------------------------------------------------------------

_THIRD = {(F32, F32): BF16, (F16, F16): F32, (BF16, BF16): F16}  # equal pair: some other dtype for pt


def _third(ds, dt):
    return _THIRD.get((ds, dt)) or next(d for d in ALL if d not in (ds, dt))


def _logits(g, dtype, std, strided=False):
    """(3, 41) logits; strided: a column slice of a wider tensor (row stride 48, class stride 1)."""
    if strided:
        return _rnd(g, 3, 48, std=std, dtype=dtype)[:, 4:45]
    return _rnd(g, 3, 41, std=std, dtype=dtype)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("dtypes", PAIRS, ids=_pair_id)
def test_kd_loss_each_input_in_its_own_dtype(dtypes, temperature, seed):
    g = _gen(seed)
    s, t = _logits(g, dtypes[0], 2.0, strided=True), _logits(g, dtypes[1], 3.0)
    go = [_scalar_go(seed)]

    def ref(a, b):
        return reference.kd_loss_ref(a, b, temperature)

    ours = _grad_run(lambda a, b: ops.kd_loss(a, b, temperature, backend="triton"), (s, t), go)
    _check(("logits_s", "logits_t"), (s, t), ours, _grad_run(ref, (s, t), go), _truth(ref, (s, t), go))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("dtypes", PAIRS, ids=_pair_id)
def test_kd_loss_pair_each_input_in_its_own_dtype(dtypes, temperature, seed):
    g = _gen(seed)
    ds, dt = dtypes
    s, pt, t = _logits(g, ds, 2.0), _logits(g, _third(ds, dt), 2.5, strided=True), _logits(g, dt, 3.0)
    go = [_scalar_go(seed), _scalar_go(seed + 7) / 4]  # different upstream gradients for kd and reg

    def ref(a, b, c):
        return reference.kd_loss_pair_ref(a, b, c, temperature)

    ours = _grad_run(lambda a, b, c: ops.kd_loss_pair(a, b, c, temperature, backend="triton"), (s, pt, t), go)
    assert all(o.dtype == F32 for o in ours[0])
    _check(("logits_s", "logits_pt", "logits_t"), (s, pt, t), ours, _grad_run(ref, (s, pt, t), go),
           _truth(ref, (s, pt, t), go))


def test_kd_inputs_are_not_promoted(monkeypatch, seed):
    # No promotion copy between ops and the kernel: the launcher gets the caller's tensors, each in its dtype.
    from patfast.kernels import kd

    seen = []
    forward = kd._forward
    monkeypatch.setattr(kd, "_forward", lambda s, t, p, temp: seen.append((s, t, p)) or forward(s, t, p, temp))
    g = _gen(seed)
    s, pt, t = _logits(g, BF16, 2.0), _logits(g, F16, 2.0), _logits(g, F32, 3.0)
    ops.kd_loss_pair(s, pt, t, 2.0, backend="triton")
    assert seen[0][0] is s and seen[0][1] is t and seen[0][2] is pt


# ----------------------------------------------------------------------------------------------------------------
# RAA: the core with q, k, v in their own dtypes (outside and inside autocast), the op with mixed front dtypes
# ----------------------------------------------------------------------------------------------------------------

CORE_DTYPES = [(a, b, c) for a in DOT_SAFE for b in DOT_SAFE for c in DOT_SAFE] + [
    pytest.param(d, marks=pytest.mark.gpu) for d in ((BF16, F32, F32), (F32, F32, BF16), (BF16, BF16, BF16))
]  # bf16 on a GPU only: the interpreter's bf16 tl.dot is broken
AUTOCAST = [F16, pytest.param(BF16, marks=pytest.mark.gpu)]


def _qkv(seed, dtypes, b=3, h=2, n=17, hd=24):
    """q as the (B, N, H, hd) layout raa_attention makes, k contiguous, v a slice of a [k | v] buffer."""
    g = _gen(seed)
    q = _rnd(g, b, n, h, hd, std=1.5, dtype=dtypes[0]).transpose(1, 2)
    k = _rnd(g, b, h, n, hd, std=1.5, dtype=dtypes[1])
    v = _rnd(g, b, n, 2, h, hd, std=1.5, dtype=dtypes[2])[:, :, 1].transpose(1, 2)
    return q, k, v


def _attention(q, k, v, scale):
    """softmax(q k^T * scale) v in eager PyTorch (promoted dtype, or by autocast's rules under autocast)."""
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if not torch.is_autocast_enabled(q.device.type):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v


def _upstream(shape, seed):
    return _exact(torch.randn(shape, generator=_gen(seed + 3), dtype=F64) * 2.0 + 0.5)


@pytest.mark.parametrize("dtypes", CORE_DTYPES, ids=_pair_id)
def test_raa_core_q_k_v_each_in_its_own_dtype(dtypes, seed):
    q, k, v = _qkv(seed, dtypes)
    scale = 24**-0.5
    go = [_upstream(q.shape, seed)]
    ours = _grad_run(lambda *t: raa.raa_core(*t, scale), (q, k, v), go)
    compute = torch.promote_types(torch.promote_types(dtypes[0], dtypes[1]), dtypes[2])
    assert ours[0][0].dtype == compute
    _check("qkv", (q, k, v), ours, _grad_run(lambda *t: _attention(*t, scale), (q, k, v), go),
           _truth(lambda *t: _attention(*t, scale), (q, k, v), go))


@pytest.mark.parametrize("half", AUTOCAST, ids=lambda d: NAMES[d])
@pytest.mark.parametrize("dtypes", [(F32, F32, "half"), (F32, "half", F32), (F32, F32, F32)],
                         ids=lambda ds: "-".join(NAMES.get(d, "half") for d in ds))
def test_raa_core_under_autocast_converts_in_registers(dtypes, half, seed):
    # Under autocast the core computes in the autocast dtype, reading fp32 q / k / v in place and rounding them in
    # registers, as bf16 autocast on a GPU does with fp32 q and k beside a bf16 v.
    dtypes = tuple(half if d == "half" else d for d in dtypes)
    q, k, v = _qkv(seed, dtypes)
    scale = 24**-0.5
    go = [_upstream(q.shape, seed)]

    def under_autocast(fn):
        def run(*t):
            with torch.autocast(DEV.type, dtype=half):
                return fn(*t)
        return run

    ours = _grad_run(under_autocast(lambda *t: raa.raa_core(*t, scale)), (q, k, v), go)
    assert ours[0][0].dtype == half
    torch_run = _grad_run(under_autocast(lambda *t: _attention(*t, scale)), (q, k, v), go)
    _check("qkv", (q, k, v), ours, torch_run, _truth(lambda *t: _attention(*t, scale), (q, k, v), go),
           fp32_exact=False)


RAA_NAMES = ("tokens", "norm_weight", "norm_bias", "q_weight", "q_bias", "kv_weight", "kv_bias", "pos")
# (tokens, parameters, pos) dtypes: 16-bit tokens with fp32 weights (outside autocast F.linear would refuse them),
# fp32 tokens with 16-bit weights, an fp16 pos beside fp32 rest, and everything fp16 (bf16 ones on a GPU only).
FRONT_DTYPES = [(F16, F32, F32), (F32, F16, F16), (F32, F32, F16), (F16, F16, F16),
                *(pytest.param(d, marks=pytest.mark.gpu) for d in ((BF16, F32, F32), (F32, BF16, F16)))]


def _raa_inputs(seed, dtypes, b=3, n=17, d=48):
    g = _gen(seed)
    tok, par, pos = dtypes
    w = 1.5 / d**0.5
    return [_rnd(g, b, n, d, std=1.5, mean=0.2, dtype=tok), _rnd(g, d, std=0.2, mean=1.0, dtype=par),
            _rnd(g, d, std=0.2, dtype=par), _rnd(g, d, d, std=w, dtype=par), _rnd(g, d, std=0.2, dtype=par),
            _rnd(g, 2 * d, d, std=w, dtype=par), _rnd(g, 2 * d, std=0.2, dtype=par), _rnd(g, 1, n, d, dtype=pos)]


@pytest.mark.parametrize("dtypes", FRONT_DTYPES, ids=_pair_id)
def test_raa_attention_mixed_front_dtypes(dtypes, seed):
    xs = _raa_inputs(seed, dtypes)
    go = [_upstream((3, 17, 48), seed)]

    def ref(*t):
        return reference.raa_attention_ref(*t, 4)

    ours = _grad_run(lambda *t: ops.raa_attention(*t, 4, backend="triton"), xs, go)
    assert ours[0][0].dtype == dtypes[0]  # the output has the dtype of tokens
    _check(RAA_NAMES, xs, ours, _grad_run(ref, xs, go), _truth(ref, xs, go))


@pytest.mark.parametrize("half", AUTOCAST, ids=lambda d: NAMES[d])
def test_raa_attention_under_autocast_with_mixed_inputs(half, seed):
    # 16-bit tokens, fp32 parameters and pos under autocast: the front by autocast's rules, the core in its dtype.
    xs = _raa_inputs(seed, (half, F32, F32))
    go = [_upstream((3, 17, 48), seed)]

    def under_autocast(fn):
        def run(*t):
            with torch.autocast(DEV.type, dtype=half):
                return fn(*t, 4)
        return run

    ours = _grad_run(under_autocast(lambda *t: ops.raa_attention(*t, backend="triton")), xs, go)
    assert ours[0][0].dtype == half
    torch_run = _grad_run(under_autocast(reference.raa_attention_ref), xs, go)
    truth = _truth(lambda *t: reference.raa_attention_ref(*t, 4), xs, go)
    _check(RAA_NAMES, xs, ours, torch_run, truth, fp32_exact=False)
