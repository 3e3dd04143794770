"""The fused Triton KL kernels (patfast.kernels.kd): kd_loss and PAT's pat_kl_pair.

On a machine without a GPU these run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
the compile-only test builds the same kernels for sm_80 / sm_90 and reads the PTX; tests marked ``gpu`` run only on
a CUDA machine (bf16 numerics, torch.compile, CUDA graphs, launch count).

Truth: patfast.kernels.reference.kd_loss_ref evaluated in float64 on the same (rounded) input values.
The helpers are logit_cases.py's, shared with test_dkd.py, test_dist.py and test_ofa.py.
"""

import pytest
import torch

from patfast import ops
from patfast.kernels import kd, perf_model, reference
from tests.kernels.logit_cases import (
    DEV,
    FP32_RTOL,
    assert_close_rel,
    build,
    check_compiled,
    check_ptx,
    column_slice,
    compile_builds,
    cuda_graph_replay,
    cuda_kernel_names,
    grad_run,
    logits,
    transposed_slice,
)

BATCHES = (1, 3, 8, 256)
CLASSES = (41, 100, 1000, 1537)  # 1537 > MAX_BLOCK_K: the forward loops over class chunks
TEMPERATURES = (1.0, 4.0)
GRAD_OUT = 2.5  # upstream gradient != 1 (the loss is "not the last layer"); logit_cases.GRAD_OUT is 0.375
HALF_FLOOR = 1e-7  # absolute floor for the 16-bit comparisons (about two fp16 subnormal steps)


def _kd_ref64(s, t, temperature):
    return reference.kd_loss_ref(s.double(), t.double(), temperature)


def _pair_ref64(s, p, t, temperature):
    return _kd_ref64(s, t, temperature), _kd_ref64(p, t, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# fp32 values and gradients against float64
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("k", CLASSES)
@pytest.mark.parametrize("b", BATCHES)
def test_kd_loss_fp32_matches_float64(b, k, temperature):
    s = logits(b, k, seed=b * 7 + k, scale=2.0)
    t = logits(b, k, seed=b * 7 + k + 1, scale=3.0)
    (loss,), (gs, gt) = grad_run(lambda x, y: ops.kd_loss(x, y, temperature, backend="triton"), (s, t), [GRAD_OUT])
    (ref,), (rs, rt) = grad_run(lambda x, y: _kd_ref64(x, y, temperature), (s.double(), t.double()), [GRAD_OUT])
    assert loss.shape == ()
    assert_close_rel(loss, ref, FP32_RTOL, "loss")
    assert_close_rel(gs, rs, FP32_RTOL, "grad logits_s")
    assert_close_rel(gt, rt, FP32_RTOL, "grad logits_t")


def test_kd_loss_output_dtype_and_grad_dtypes():
    for dtype in (torch.float32, torch.float16):
        s = logits(3, 41, seed=1, dtype=dtype).requires_grad_()
        t = logits(3, 41, seed=2, dtype=dtype).requires_grad_()
        loss = kd.kd_loss(s, t, 2.0)
        assert loss.dtype == torch.float32 and loss.shape == ()
        loss.backward()
        assert s.grad.dtype == dtype and t.grad.dtype == dtype
        assert s.grad.shape == s.shape and t.grad.shape == t.shape


def test_only_the_inputs_that_require_grad_get_one():
    s = logits(3, 100, seed=3).requires_grad_()
    t = logits(3, 100, seed=4)
    kd.kd_loss(s, t, 4.0).backward()
    assert t.grad is None
    (_,), (rs, _) = grad_run(lambda x, y: _kd_ref64(x, y, 4.0), (s.detach(), t), [1.0])
    assert_close_rel(s.grad, rs, FP32_RTOL, "grad logits_s")


# ----------------------------------------------------------------------------------------------------------------
# 16-bit: at most 2x PyTorch's own error at the same dtype
# ----------------------------------------------------------------------------------------------------------------


def _check_half(dtype, b, k, temperature):
    s = logits(b, k, seed=b + 11 * k, dtype=dtype, scale=2.0)
    t = logits(b, k, seed=b + 11 * k + 1, dtype=dtype, scale=3.0)
    ours = grad_run(lambda x, y: kd.kd_loss(x, y, temperature), (s, t), [GRAD_OUT])
    torch_half = grad_run(lambda x, y: reference.kd_loss_ref(x, y, temperature), (s, t), [GRAD_OUT])
    truth = grad_run(lambda x, y: _kd_ref64(x, y, temperature), (s.double(), t.double()), [GRAD_OUT])
    for what, a, h, r in zip(("loss", "grad logits_s", "grad logits_t"),
                             [*ours[0], *ours[1]], [*torch_half[0], *torch_half[1]], [*truth[0], *truth[1]]):
        err = (a.cpu() - r.cpu()).abs().max().item()
        torch_err = (h.cpu() - r.cpu()).abs().max().item()
        assert err <= 2 * torch_err + HALF_FLOOR, f"{dtype} {what}: error {err:.3g} > 2 x PyTorch's {torch_err:.3g}"


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize(("b", "k"), [(3, 41), (8, 100), (256, 1000), (8, 1537)])
def test_kd_loss_fp16_within_2x_pytorch_error(b, k, temperature):
    _check_half(torch.float16, b, k, temperature)


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize(("b", "k"), [(3, 41), (8, 100), (256, 1000), (8, 1537)])
def test_kd_loss_bf16_within_2x_pytorch_error(b, k, temperature):
    _check_half(torch.bfloat16, b, k, temperature)


# ----------------------------------------------------------------------------------------------------------------
# Layouts and extremes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("make_s", "make_t"), [(column_slice, transposed_slice), (transposed_slice, column_slice)],
                         ids=["slice-s", "transposed-s"])
