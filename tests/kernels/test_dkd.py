"""The fused Triton DKD kernels (patfast.kernels.dkd) and ops.dkd_loss's Triton backend.

On a machine without a GPU these run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
the compile-only test builds the same kernels for sm_80 / sm_90 and reads the PTX; tests marked ``gpu`` run only on
a CUDA machine (torch.compile, CUDA graphs, launch count, bitwise determinism at a large batch).

Truth: patfast.kernels.reference.dkd_loss_ref evaluated in float64 on the same (rounded) input values.
K = 1 is refused (ValueError): there is no non-target class, TCKD's log(1 - p_y) is log 0 and the reference NaN.
The helpers are logit_cases.py's, shared with test_kd.py, test_dist.py and test_ofa.py.
"""

import pytest
import torch

from patfast import ops
from patfast.kernels import dkd, kd, reference
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
    cuda_graph_replay,
    cuda_kernel_names,
    grad_run,
    logits,
    target,
    transposed_slice,
)

SMALL_BATCHES = (1, 3, 8)
CLASSES = (2, 41, 100, 1000, 1537)  # 2: one non-target class; 1537 > MAX_BLOCK_K: the forward loops over chunks
TEMPERATURES = (1.0, 4.0)
LARGE = [(256, 100, 1.0), (256, 100, 4.0), (256, 1000, 4.0), (64, 1537, 1.0)]  # few: the interpreter is slow


def _ref64(s, t, y, alpha=1.0, beta=8.0, temperature=4.0):
    return reference.dkd_loss_ref(s.double(), t.double(), y, alpha, beta, temperature)


def _check_fp32(s, t, y, alpha=1.0, beta=8.0, temperature=4.0, fn=None):
    fn = fn or (lambda a, b: dkd.dkd_loss(a, b, y, alpha, beta, temperature))
    (loss,), (gs, gt) = grad_run(fn, (s, t), [GRAD_OUT])
    (ref,), (rs, rt) = grad_run(lambda a, b: _ref64(a, b, y, alpha, beta, temperature), (s.double(), t.double()),
                                [GRAD_OUT])
    assert loss.shape == ()
    assert_close_rel(loss, ref, FP32_RTOL, "loss")
    assert_close_rel(gs, rs, FP32_RTOL, "grad logits_s")
    assert_close_rel(gt, rt, FP32_RTOL, "grad logits_t")


# ----------------------------------------------------------------------------------------------------------------
# fp32 values and gradients against float64
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("k", CLASSES)
@pytest.mark.parametrize("b", SMALL_BATCHES)
def test_dkd_loss_fp32_matches_float64(b, k, temperature):
    s = logits(b, k, seed=b * 7 + k, scale=2.0)
    t = logits(b, k, seed=b * 7 + k + 1, scale=3.0)
    y = target(b, k, seed=b + k)
    _check_fp32(s, t, y, temperature=temperature,
                fn=lambda a, c: ops.dkd_loss(a, c, y, 1.0, 8.0, temperature, backend="triton"))


@pytest.mark.parametrize(("b", "k", "temperature"), LARGE)
def test_dkd_loss_fp32_matches_float64_large_batch(b, k, temperature):
    s, t = logits(b, k, seed=k + 1, scale=2.0), logits(b, k, seed=k + 2, scale=3.0)
    _check_fp32(s, t, target(b, k, seed=k + 3), temperature=temperature)


def test_dkd_loss_weights_and_a_confident_target():
    # other weights; the targets the teacher is sure of (as with a trained teacher): p_y near 1, 1 - p_y small
    b, k = 6, 100
    y = target(b, k, seed=5)
    s, t = logits(b, k, seed=6), logits(b, k, seed=7)
    t[torch.arange(b), y] += 12.0
    s[torch.arange(b), y] += 6.0
    for alpha, beta, temperature in ((0.5, 2.0, 1.0), (2.0, 0.25, 4.0), (1.0, 0.0, 2.0), (0.0, 1.0, 3.0)):
        _check_fp32(s, t, y, alpha, beta, temperature)


