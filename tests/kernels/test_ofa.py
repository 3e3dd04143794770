"""The fused Triton kernels of OFA's branch loss (patfast.kernels.ofa) and ops.ofa_loss's Triton backend.

On a machine without a GPU these run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
the compile-only test builds the same kernels for sm_80 / sm_90 and reads the PTX; tests marked ``gpu`` run only on
a CUDA machine. Truth: patfast.kernels.reference.ofa_loss_ref evaluated in float64 on the same (rounded) inputs.
The helpers are logit_cases.py's, shared with test_kd.py, test_dkd.py and test_dist.py (same tiles, same judging of
16-bit results).
"""

import pytest
import torch

from patfast import ops
from patfast.kernels import ofa, reference
from tests.kernels.logit_cases import (
    CUDA,
    DEV,
    FP32_RTOL,
    GRAD_OUT,
    assert_close_rel,
    build,
    check_compiled,
    check_dtypes,
    check_ptx,
    column_slice,
    compile_builds,
    cuda_kernel_names,
    fwd_bwd_builds,
    grad_run,
    logits,
    target,
    transposed_slice,
)

SMALL_BATCHES = (1, 3, 8)
CLASSES = (1, 2, 41, 1000, 1537)  # 1537 > MAX_BLOCK_K: the forward loops over class chunks
EPS_T = [(1.0, 1.0), (0.5, 2.0), (2.0, 1.0), (0.0, 1.0)]  # (eps, temperature); eps 0: weights 1 off the target
LARGE = [(256, 100, 1.0, 1.0), (256, 1000, 0.5, 1.0), (64, 1537, 2.0, 2.0)]


def _ref64(s, t, y, eps=1.0, temperature=1.0):
    return reference.ofa_loss_ref(s.double(), t.double(), y, eps, temperature)


def _check_fp32(s, t, y, eps=1.0, temperature=1.0, fn=None):
    fn = fn or (lambda a, b: ofa.ofa_loss(a, b, y, eps, temperature))
    (loss,), (gs, gt) = grad_run(fn, (s, t), [GRAD_OUT])
    (ref,), (rs, rt) = grad_run(lambda a, b: _ref64(a, b, y, eps, temperature), (s.double(), t.double()),
                                [GRAD_OUT])
    assert loss.shape == ()
    for what, got, want in (("loss", loss, ref), ("grad logits_s", gs, rs), ("grad logits_t", gt, rt)):
        if want.abs().max() > 0:
            assert_close_rel(got, want, FP32_RTOL, what)
        else:  # K = 1 (the loss is 0), eps = 0 (the weights do not depend on the teacher): exactly 0 in float64
            assert got.abs().max() <= 1e-7, f"{what} should be 0, got {got.abs().max():.3g}"


# ----------------------------------------------------------------------------------------------------------------
# fp32 values and gradients against float64
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("eps", "temperature"), EPS_T)
@pytest.mark.parametrize("k", CLASSES)
@pytest.mark.parametrize("b", SMALL_BATCHES)
def test_ofa_loss_fp32_matches_float64(b, k, eps, temperature):
    s = logits(b, k, seed=b * 7 + k, scale=2.0)
    t = logits(b, k, seed=b * 7 + k + 1, scale=3.0)
    y = target(b, k, seed=b + k)
    _check_fp32(s, t, y, eps, temperature,
                fn=lambda a, c: ops.ofa_loss(a, c, y, eps, temperature, backend="triton"))


@pytest.mark.parametrize(("b", "k", "eps", "temperature"), LARGE)
def test_ofa_loss_fp32_matches_float64_large_batch(b, k, eps, temperature):
    s, t = logits(b, k, seed=k + 1, scale=2.0), logits(b, k, seed=k + 2, scale=3.0)
    _check_fp32(s, t, target(b, k, seed=k + 3), eps, temperature)


def test_ofa_loss_output_dtype_and_grad_dtypes():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        s = logits(3, 41, seed=1, dtype=dtype).requires_grad_()
        t = logits(3, 41, seed=2, dtype=dtype).requires_grad_()
        loss = ofa.ofa_loss(s, t, target(3, 41, seed=3), 1.0, 2.0)
        assert loss.dtype == torch.float32 and loss.shape == ()
        loss.backward()
        assert s.grad.dtype == dtype and t.grad.dtype == dtype
        assert s.grad.shape == s.shape and t.grad.shape == t.shape and s.grad.is_contiguous()


def test_only_the_inputs_that_require_grad_get_one():
    b, k = 3, 100
    y = target(b, k, seed=8)
    s, t = logits(b, k, seed=9), logits(b, k, seed=10)
    _, (rs, rt) = grad_run(lambda a, c: _ref64(a, c, y, 0.5), (s, t), [1.0])
    sg = s.clone().requires_grad_()
    ofa.ofa_loss(sg, t, y, 0.5).backward()  # the teacher as in training: no grad
    assert t.grad is None
    assert_close_rel(sg.grad, rs, FP32_RTOL, "grad logits_s")
    tg = t.clone().requires_grad_()
    ofa.ofa_loss(s, tg, y, 0.5).backward()
    assert s.grad is None
    assert_close_rel(tg.grad, rt, FP32_RTOL, "grad logits_t")
    assert not ofa.ofa_loss(s, t, y).requires_grad