@pytest.mark.parametrize("k", [41, 1537])
def test_non_contiguous_inputs(make_s, make_t, k):
    b, temperature = 5, 4.0
    s, t = make_s(b, k, seed=21), make_t(b, k, seed=22)
    assert not s.is_contiguous() and not t.is_contiguous()
    (loss,), (gs, gt) = grad_run(lambda x, y: kd.kd_loss(x, y, temperature), (s, t), [GRAD_OUT])
    (ref,), (rs, rt) = grad_run(lambda x, y: _kd_ref64(x, y, temperature), (s.double(), t.double()), [GRAD_OUT])
    assert_close_rel(loss, ref, FP32_RTOL, "loss")
    assert_close_rel(gs, rs, FP32_RTOL, "grad logits_s")
    assert_close_rel(gt, rt, FP32_RTOL, "grad logits_t")


def test_broadcast_teacher_rows_zero_strides():
    # An expanded (stride-0) teacher row and a stride-0 class axis are valid layouts too.
    b, k = 4, 100
    s = logits(b, k, seed=23)
    t = logits(1, k, seed=24).expand(b, k)
    c = logits(b, 1, seed=25).expand(b, k)  # every class equal: a uniform distribution
    for x, y in ((s, t), (s, c), (c, t)):
        (loss,), (gs, gt) = grad_run(lambda u, v: kd.kd_loss(u, v, 2.0), (x, y), [GRAD_OUT])
        (ref,), (rs, rt) = grad_run(lambda u, v: _kd_ref64(u, v, 2.0), (x.double(), y.double()), [GRAD_OUT])
        assert_close_rel(loss, ref, FP32_RTOL, "loss")
        assert_close_rel(gs, rs, FP32_RTOL, "grad logits_s")
        assert_close_rel(gt, rt, FP32_RTOL, "grad logits_t")