def test_dkd_loss_output_dtype_and_grad_dtypes():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        s = logits(3, 41, seed=1, dtype=dtype).requires_grad_()
        t = logits(3, 41, seed=2, dtype=dtype).requires_grad_()
        loss = dkd.dkd_loss(s, t, target(3, 41, seed=3), 1.0, 8.0, 2.0)
        assert loss.dtype == torch.float32 and loss.shape == ()
        loss.backward()
        assert s.grad.dtype == dtype and t.grad.dtype == dtype
        assert s.grad.shape == s.shape and t.grad.shape == t.shape and s.grad.is_contiguous()


def test_only_the_inputs_that_require_grad_get_one():
    b, k = 3, 100
    y = target(b, k, seed=8)
    s, t = logits(b, k, seed=9), logits(b, k, seed=10)
    _, (rs, rt) = grad_run(lambda a, c: _ref64(a, c, y), (s, t), [1.0])
    sg = s.clone().requires_grad_()
    dkd.dkd_loss(sg, t, y).backward()  # the teacher as in training: no grad
    assert t.grad is None
    assert_close_rel(sg.grad, rs, FP32_RTOL, "grad logits_s")
    tg = t.clone().requires_grad_()
    dkd.dkd_loss(s, tg, y).backward()
    assert s.grad is None
    assert_close_rel(tg.grad, rt, FP32_RTOL, "grad logits_t")
    assert not dkd.dkd_loss(s, t, y).requires_grad


# ----------------------------------------------------------------------------------------------------------------
# 16-bit and mixed dtypes: at most 2x PyTorch's own error at the same dtype
# ----------------------------------------------------------------------------------------------------------------