# ----------------------------------------------------------------------------------------------------------------
# 16-bit and mixed dtypes: at most 2x PyTorch's own error at the same dtype
# ----------------------------------------------------------------------------------------------------------------


def _check_dtypes(ds, dt, b, k, eps, temperature, seed):
    y = target(b, k, seed=seed + 2)
    check_dtypes(lambda a, c: ofa.ofa_loss(a, c, y, eps, temperature),
                 lambda a, c: reference.ofa_loss_ref(a, c, y, eps, temperature), ds, dt, b, k, seed)


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
    s, t = logits(b, k, seed=12), logits(b, k, seed=13)
    soft = torch.softmax(logits(b, k, seed=14, scale=3.0), dim=1)  # e.g. mixup / label-smoothed targets
    hard = soft.argmax(dim=1)
    for eps in (1.0, 0.5):
        got = grad_run(lambda a, c, e=eps: ops.ofa_loss(a, c, soft, e, backend=backend), (s, t), [GRAD_OUT])
        want = grad_run(lambda a, c, e=eps: ops.ofa_loss(a, c, hard, e, backend=backend), (s, t), [GRAD_OUT])
        for a, w in zip([*got[0], *got[1]], [*want[0], *want[1]]):
            assert torch.equal(a, w), (backend, eps)
    if backend == "triton":
        _check_fp32(s, t, hard, 0.5, fn=lambda a, c: ops.ofa_loss(a, c, soft, 0.5, backend="triton"))


@pytest.mark.parametrize(("make_s", "make_t"), [(column_slice, transposed_slice), (transposed_slice, column_slice)],
                         ids=["slice-s", "transposed-s"])
@pytest.mark.parametrize("k", [41, 1537])
def test_non_contiguous_inputs(make_s, make_t, k):
    b = 5
    s, t = make_s(b, k, seed=21), make_t(b, k, seed=22)
    y = target(2 * b, k, seed=23)[::2]  # a strided target too
    assert not s.is_contiguous() and not t.is_contiguous() and not y.is_contiguous()
    _check_fp32(s, t, y, 0.5, 2.0)


def test_broadcast_rows_and_uniform_logits():
    b, k = 4, 100
    y = target(b, k, seed=24)
    s = logits(b, k, seed=25)
    t = logits(1, k, seed=26).expand(b, k)
    c = logits(b, 1, seed=27).expand(b, k)
    for x, z in ((s, t), (s, c), (c, t)):
        _check_fp32(x, z, y, 2.0)


@pytest.mark.parametrize(("eps", "temperature"), [(1.0, 1.0), (0.5, 2.0)])
def test_extreme_logits_give_finite_exact_gradients(eps, temperature):
    # where OFA-KD's log(softmax) gives -inf and then NaN: a student certain of a wrong class, a teacher certain
    # of the target, large common offsets (no cancellation: the loss is a sum of non-negative terms)
    b, k = 4, 100
    y = torch.tensor([0, 1, 2, 3], device=DEV)
    s = logits(b, k, seed=31, scale=1.0)
    t = logits(b, k, seed=32, scale=1.0)
    s[0, 7] += 120.0
    t[0, 0] += 60.0
    s[1, 5] -= 40.0
    t[2, 2] += 90.0
    s[3] = s[3] + 500.0
    t[3] = -t[3] - 300.0
    (loss,), (gs, gt) = grad_run(lambda a, c: ofa.ofa_loss(a, c, y, eps, temperature), (s, t), [GRAD_OUT])
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    _check_fp32(s, t, y, eps, temperature)


def test_out_of_range_target_on_the_gpu_path_is_nan_not_a_wild_read():
    b, k = 3, 41
    s, t = logits(b, k, seed=33), logits(b, k, seed=34)
    for bad in (k, -1):
        y = torch.tensor([0, bad, 5], device=DEV)
        loss, stats = ofa._forward(s, t, y, 1.0, 1.0)
        assert torch.isnan(loss)
        ds, dt = ofa._backward(s, t, y, stats, torch.ones((), device=DEV), 1.0, 1.0, True, True)
        assert torch.isnan(ds[1]).all() and torch.isnan(dt[1]).all()
        assert torch.isfinite(ds[[0, 2]]).all() and torch.isfinite(dt[[0, 2]]).all()