def test_layout_alignment_choice():
    # ALIGN: the largest power of two <= 16 bytes / element dividing K and every row stride, with unit class stride.
    def align(*xs):
        return kd._layout(xs)[0]

    assert align(torch.empty(4, 1000), torch.empty(4, 1000)) == 4
    assert align(torch.empty(4, 1000, dtype=torch.float16), torch.empty(4, 1000, dtype=torch.float16)) == 8
    assert align(torch.empty(4, 100, dtype=torch.bfloat16), torch.empty(4, 100, dtype=torch.bfloat16)) == 4
    assert align(torch.empty(4, 41), torch.empty(4, 41)) == 1
    assert align(torch.empty(4, 1000), torch.empty(4, 1007)[:, :1000]) == 1  # row stride 1007
    assert align(torch.empty(4, 1000), torch.empty(1000, 4).t()) == 1  # class stride 4
    assert kd._layout((torch.empty(1, 1000)[:, :100], torch.empty(1, 100)))[0] == 4  # B = 1: row stride unused


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extreme_logits_give_finite_exact_gradients(dtype, temperature):
    b, k = 4, 100
    s = logits(b, k, seed=31, scale=1.0)
    t = logits(b, k, seed=32, scale=1.0)
    s[:, 0] += 200.0  # the student is certain of class 0 ...
    t[:, 1] += 200.0  # ... the teacher of class 1: a gap of 200
    s[1, 5] -= 200.0
    t[2] = -t[2] - 100.0  # a large common offset changes nothing
    s, t = s.to(dtype), t.to(dtype)
    (loss,), (gs, gt) = grad_run(lambda x, y: kd.kd_loss(x, y, temperature), (s, t), [GRAD_OUT])
    (ref,), (rs, rt) = grad_run(lambda x, y: _kd_ref64(x, y, temperature), (s.double(), t.double()), [GRAD_OUT])
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    rtol = FP32_RTOL if dtype == torch.float32 else 2e-3
    assert_close_rel(loss, ref, rtol, "loss")
    assert_close_rel(gs, rs, rtol, "grad logits_s")
    assert_close_rel(gt, rt, rtol, "grad logits_t")


def test_forward_is_deterministic():
    s, t = logits(256, 1000, seed=41), logits(256, 1000, seed=42)
    first = kd.kd_loss(s, t, 4.0)
    assert torch.equal(first, kd.kd_loss(s, t, 4.0))


# ----------------------------------------------------------------------------------------------------------------
# The fused PAT pair
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize(("b", "k"), [(3, 41), (8, 1000), (5, 1537)])
def test_pat_kl_pair_equals_two_reference_calls(b, k, temperature):
    s = logits(b, k, seed=51, scale=2.0)
    p = logits(b, k, seed=52, scale=2.5)
    t = logits(b, k, seed=53, scale=3.0)
    grads = [GRAD_OUT, 0.75]  # different upstream gradients for loss_kd and loss_reg
    losses, got = grad_run(lambda x, y, z: kd.pat_kl_pair(x, y, z, temperature), (s, p, t), grads)
    ref_losses, want = grad_run(lambda x, y, z: _pair_ref64(x, y, z, temperature),
                                (s.double(), p.double(), t.double()), grads)
    for what, a, r in zip(("loss_kd", "loss_reg", "grad s", "grad pt", "grad t"), [*losses, *got],
                          [*ref_losses, *want]):
        assert_close_rel(a, r, FP32_RTOL, what)


def test_pat_kl_pair_mixed_layouts_and_fp16():
    b, k, temperature = 6, 100, 2.0
    s, p, t = column_slice(b, k, seed=61), transposed_slice(b, k, seed=62), logits(b, k, seed=63)
    losses, got = grad_run(lambda x, y, z: kd.pat_kl_pair(x, y, z, temperature), (s, p, t), [1.5, 2.0])
    ref_losses, want = grad_run(lambda x, y, z: _pair_ref64(x, y, z, temperature),
                                (s.double(), p.double(), t.double()), [1.5, 2.0])
    for a, r in zip([*losses, *got], [*ref_losses, *want]):
        assert_close_rel(a, r, FP32_RTOL, "pair, mixed layouts")
    h = [x.half() for x in (s, p, t)]
    losses, got = grad_run(lambda x, y, z: kd.pat_kl_pair(x, y, z, temperature), h, [1.5, 2.0])
    ref_losses, want = grad_run(lambda x, y, z: _pair_ref64(x, y, z, temperature), [x.double() for x in h],
                                [1.5, 2.0])
    for a, r in zip([*losses, *got], [*ref_losses, *want]):
        assert_close_rel(a, r, 2e-3, "pair, fp16")