def _check_dtypes(ds, dt, b, k, temperature, seed):
    y = target(b, k, seed=seed + 2)
    check_dtypes(lambda a, c: dkd.dkd_loss(a, c, y, 1.0, 8.0, temperature),
                 lambda a, c: reference.dkd_loss_ref(a, c, y, 1.0, 8.0, temperature), ds, dt, b, k, seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize(("b", "k"), [(3, 41), (8, 100), (64, 1000), (8, 1537)])
def test_dkd_loss_16bit_within_2x_pytorch_error(dtype, b, k, temperature):
    _check_dtypes(dtype, dtype, b, k, temperature, seed=b + 11 * k)


@pytest.mark.parametrize(("ds", "dt"), [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                        (torch.float32, torch.bfloat16)], ids=["bf16-fp32", "fp16-fp32", "fp32-bf16"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_dkd_loss_mixed_dtypes(ds, dt, temperature):
    # bf16 student logits against fp32 teacher logits (a step under bf16 autocast), read without a promotion copy
    _check_dtypes(ds, dt, 5, 100, temperature, seed=17)


# ----------------------------------------------------------------------------------------------------------------
# Targets, layouts and extremes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_soft_labels_give_the_argmax_result(backend):
    b, k = 7, 41
    s, t = logits(b, k, seed=12), logits(b, k, seed=13)
    soft = torch.softmax(logits(b, k, seed=14, scale=3.0), dim=1)  # e.g. mixup / label-smoothed targets
    hard = soft.argmax(dim=1)
    got = grad_run(lambda a, c: ops.dkd_loss(a, c, soft, 1.0, 8.0, 4.0, backend=backend), (s, t), [GRAD_OUT])
    want = grad_run(lambda a, c: ops.dkd_loss(a, c, hard, 1.0, 8.0, 4.0, backend=backend), (s, t), [GRAD_OUT])
    for a, w in zip([*got[0], *got[1]], [*want[0], *want[1]]):
        assert torch.equal(a, w)
    if backend == "triton":
        _check_fp32(s, t, hard, fn=lambda a, c: ops.dkd_loss(a, c, soft, backend="triton"))


@pytest.mark.parametrize(("make_s", "make_t"), [(column_slice, transposed_slice), (transposed_slice, column_slice)],
                         ids=["slice-s", "transposed-s"])
@pytest.mark.parametrize("k", [41, 1537])
def test_non_contiguous_inputs(make_s, make_t, k):
    b = 5
    s, t = make_s(b, k, seed=21), make_t(b, k, seed=22)
    y = target(2 * b, k, seed=23)[::2]  # a strided target too
    assert not s.is_contiguous() and not t.is_contiguous() and not y.is_contiguous()
    _check_fp32(s, t, y, 0.5, 2.0, 4.0)


def test_broadcast_rows_and_uniform_logits():
    # An expanded (stride-0) teacher row and a stride-0 class axis (every class equal) are valid layouts too.
    b, k = 4, 100
    y = target(b, k, seed=24)
    s = logits(b, k, seed=25)
    t = logits(1, k, seed=26).expand(b, k)
    c = logits(b, 1, seed=27).expand(b, k)
    for x, z in ((s, t), (s, c), (c, t)):
        _check_fp32(x, z, y, temperature=2.0)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_extreme_logits_give_finite_exact_gradients(temperature):
    b, k = 4, 100
    y = torch.tensor([0, 1, 2, 3], device=DEV)
    s = logits(b, k, seed=31, scale=1.0)
    t = logits(b, k, seed=32, scale=1.0)
    s[0, 0] += 30.0  # the student sure of its target, the teacher sure of another class
    t[0, 7] += 30.0
    s[1, 5] -= 40.0
    t[2, 2] += 60.0  # the teacher certain: its non-target mass ~ e^-60 / T
    s[3] = s[3] + 500.0  # a large common offset changes nothing
    t[3] = -t[3] - 300.0
    (loss,), (gs, gt) = grad_run(lambda a, c: dkd.dkd_loss(a, c, y, 1.0, 8.0, temperature), (s, t), [GRAD_OUT])
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    _check_fp32(s, t, y, temperature=temperature)


def test_nckd_where_the_target_logit_leads_by_the_mask_value():
    # The masked target keeps a share of NCKD's softmaxes only when its logit leads by ~DKD_MASK at T: the branch
    # f < 1, q'_y > 0 of the kernel. TCKD's 1 - p_y then underflows in float64 too (the reference's log gives -inf),
    # so NCKD alone (alpha = 0) against its own float64 formula: the reference's NCKD line.
    b, k, temperature = 4, 41, 1.0
    s, t = logits(b, k, seed=35, scale=1.0), logits(b, k, seed=36, scale=1.0)
    y = torch.tensor([0, 3, 7, 40], device=DEV)
    s[torch.arange(b), y] += torch.tensor([1004.0, 1001.0, 998.0, 0.0], device=DEV)
    t[torch.arange(b), y] += torch.tensor([1002.0, 1006.0, 990.0, 2.0], device=DEV)

    def nckd64(a, c):
        mask = reference.DKD_MASK * torch.nn.functional.one_hot(y, k).double()
        return torch.nn.functional.kl_div(torch.log_softmax(a / temperature - mask, -1),
                                          torch.log_softmax(c / temperature - mask, -1), reduction="batchmean",
                                          log_target=True) * temperature**2

    (loss,), (gs, gt) = grad_run(lambda a, c: dkd.dkd_loss(a, c, y, 0.0, 1.0, temperature), (s, t), [GRAD_OUT])
    (ref,), (rs, rt) = grad_run(nckd64, (s.double(), t.double()), [GRAD_OUT])
    rtol = 1e-4  # fp32 differences of logits near 1000 carry ulp(1000) = 6e-5 absolute: not the kernel's doing
    assert_close_rel(loss, ref, rtol, "loss")
    assert_close_rel(gs, rs, rtol, "grad logits_s")
    assert_close_rel(gt, rt, rtol, "grad logits_t")


def test_out_of_range_target_on_the_gpu_path_is_nan_not_a_wild_read():
    # On a GPU the range is not checked on the host (no sync): the kernel makes the loss NaN. Here the launcher is
    # called directly (the public function checks CPU tensors first).
    b, k = 3, 41
    s, t = logits(b, k, seed=33), logits(b, k, seed=34)
    for bad in (k, -1):
        y = torch.tensor([0, bad, 5], device=DEV)
        loss, stats = dkd._forward(s, t, y, 1.0, 8.0, 4.0)
        assert torch.isnan(loss)
        ds, dt = dkd._backward(s, t, y, stats, torch.ones((), device=DEV), 4.0, True, True)
        assert torch.isnan(ds[1]).all() and torch.isnan(dt[1]).all()
        assert torch.isfinite(ds[[0, 2]]).all() and torch.isfinite(dt[[0, 2]]).all()


def test_forward_is_deterministic():
    s, t, y = logits(64, 1537, seed=41), logits(64, 1537, seed=42), target(64, 1537, seed=43)
    first = dkd.dkd_loss(s, t, y)
    assert torch.equal(first, dkd.dkd_loss(s, t, y))


# ----------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------


def _bad_calls():
    x = torch.randn(3, 41)
    y = torch.tensor([0, 5, 40])
    meta = torch.empty(3, 41, device="meta")
    return [
        ("shape", lambda: dkd.dkd_loss(x, torch.randn(3, 40), y), r"same shape.*\(3, 41\).*\(3, 40\)"),
        ("dtype-f64", lambda: dkd.dkd_loss(x.double(), x.double(), y), r"float64.*float32, float16 or bfloat16"),
        ("rank1", lambda: dkd.dkd_loss(x[0], x[0], y), r"2-D \(B, num_classes\).*\(41,\)"),
        ("empty", lambda: dkd.dkd_loss(x[:0], x[:0], y[:0]), r"empty.*\(0, 41\)"),
        ("devices", lambda: dkd.dkd_loss(x, meta, y), r"same device.*cpu.*meta"),
        ("one-class", lambda: dkd.dkd_loss(x[:, :1], x[:, :1], y * 0), r"at least 2 classes.*\(3, 1\)"),
        ("ops-one-class", lambda: ops.dkd_loss(x[:, :1], x[:, :1], y * 0, backend="reference"), r"at least 2 classes"),
        ("target-int32", lambda: dkd.dkd_loss(x, x, y.int()), r"int64.*torch.int32"),
        ("target-float", lambda: dkd.dkd_loss(x, x, y.float()), r"int64.*torch.float32"),
        ("target-rows", lambda: dkd.dkd_loss(x, x, y[:2]), r"one class index per row \(3\).*\(2,\)"),
        ("target-too-big", lambda: dkd.dkd_loss(x, x, torch.tensor([0, 41, 3])), r"in \[0, 41\).*\[0, 41\]"),
        ("target-negative", lambda: ops.dkd_loss(x, x, torch.tensor([-1, 0, 3])), r"in \[0, 41\).*\[-1, 3\]"),
        ("target-device", lambda: dkd.dkd_loss(x, x, y.to("meta")), r"target must be on the logits' device"),
        ("target-list", lambda: dkd.dkd_loss(x, x, [0, 1, 2]), r"target must be a torch.Tensor"),
        ("soft-to-kernel", lambda: dkd.dkd_loss(x, x, torch.rand(3, 41)), r"\(B,\) class indices.*patfast.ops"),
        ("soft-shape", lambda: ops.dkd_loss(x, x, torch.rand(3, 40)), r"soft labels.*\(3, 41\).*\(3, 40\)"),
        ("soft-int", lambda: ops.dkd_loss(x, x, torch.ones(3, 41, dtype=torch.long)), r"floating point"),
        ("target-rank3", lambda: ops.dkd_loss(x, x, torch.rand(3, 41, 1)), r"\(B,\) class indices or \(B, K\)"),
        ("temperature-0", lambda: dkd.dkd_loss(x, x, y, 1.0, 8.0, 0.0), r"temperature must be positive"),
        ("temperature-tensor", lambda: dkd.dkd_loss(x, x, y, 1.0, 8.0, torch.tensor(2.0)), r"Python number"),
        ("alpha-nan", lambda: dkd.dkd_loss(x, x, y, float("nan")), r"alpha must be finite"),
        ("beta-tensor", lambda: dkd.dkd_loss(x, x, y, 1.0, torch.tensor(8.0)), r"beta must be a Python number"),
        ("ops-backend", lambda: ops.dkd_loss(x, x, y, backend="fast"), r"unknown backend 'fast'"),
        ("ops-dtype", lambda: ops.dkd_loss(x, x.double(), y, backend="triton"), r"logits_t.*float64"),
    ]


@pytest.mark.parametrize(("call", "match"), [c[1:] for c in _bad_calls()], ids=[c[0] for c in _bad_calls()])
def test_input_errors_are_clear_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_registered_in_ops():
    assert "dkd_loss" in ops.triton_ops()
    s, t, y = logits(3, 41, seed=81), logits(3, 41, seed=82), target(3, 41, seed=83)
    torch.testing.assert_close(ops.dkd_loss(s, t, y, 1.0, 8.0, 2.0, backend="triton"),
                               dkd.dkd_loss(s, t, y, 1.0, 8.0, 2.0), rtol=0, atol=0)
    want = ops.dkd_loss(s.double(), t.double(), y, 1.0, 8.0, 2.0, backend="auto")  # float64: the reference
    assert_close_rel(ops.dkd_loss(s, t, y, 1.0, 8.0, 2.0, backend="triton"), want, FP32_RTOL, "triton vs reference")
    if not CUDA:  # "auto" on CPU tensors is the reference
        assert ops._select("dkd_loss", "auto", s.device, s.dtype, t.dtype) is reference.dkd_loss_ref


# ----------------------------------------------------------------------------------------------------------------
# Compile-only: PTX/cubin for sm_80 and sm_90 without a GPU
# ----------------------------------------------------------------------------------------------------------------


def _forward_builds(name, b, k, dtypes, arch, align, unit_class_stride=True):
    """The forward's two launches: kd.py's per-chunk kernel over the non-target classes, then DKD's merge."""
    flags = {"PAIR": False, "T_IS_ONE": False, "EXCLUDE_TARGET": True, "ALIGN": align}
    dtypes = {**dtypes, "p": dtypes["s"]}  # the partial kernel's p_ptr: the student's dtype
    return [(f"{name} partial", build(kd._kl_partial_kernel, kd._partial_config(b, k), dtypes, arch, flags,
                                      unit_class_stride)),
            (f"{name} merge", build(dkd._dkd_merge_kernel, kd._merge_config(b, k), dtypes, arch, {},
                                    unit_class_stride))]


def _compile_only_builds():
    bwd = dkd._dkd_bwd_kernel
    grads = {"GRAD_S": True, "GRAD_T": True}
    fp32 = dict.fromkeys("st", torch.float32)
    mixed = {"s": torch.bfloat16, "t": torch.float32}
    builds = []
    for arch in (90, 80):
        builds += _forward_builds("fwd fp32 K=1000", 256, 1000, fp32, arch, 4)
        builds += [("bwd fp32 K=1000", build(bwd, kd._bwd_config(128, 1000), fp32, arch, {"ALIGN": 4, **grads}))]
        # bf16 student logits against fp32 teacher logits (under bf16 autocast), ALIGN 4 for the fp32 rows
        builds += _forward_builds("fwd bf16-fp32 K=100 mixed", 128, 100, mixed, arch, 4)
        builds += [("bwd bf16-fp32 K=100 mixed", build(bwd, kd._bwd_config(128, 100), mixed, arch,
                                                       {"ALIGN": 4, "GRAD_S": True, "GRAD_T": False}))]
    fp16 = dict.fromkeys("st", torch.float16)
    builds += _forward_builds("fwd fp16 K=1537 strided", 256, 1537, fp16, 90, 1, unit_class_stride=False)
    builds += [("bwd fp16 K=1537 strided", build(bwd, kd._bwd_config(256, 1537), fp16, 90, {"ALIGN": 1, **grads},
                                                 unit_class_stride=False))]
    return builds


@pytest.mark.slow
def test_compile_only_sm80_sm90_ptx_with_vectorised_loads():
    pytest.importorskip("triton.backends.nvidia")

    for name, spec, asm in compile_builds(_compile_only_builds()):
        streaming = not name.endswith(" merge")  # the merge reads O(B x chunks) statistics and the target logits
        # contiguous fp32 rows, K = 1000 = 4 * 250: 16-byte row loads; bf16 logits widened in registers, their
        # gradient rounded to nearest
        check_ptx(name, spec, asm, v4_loads="fp32 K=1000" in name and streaming, v4_stores=name.startswith("bwd fp32"),
                  no_atomics=name.startswith("fwd"), widened="bf16" if "mixed" in name and streaming else None)


# ----------------------------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(("b", "k"), [(512, 1000), (300, 1537)])
def test_gpu_large_batches_match_float64(b, k):
    s, t, y = logits(b, k, seed=140), logits(b, k, seed=141, scale=3.0), target(b, k, seed=142)
    _check_fp32(s, t, y)
    _check_dtypes(torch.bfloat16, torch.float32, b, k, 1.0, seed=143)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32])  # one compile: the GPU test step's budget is shared
def test_gpu_torch_compile_fullgraph_kernels(dtype):
    y = target(64, 1000, seed=92)
    check_compiled(lambda s, t: 2.0 * dkd.dkd_loss(s, t, y, 1.0, 8.0, 4.0) + dkd.dkd_loss(s, t, y, 0.5, 1.0, 1.0),
                   dtype)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph_ops_dispatch():
    # backend="auto" on CUDA tensors resolves to the Triton kernel inside the compiled graph; soft labels too
    y = target(64, 1000, seed=93)
    soft = torch.nn.functional.one_hot(y, 1000).float() * 0.9 + 0.1 / 1000
    check_compiled(lambda s, t: ops.dkd_loss(s, t, y) + ops.dkd_loss(s, t, soft, 2.0, 4.0, 1.0), torch.float32)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_forward_backward():
    b, k = 128, 1000
    s = logits(b, k, seed=101).requires_grad_()
    t = logits(b, k, seed=102)
    y = target(b, k, seed=103)
    ones = torch.ones((), device=DEV)

    def step():
        loss = dkd.dkd_loss(s, t, y, 1.0, 8.0, 4.0)
        return (loss, *torch.autograd.grad(loss, (s,), 2.0 * ones))

    new = [logits(b, k, seed=110 + i) for i in range(2)]
    new_y = target(b, k, seed=112)
    static = cuda_graph_replay(step, (s, t, y), (*new, new_y))
    (want,), (want_s, _) = grad_run(lambda a, c: _ref64(a, c, new_y), [n.double() for n in new], [2.0])
    for a, r in zip(static, (want, want_s)):
        assert_close_rel(a, r, FP32_RTOL, "CUDA graph replay")


@pytest.mark.gpu
def test_gpu_two_launches_forward_one_launch_backward():
    s, t = (logits(128, 1000, seed=120 + i, dtype=torch.bfloat16) for i in range(2))
    y = target(128, 1000, seed=122)
    s.requires_grad_()
    t.requires_grad_()
    go = torch.ones((), device=DEV)
    for _ in range(2):  # compile the kernels first
        torch.autograd.grad(dkd.dkd_loss(s, t, y), (s, t), go)
    torch.cuda.synchronize()
    loss, fwd = cuda_kernel_names(lambda: dkd.dkd_loss(s, t, y))
    _, bwd = cuda_kernel_names(lambda: torch.autograd.grad(loss, (s, t), go))
    assert len(fwd) == 2 and "_kl_partial_kernel" in fwd[0] and "_dkd_merge_kernel" in fwd[1], fwd
    assert len(bwd) == 1 and "_dkd_bwd_kernel" in bwd[0], bwd


@pytest.mark.gpu
def test_gpu_forward_is_bitwise_deterministic():
    s, t, y = logits(4096, 1000, seed=130), logits(4096, 1000, seed=131), target(4096, 1000, seed=132)
    first = dkd.dkd_loss(s, t, y)
    for _ in range(3):
        assert torch.equal(dkd.dkd_loss(s, t, y), first)