def test_forward_is_deterministic():
    s, t, y = logits(64, 1537, seed=41), logits(64, 1537, seed=42), target(64, 1537, seed=43)
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
    s, t, y = logits(3, 41, seed=81), logits(3, 41, seed=82), target(3, 41, seed=83)
    torch.testing.assert_close(ops.ofa_loss(s, t, y, 0.5, 2.0, backend="triton"), ofa.ofa_loss(s, t, y, 0.5, 2.0),
                               rtol=0, atol=0)
    want = ops.ofa_loss(s.double(), t.double(), y, 0.5, 2.0, backend="auto")  # float64: the reference
    assert_close_rel(ops.ofa_loss(s, t, y, 0.5, 2.0, backend="triton"), want, FP32_RTOL, "triton vs reference")
    if not CUDA:  # "auto" on CPU tensors is the reference
        assert ops._select("ofa_loss", "auto", s.device, s.dtype, t.dtype) is reference.ofa_loss_ref


# ----------------------------------------------------------------------------------------------------------------
# Compile-only: PTX/cubin for sm_80 and sm_90 without a GPU
# ----------------------------------------------------------------------------------------------------------------


def _forward_builds(name, b, k, dtypes, arch, align, unit_class_stride=True):
    """The forward's two launches: the per-chunk kernel, then the one-program merge."""
    return [(f"{name} partial", build(ofa._ofa_partial_kernel, ofa._partial_config(b, k), dtypes, arch,
                                      {"ALIGN": align}, unit_class_stride)),
            (f"{name} merge", build(ofa._ofa_merge_kernel, ofa._merge_config(b, k), dtypes, arch, {},
                                    unit_class_stride))]


@pytest.mark.slow
def test_compile_only_sm80_sm90_ptx_with_vectorised_loads():
    pytest.importorskip("triton.backends.nvidia")

    # the backward's builds as the other logit losses'; the forward's two launches (issue 15) at the same shapes
    builds = [(n, b) for n, b in fwd_bwd_builds(ofa._ofa_partial_kernel, ofa._ofa_bwd_kernel, ofa._partial_config,
                                                ofa._bwd_config, contiguous={"ALIGN": 4}, strided={"ALIGN": 1})
              if n.startswith("bwd")]
    fp32, mixed = dict.fromkeys("st", torch.float32), {"s": torch.bfloat16, "t": torch.float32}
    for arch in (90, 80):
        builds += _forward_builds("fwd fp32 K=1000", 128, 1000, fp32, arch, 4)
        builds += _forward_builds("fwd bf16-fp32 K=100 mixed", 128, 100, mixed, arch, 4)
    builds += _forward_builds("fwd fp16 K=1537 strided", 256, 1537, dict.fromkeys("st", torch.float16), 90, 1,
                              unit_class_stride=False)
    for name, spec, asm in compile_builds(builds):
        streaming = not name.endswith(" merge")  # the merge reads O(B x chunks) statistics and the target logits
        usage = check_ptx(name, spec, asm, v4_loads="fp32 K=1000" in name and streaming,
                          v4_stores=name.startswith("bwd fp32"), no_atomics=name.startswith("fwd"),
                          widened="bf16" if "mixed" in name and streaming else None)
        print(f"{name} sm_{spec['arch']}: {usage}")


# ----------------------------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_large_batch_and_compile_fullgraph():
    b, k = 512, 1000
    s, t, y = logits(b, k, seed=140), logits(b, k, seed=141, scale=3.0), target(b, k, seed=142)
    _check_fp32(s, t, y, 0.5)
    _check_dtypes(torch.bfloat16, torch.float32, b, k, 1.0, 1.0, seed=143)
    check_compiled(lambda a, c: ops.ofa_loss(a, c, y, 1.0) + 0.5 * ops.ofa_loss(a, c, y, 0.5, 2.0), inputs=(s, t))


@pytest.mark.gpu
def test_gpu_two_launches_forward_one_backward_and_bitwise_deterministic():
    s, t = (logits(128, 1000, seed=120 + i, dtype=torch.bfloat16) for i in range(2))
    y = target(128, 1000, seed=122)
    s.requires_grad_()
    go = torch.ones((), device=DEV)
    for _ in range(2):  # compile the kernels first
        torch.autograd.grad(ofa.ofa_loss(s, t, y), (s,), go)
    torch.cuda.synchronize()
    loss, fwd = cuda_kernel_names(lambda: ofa.ofa_loss(s, t, y))
    _, bwd = cuda_kernel_names(lambda: torch.autograd.grad(loss, (s,), go))
    assert len(fwd) == 2 and "_ofa_partial_kernel" in fwd[0] and "_ofa_merge_kernel" in fwd[1], fwd
    assert len(bwd) == 1 and "_ofa_bwd_kernel" in bwd[0], bwd
    big = [logits(4096, 1000, seed=130 + i) for i in range(2)]
    yb = target(4096, 1000, seed=132)
    first = ofa.ofa_loss(*big, yb)
    assert all(torch.equal(ofa.ofa_loss(*big, yb), first) for _ in range(3))