def test_pat_kl_pair_as_used_in_pat():
    # The clean teacher is a no-grad tensor; only the student and the prompted teacher get gradients.
    b, k = 4, 100
    s = logits(b, k, seed=71).requires_grad_()
    p = logits(b, k, seed=72).requires_grad_()
    t = logits(b, k, seed=73)
    loss_kd, loss_reg = kd.pat_kl_pair(s, p, t, 1.0)
    (loss_kd + 3.0 * loss_reg).backward()
    assert t.grad is None
    _, (rs, rp, _) = grad_run(lambda x, y, z: _pair_ref64(x, y, z, 1.0), (s.detach(), p.detach(), t), [1.0, 3.0])
    assert_close_rel(s.grad, rs, FP32_RTOL, "grad s")
    assert_close_rel(p.grad, rp, FP32_RTOL, "grad pt")
    # loss_kd alone: the unused loss_reg gets a zero upstream gradient, so pt's gradient is zero
    s.grad = p.grad = None
    loss_kd, _ = kd.pat_kl_pair(s, p, t, 1.0)
    loss_kd.backward()
    assert torch.count_nonzero(p.grad) == 0
    assert_close_rel(s.grad, rs, FP32_RTOL, "grad s (loss_kd only)")


# ----------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------


def _bad_calls():
    x = torch.randn(3, 41)
    meta = torch.empty(3, 41, device="meta")
    return [
        ("shape", lambda: kd.kd_loss(x, torch.randn(3, 40)), r"same shape.*\(3, 41\).*\(3, 40\)"),
        ("pair-shape", lambda: kd.pat_kl_pair(x, torch.randn(4, 41), x), r"logits_pt \(4, 41\)"),
        ("dtype-mixed-f64", lambda: kd.kd_loss(x, x.double()), r"logits_t has dtype torch.float64"),
        ("dtype-f64", lambda: kd.kd_loss(x.double(), x.double()), r"float64.*float32, float16 or bfloat16"),
        ("dtype-int", lambda: kd.kd_loss(x.long(), x.long()), r"int64"),
        ("rank1", lambda: kd.kd_loss(x[0], x[0]), r"2-D \(B, num_classes\).*\(41,\)"),
        ("rank3", lambda: kd.kd_loss(x[None], x[None]), r"2-D.*\(1, 3, 41\)"),
        ("empty-rows", lambda: kd.kd_loss(x[:0], x[:0]), r"empty.*\(0, 41\)"),
        ("empty-classes", lambda: kd.kd_loss(x[:, :0], x[:, :0]), r"empty.*\(3, 0\)"),
        ("devices", lambda: kd.kd_loss(x, meta), r"same device.*cpu.*meta"),
        ("pair-devices", lambda: kd.pat_kl_pair(x, x, meta), r"same device.*logits_t on meta"),
        ("temperature-0", lambda: kd.kd_loss(x, x, 0.0), r"temperature must be positive.*0.0"),
        ("temperature-neg", lambda: kd.pat_kl_pair(x, x, x, -1.0), r"temperature must be positive"),
        ("temperature-nan", lambda: kd.kd_loss(x, x, float("nan")), r"temperature must be positive"),
        ("temperature-inf", lambda: kd.kd_loss(x, x, float("inf")), r"temperature must be positive and finite"),
        ("temperature-tensor", lambda: kd.kd_loss(x, x, torch.tensor(2.0)), r"Python number.*Tensor"),
        ("not-a-tensor", lambda: kd.kd_loss(x, x.tolist()), r"logits_t must be a torch.Tensor"),
        ("ops-temperature", lambda: ops.kd_loss(x, x, -2.0, backend="triton"), r"temperature"),
        ("ops-dtype", lambda: ops.kd_loss_pair(x, x.half(), x.double(), backend="triton"), r"logits_t.*float64"),
    ]


@pytest.mark.parametrize(("call", "match"), [c[1:] for c in _bad_calls()], ids=[c[0] for c in _bad_calls()])
def test_input_errors_are_clear_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_registered_in_ops():
    assert "kd_loss" in ops.triton_ops()
    s, t = logits(3, 41, seed=81), logits(3, 41, seed=82)
    torch.testing.assert_close(ops.kd_loss(s, t, 2.0, backend="triton"), kd.kd_loss(s, t, 2.0), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# Compile-only: PTX/cubin for sm_80 and sm_90 without a GPU
# ----------------------------------------------------------------------------------------------------------------

def _forward_builds(name, b, k, dtype, arch, constexprs, unit_class_stride=True):
    """The forward's two launches at (B, K): "<name> partial" (per class chunk) and "<name> merge" (one program)."""
    merge_cx = {"PAIR": constexprs["PAIR"]}
    return [(f"{name} partial", build(kd._kl_partial_kernel, kd._partial_config(b, k), dtype, arch,
                                      {**constexprs, "EXCLUDE_TARGET": False}, unit_class_stride)),
            (f"{name} merge", build(kd._kl_merge_kernel, kd._merge_config(b, k), dtype, arch, merge_cx))]


def _compile_only_builds():
    builds = []
    for arch in (90, 80):
        bwd = kd._kl_bwd_kernel
        grads = {"GRAD_S": True, "GRAD_T": True, "GRAD_P": True}
        # ImageNet-1k, fp32, kd alone: the vectorisation check below reads these; B = 256 is the KD target's batch
        builds += _forward_builds("fwd kd fp32 K=1000", 256, 1000, torch.float32, arch,
                                  {"PAIR": False, "T_IS_ONE": False, "ALIGN": 4})
        builds += [("bwd kd fp32 K=1000", build(bwd, kd._bwd_config(128, 1000), torch.float32, arch,
                                                {"PAIR": False, "T_IS_ONE": False, "ALIGN": 4, **grads}))]
        if arch == 90:
            builds += _forward_builds("fwd pair bf16 K=100 T=1", 256, 100, torch.bfloat16, arch,
                                      {"PAIR": True, "T_IS_ONE": True, "ALIGN": 4})
            builds += [("bwd pair bf16 K=100 T=1", build(bwd, kd._bwd_config(128, 100), torch.bfloat16, arch,
                                                         {"PAIR": True, "T_IS_ONE": True, "ALIGN": 4, **grads}))]
            builds += _forward_builds("fwd pair fp16 K=1537 T=4 strided", 256, 1537, torch.float16, arch,
                                      {"PAIR": True, "T_IS_ONE": False, "ALIGN": 1}, unit_class_stride=False)
            builds += [("bwd pair fp16 K=1537 T=4 strided", build(bwd, kd._bwd_config(256, 1537), torch.float16,
                                                                  arch, {"PAIR": True, "T_IS_ONE": False,
                                                                         "ALIGN": 1, **grads},
                                                                  unit_class_stride=False))]
        # Mixed dtypes (issue #11): bf16 student and prompted-teacher logits against fp32 teacher logits (PAT under
        # bf16 autocast), ALIGN 4 for the fp32 rows; fp16 against fp32 for kd alone, T != 1
        mixed = {"s": torch.bfloat16, "p": torch.bfloat16, "t": torch.float32}
        builds += _forward_builds("fwd pair bf16-fp32 K=1000 T=1 mixed", 128, 1000, mixed, arch,
                                  {"PAIR": True, "T_IS_ONE": True, "ALIGN": 4})
        builds += [("bwd pair bf16-fp32 K=1000 T=1 mixed", build(bwd, kd._bwd_config(128, 1000), mixed, arch,
                                                                 {"PAIR": True, "T_IS_ONE": True, "ALIGN": 4,
                                                                  **grads}))]
        mixed = {"s": torch.float16, "p": torch.float16, "t": torch.float32}
        builds += _forward_builds("fwd kd fp16-fp32 K=100 T=4 mixed", 128, 100, mixed, arch,
                                  {"PAIR": False, "T_IS_ONE": False, "ALIGN": 4})
        builds += [("bwd kd fp16-fp32 K=100 T=4 mixed", build(bwd, kd._bwd_config(128, 100), mixed, arch,
                                                              {"PAIR": False, "T_IS_ONE": False, "ALIGN": 4,
                                                               **grads}))]
    return builds


@pytest.mark.slow
def test_compile_only_sm80_sm90_ptx_with_vectorised_loads():
    pytest.importorskip("triton.backends.nvidia")

    for name, spec, asm in compile_builds(_compile_only_builds()):
        streaming = not name.endswith(" merge")  # the merge reads O(B x chunks) statistics, not logits
        # contiguous fp32 rows, K = 1000 = 4 * 250: 16-byte row loads; 16-bit logits of the mixed builds widened in
        # registers, their gradients rounded to nearest
        usage = check_ptx(name, spec, asm, v4_loads="fp32 K=1000" in name and streaming,
                          v4_stores=name.startswith("bwd kd fp32"), no_atomics=name.startswith("fwd"),
                          widened=("bf16" if "bf16" in name else "f16") if "mixed" in name and streaming else None)
        if usage is not None and name.endswith(" partial"):  # issue 15: >= 4 programs per SM can be resident
            assert perf_model.resident_per_sm(usage[0]["REG"], spec["num_warps"]) >= 4, f"{name}: {usage}"


# ----------------------------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_torch_compile_fullgraph_kernels(dtype):
    check_compiled(lambda s, p, t: 2.0 * kd.kd_loss(s, t, 4.0) + kd.kd_loss(p, t, 1.0), dtype, n_inputs=3)
    check_compiled(lambda s, p, t: kd.pat_kl_pair(s, p, t, 4.0), dtype, n_inputs=3, grad_outs=(1.0, 0.5))


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph_ops_dispatch():
    # backend="auto" on CUDA tensors resolves to the Triton kernel inside the compiled graph
    check_compiled(lambda s, p, t: 2.0 * ops.kd_loss(s, t, 4.0) + ops.kd_loss(p, t, 1.0), torch.float32,
                   n_inputs=3)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_forward_backward():
    b, k = 128, 1000
    s = logits(b, k, seed=101).requires_grad_()
    p = logits(b, k, seed=102).requires_grad_()
    t = logits(b, k, seed=103)
    ones = torch.ones((), device=DEV)

    def step():
        loss_kd, loss_reg = kd.pat_kl_pair(s, p, t, 4.0)
        return (loss_kd, loss_reg, *torch.autograd.grad((loss_kd, loss_reg), (s, p), (2.0 * ones, ones)))

    new = [logits(b, k, seed=110 + i) for i in range(3)]
    static = cuda_graph_replay(step, (s, p, t), new)
    want_losses, want_grads = grad_run(lambda x, y, z: _pair_ref64(x, y, z, 4.0), [n.double() for n in new],
                                       [2.0, 1.0])
    for a, r in zip(static, [*want_losses, *want_grads[:2]]):
        assert_close_rel(a, r, FP32_RTOL, "CUDA graph replay")


@pytest.mark.gpu
def test_gpu_two_launches_forward_one_launch_backward():
    s, p, t = (logits(128, 1000, seed=120 + i, dtype=torch.bfloat16) for i in range(3))
    s.requires_grad_()
    p.requires_grad_()
    go = (torch.ones((), device=DEV), torch.ones((), device=DEV))
    for _ in range(2):  # compile the kernels first
        torch.autograd.grad(kd.pat_kl_pair(s, p, t, 4.0), (s, p), go)
    torch.cuda.synchronize()
    losses, fwd = cuda_kernel_names(lambda: kd.pat_kl_pair(s, p, t, 4.0))
    _, bwd = cuda_kernel_names(lambda: torch.autograd.grad(losses, (s, p), go))
    assert len(fwd) == 2 and "_kl_partial_kernel" in fwd[0] and "_kl_merge_kernel" in fwd[1], fwd
    assert len(bwd) == 1 and "_kl_bwd_kernel" in bwd[0], bwd


@pytest.mark.gpu
def test_gpu_forward_is_bitwise_deterministic():
    s, t = logits(4096, 1000, seed=130), logits(4096, 1000, seed=131)
    first = kd.kd_loss(s, t, 4.0)
    for _ in range(3):
        assert torch.equal(kd.kd_loss(s, t, 4.0), first)
