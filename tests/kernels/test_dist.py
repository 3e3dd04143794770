"""The fused Triton DIST kernels (patfast.kernels.dist) and ops.dist_loss's Triton backend.

On a machine without a GPU these run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
the compile-only test builds the same kernels (the six forward launches of dist.forward_plan and the backward) for
sm_80 / sm_90 and reads the PTX; tests marked ``gpu`` run only on a CUDA machine (torch.compile, CUDA graphs, the
launches listed, bitwise determinism at a large batch).

Truth: patfast.kernels.reference.dist_loss_ref evaluated in float64 on the same (rounded) input values. fp32: a
max-norm relative error of at most max(1e-5, 2x eager PyTorch's own fp32 error on the same inputs): the gradient of a
correlation is a difference that cancels where the correlation is near +-1 or its divisor is near the eps, which a
batch of 3 rows makes common for the class correlations; there PyTorch's fp32 error itself reaches ~1e-5 (at B = 2,
where two centred values are always parallel, ~1e-4). Everywhere else the 1e-5 bound is what holds.
K = 1 and B = 1 are allowed: a correlation of vectors with no variance is 0 (the eps in the divisor), so the term
is its weight times T^2 and has no gradient, as in the reference.
The helpers are logit_cases.py's, shared with test_kd.py, test_dkd.py and test_ofa.py.

Tiles: CPU tensors get the interpreter's launches (dist.forward_plan(..., fill=False): the largest tiles, the
fewest programs; the interpreter pays per program), CUDA tensors the GPU's (fill=True: tiles shrunk for >= 4 x 132
programs). The same kernels and rule either way; the GPU's tiles also run here, in the interpreter against float64
(dist._DISTLoss.apply(..., fill=True)): where the plan is checked against the launches, with strides, for
determinism, and with the merges' step sizes shrunk so that their multi-step loops run at small shapes. The shapes
are chosen for the paths they reach under the interpreter's tiles (several row tiles, class chunks and launch-1
chunks, ragged edges), not for size: the interpreter is slow.
"""

import math

import pytest
import torch

from patfast import ops
from patfast.kernels import dist, perf_model, reference
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
    rel_err,
    transposed_slice,
)

CLASSES = (2, 41, 100, 1000, 1537)  # 1537 > MAX_BLOCK_K: the backward's two passes
SMALL = [(b, k) for b in (1, 3, 8) for k in CLASSES if (b, k) != (1, 2)]  # (1, 2): no gradient, tested apart
TEMPERATURES = (1.0, 4.0)
# few: the interpreter is slow. Under its tiles (32 x 64 at these shapes) 8, 3 and 2 row tiles (40: a ragged one),
# 2, 16 and 25 class chunks; K = 1537: 2 chunks of launch 1 and the backward's two passes
LARGE = [(256, 100, 1.0), (256, 100, 4.0), (96, 1000, 4.0), (40, 1537, 1.0)]
WEIGHTS = (1.0, 2.0)  # beta, gamma: the two terms with different weights


def _ref64(s, t, beta=1.0, gamma=1.0, temperature=1.0):
    return reference.dist_loss_ref(s.double(), t.double(), beta, gamma, temperature)


def _check_fp32(s, t, beta=1.0, gamma=1.0, temperature=1.0, fn=None):
    """fp32 loss and gradients against float64: max(FP32_RTOL, 2x eager PyTorch's fp32 error) (module docstring)."""
    fn = fn or (lambda a, b: dist.dist_loss(a, b, beta, gamma, temperature))
    ours = grad_run(fn, (s, t), [GRAD_OUT])
    torch32 = grad_run(lambda a, b: reference.dist_loss_ref(a, b, beta, gamma, temperature), (s, t), [GRAD_OUT])
    truth = grad_run(lambda a, b: _ref64(a, b, beta, gamma, temperature), (s.double(), t.double()), [GRAD_OUT])
    assert ours[0][0].shape == ()
    for what, a, h, r in zip(("loss", "grad logits_s", "grad logits_t"), [*ours[0], *ours[1]],
                             [*torch32[0], *torch32[1]], [*truth[0], *truth[1]]):
        assert_close_rel(a, r, max(FP32_RTOL, 2 * rel_err(h, r)), what)


# ----------------------------------------------------------------------------------------------------------------
# fp32 values and gradients against float64
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize(("b", "k"), SMALL)
def test_dist_loss_fp32_matches_float64(b, k, temperature):
    s = logits(b, k, seed=b * 7 + k, scale=2.0)
    t = logits(b, k, seed=b * 7 + k + 1, scale=3.0)
    _check_fp32(s, t, *WEIGHTS, temperature,
                fn=lambda a, c: ops.dist_loss(a, c, *WEIGHTS, temperature, backend="triton"))


@pytest.mark.parametrize(("b", "k", "temperature"), LARGE)
def test_dist_loss_fp32_matches_float64_large_batch(b, k, temperature):
    s, t = logits(b, k, seed=k + 1, scale=2.0), logits(b, k, seed=k + 2, scale=3.0)
    plan = dist._plan(b, k, s.is_cuda)
    assert plan["n_row_tiles"] > 1 and plan["n_chunks"] > 1
    _check_fp32(s, t, *WEIGHTS, temperature)


@pytest.mark.parametrize("k", [41, 1537])
def test_one_row(k):
    # B = 1: every class correlation is 0 (a batch of one has no variance): the intra term is gamma T^2, no gradient
    s, t = logits(1, k, seed=3), logits(1, k, seed=4, scale=3.0)
    _check_fp32(s, t, 1.0, 2.0, 2.0)
    _check_fp32(s, t, 0.0, 2.0, 2.0)  # the intra term alone: a constant
    assert dist.dist_loss(s, t, 0.0, 2.0, 2.0).item() == pytest.approx(8.0, rel=1e-6)


@pytest.mark.parametrize(("b", "k"), [(1, 1), (5, 1), (1, 2)])
def test_degenerate_shapes_are_constant_without_gradient(b, k):
    # K = 1: both softmaxes are 1, every correlation 0: loss (beta + gamma) T^2, gradients exactly 0. (1, 2): the
    # class correlations are 0 and the one row's is +-1 (two centred classes are always parallel) but for the eps
    # in its divisor: a constant up to eps, whose gradient is eps-sized (~4e-6 here in float64) and is a
    # cancellation no fp32 code resolves (eager fp32 PyTorch is 12% off, the kernel 25%): only its size is checked.
    s, t = logits(b, k, seed=5), logits(b, k, seed=6, scale=3.0)
    (loss,), (gs, gt) = grad_run(lambda a, c: dist.dist_loss(a, c, 1.0, 2.0, 2.0), (s, t), [GRAD_OUT])
    (ref,), (rs, rt) = grad_run(lambda a, c: _ref64(a, c, 1.0, 2.0, 2.0), (s, t), [GRAD_OUT])
    assert_close_rel(loss, ref, FP32_RTOL, "loss")
    if k == 1:
        assert loss.item() == 12.0
        assert torch.count_nonzero(gs) == 0 and torch.count_nonzero(gt) == 0
    for g in (gs, gt, rs, rt):
        assert g.abs().max().item() <= 1e-5


def test_dist_loss_output_dtype_and_grad_dtypes():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        s = logits(3, 41, seed=1, dtype=dtype).requires_grad_()
        t = logits(3, 41, seed=2, dtype=dtype).requires_grad_()
        loss = dist.dist_loss(s, t, 1.0, 1.0, 2.0)
        assert loss.dtype == torch.float32 and loss.shape == ()
        loss.backward()
        assert s.grad.dtype == dtype and t.grad.dtype == dtype
        assert s.grad.shape == s.shape and t.grad.shape == t.shape and s.grad.is_contiguous()


@pytest.mark.parametrize("k", [100, 1537])
def test_only_the_inputs_that_require_grad_get_one(k):
    b = 3
    s, t = logits(b, k, seed=9), logits(b, k, seed=10)
    _, (rs, rt) = grad_run(lambda a, c: _ref64(a, c, 1.0, 2.0, 4.0), (s, t), [1.0])
    sg = s.clone().requires_grad_()
    dist.dist_loss(sg, t, 1.0, 2.0, 4.0).backward()  # the teacher as in training: no grad
    assert t.grad is None
    assert_close_rel(sg.grad, rs, FP32_RTOL, "grad logits_s")
    tg = t.clone().requires_grad_()
    dist.dist_loss(s, tg, 1.0, 2.0, 4.0).backward()
    assert s.grad is None
    assert_close_rel(tg.grad, rt, FP32_RTOL, "grad logits_t")
    assert not dist.dist_loss(s, t).requires_grad


# ----------------------------------------------------------------------------------------------------------------
# 16-bit and mixed dtypes: at most 2x PyTorch's own error at the same dtype
# ----------------------------------------------------------------------------------------------------------------


def _check_dtypes(ds, dt, b, k, temperature, seed):
    check_dtypes(lambda a, c: dist.dist_loss(a, c, *WEIGHTS, temperature),
                 lambda a, c: reference.dist_loss_ref(a, c, *WEIGHTS, temperature), ds, dt, b, k, seed)


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


@pytest.mark.parametrize(("make_s", "make_t"), [(column_slice, transposed_slice), (transposed_slice, column_slice)],
                         ids=["slice-s", "transposed-s"])
@pytest.mark.parametrize(("k", "fill"), [(41, None), (1537, None), (41, True)], ids=["41", "1537", "41-gpu-tiles"])
def test_non_contiguous_inputs(make_s, make_t, k, fill):
    b = 5
    s, t = make_s(b, k, seed=21), make_t(b, k, seed=22)
    assert not s.is_contiguous() and not t.is_contiguous()
    _check_fp32(s, t, 0.5, 2.0, 4.0, fn=lambda a, c: dist._DISTLoss.apply(a, c, 0.5, 2.0, 4.0, fill))


def test_broadcast_class_axis_and_expanded_rows():
    # A stride-0 class axis (every class equal: a uniform softmax, the row correlation's eps regime) and an
    # expanded (stride-0) row; the batch is 4 so that a class's batch mean of equal values is exact in both.
    b, k = 4, 100
    s = logits(b, k, seed=23)
    t = logits(b, k, seed=24, scale=3.0)
    c = logits(b, 1, seed=25).expand(b, k)
    _check_fp32(s, c, 1.0, 2.0, 2.0)
    _check_fp32(c, t, 1.0, 2.0, 2.0)
    e = logits(1, k, seed=26).expand(b, k)
    _check_fp32(s, e, 1.0, 0.0, 2.0)  # every teacher row the same: only the row term is well-posed


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_extreme_logits_give_finite_exact_gradients(temperature):
    b, k = 6, 100
    s = logits(b, k, seed=31, scale=1.0)
    t = logits(b, k, seed=32, scale=1.0)
    s[0, 0] += 30.0  # the student sure of one class, the teacher of another
    t[0, 7] += 30.0
    t[2, 2] += 60.0  # the teacher certain
    s[3] = s[3] + 500.0  # a large common offset changes nothing
    t[3] = -t[3] - 300.0
    (loss,), (gs, gt) = grad_run(lambda a, c: dist.dist_loss(a, c, 1.0, 2.0, temperature), (s, t), [GRAD_OUT])
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    _check_fp32(s, t, 1.0, 2.0, temperature)


@pytest.mark.parametrize(("b", "k", "fill"), [(5, 300, True), (34, 1100, None)], ids=["gpu-tiles", "by-device"])
def test_forward_and_backward_are_deterministic(b, k, fill):
    # several row tiles and class chunks in every launch: two calls give the same bits (fixed-order merges, no
    # atomics), in the loss, the statistics saved for the backward and the gradients
    s, t = logits(b, k, seed=41), logits(b, k, seed=42)
    plan = dist._plan(b, k, s.is_cuda if fill is None else fill)
    assert plan["n_row_tiles"] > 1 and plan["n_chunks"] > 1 and plan["n_part"] > 1
    first, second = (dist._forward(s, t, 1.0, 2.0, 4.0, fill) for _ in range(2))
    g = torch.tensor(GRAD_OUT, device=s.device)
    grads = [dist._backward(s, t, *out[1:], g, 4.0, True, True) for out in (first, second)]
    for x, y in zip([*first, *grads[0]], [*second, *grads[1]]):
        assert torch.equal(x, y)
    assert_close_rel(first[0], _ref64(s, t, 1.0, 2.0, 4.0), FP32_RTOL, "loss")


# ----------------------------------------------------------------------------------------------------------------
# The forward's launches (dist.forward_plan, for the performance model)
# ----------------------------------------------------------------------------------------------------------------


class _Recorder:
    """Stands in for a kernel: records (kernel, grid, keyword arguments) of each launch, then launches it."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.kernel, grid, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("fill", [None, True], ids=["by-device", "gpu-tiles"])
@pytest.mark.parametrize(("b", "k", "dtype"), [(5, 41, torch.float32), (4, 1537, torch.float32),
                                               (6, 100, torch.bfloat16)])
def test_forward_plan_is_what_the_forward_launches(monkeypatch, b, k, dtype, fill):
    # dist_loss launches forward_plan(fill=False) for CPU tensors, fill=True for CUDA ones; fill=True forces the
    # GPU's launches (here in the interpreter). Either way the result is judged against float64.
    plan = dist.forward_plan(b, k, dtype, fill=CUDA if fill is None else fill)
    log = []
    for name in {launch["kernel"].fn.__name__ for launch in plan}:
        monkeypatch.setattr(dist, name, _Recorder(getattr(dist, name), log))

    def loss(a, c):
        return dist.dist_loss(a, c, 1.0, 2.0, 4.0) if fill is None else dist._DISTLoss.apply(a, c, 1.0, 2.0, 4.0, fill)

    if dtype == torch.float32:
        _check_fp32(logits(b, k, seed=51), logits(b, k, seed=52, scale=3.0), 1.0, 2.0, 4.0, fn=loss)
    else:
        check_dtypes(loss, lambda a, c: reference.dist_loss_ref(a, c, 1.0, 2.0, 4.0), dtype, dtype, b, k, seed=51)
    assert [kernel for kernel, _, _ in log] == [launch["kernel"] for launch in plan]
    for (_, grid, kwargs), launch in zip(log, plan):
        assert math.prod(grid) == launch["programs"], launch["name"]
        assert kwargs.pop("num_warps") == launch["num_warps"], launch["name"]
        assert kwargs == launch["constexprs"], launch["name"]
    assert sum(launch["read_bytes_per_elem_pass"] for launch in plan) == 3  # launches 1, 2 and 4 read the logits


@pytest.mark.parametrize(("b", "k"), [(256, 1000), (128, 1000), (4096, 100)])
def test_forward_launches_over_the_logits_have_four_programs_per_sm(b, k):
    # issue 15: the launches that stream the logits run >= 4 programs per SM of an H200 where the shape has the
    # elements for it (the two-axis tiles stop at MIN_TILE elements), every one a single step
    for launch in dist.forward_plan(b, k):
        if launch["read_bytes_per_elem_pass"]:
            assert launch["programs"] >= 4 * perf_model.H200.sms and launch["steps"] == 1, launch["name"]
    assert dist.forward_plan(64, 100)[1]["tile"] == dist.MIN_TILE  # too few elements: the smallest tile


@pytest.mark.parametrize(("b", "k", "filled"), [(4096, 1000, True), (2048, 1537, True), (64, 100, False),
                                                (8, 1537, False), (256, 1000, False)])
def test_interpreter_launches_are_the_gpu_rule_without_the_filling(b, k, filled):
    # fill=False (CPU tensors): the launches over the logits keep the largest tiles, the GPU's wherever the shape
    # ("filled") has the elements for >= 4 x 132 such programs, else fewer, larger ones; the merges take up to
    # MERGE_TILE lanes a program (the GPU's MERGE_LANES): fewer programs
    cpu, gpu = dist.forward_plan(b, k, fill=False), dist.forward_plan(b, k)
    assert [launch["kernel"] for launch in cpu] == [launch["kernel"] for launch in gpu]
    for c, g in zip(cpu, gpu):
        if c["read_bytes_per_elem_pass"] and filled:
            assert c == g, c["name"]
        elif c["read_bytes_per_elem_pass"]:
            assert c["tile"] == dist.MAX_PARTIAL_TILE > g["tile"] and c["programs"] < g["programs"], c["name"]
        else:
            assert c["programs"] <= g["programs"], c["name"]


@pytest.mark.parametrize(("b", "k", "fill", "merge_tile", "several"), [
    (9, 90, True, 64, {"class merge steps", "loss steps", "class programs"}),
    (5, 90, True, 8, {"class merge steps", "row merge steps", "launch-1 chunk groups", "loss steps", "class programs"}),
    (96, 150, False, 64, {"class merge steps", "row merge steps", "loss steps", "class programs", "row programs"}),
], ids=["gpu-tiles-rows", "gpu-tiles-chunks", "cpu-tiles"])
def test_merges_in_several_steps(monkeypatch, b, k, fill, merge_tile, several):
    # The fixed-order merges sum MERGE_TILE partials x lanes a step and the loss LOSS_BLOCK a step. At the real
    # sizes more than one step needs > 32 row tiles or class chunks under the GPU's tiles (B > 128 or K > 1024;
    # the interpreter's, with up to MERGE_TILE lanes a program, reach them at B = 96, K = 1000), and launch 2's
    # groups of launch-1 chunks or the loss's loop K or B in the tens of thousands. Shrunk step sizes reach each of
    # those loops (a ragged last step included), and several programs of each merge, at small shapes.
    monkeypatch.setattr(dist, "MERGE_TILE", merge_tile)
    monkeypatch.setattr(dist, "LOSS_BLOCK", 2)
    pl = dist._plan(b, k, fill)
    counts = {"class merge steps": (pl["n_row_tiles"], pl["merge"]["BLOCK_T"]),
              "row merge steps": (pl["n_chunks"], pl["merge"]["BLOCK_N"]),
              "launch-1 chunk groups": (pl["n_part"], pl["part_block"]),
              "loss steps": (max(pl["n_col_programs"], pl["n_row_programs"]), pl["loss_block"]),
              "class programs": (pl["n_col_programs"], 1), "row programs": (pl["n_row_programs"], 1)}
    assert {name for name, (n, per) in counts.items() if n > per} == several, counts
    assert any(n % per for n, per in counts.values()), counts
    s, t = logits(b, k, seed=61, scale=2.0), logits(b, k, seed=62, scale=3.0)
    _check_fp32(s, t, 1.0, 2.0, 4.0, fn=lambda a, c: dist._DISTLoss.apply(a, c, 1.0, 2.0, 4.0, fill))


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
    s, t = logits(3, 41, seed=81), logits(3, 41, seed=82)
    torch.testing.assert_close(ops.dist_loss(s, t, 1.0, 2.0, 4.0, backend="triton"),
                               dist.dist_loss(s, t, 1.0, 2.0, 4.0), rtol=0, atol=0)
    want = ops.dist_loss(s.double(), t.double(), 1.0, 2.0, 4.0, backend="auto")  # float64: the reference
    assert_close_rel(ops.dist_loss(s, t, 1.0, 2.0, 4.0, backend="triton"), want, FP32_RTOL, "triton vs reference")
    if not CUDA:  # "auto" on CPU tensors is the reference
        assert ops._select("dist_loss", "auto", s.device, s.dtype, t.dtype) is reference.dist_loss_ref


# ----------------------------------------------------------------------------------------------------------------
# Compile-only: PTX/cubin for sm_80 and sm_90 without a GPU
# ----------------------------------------------------------------------------------------------------------------


def _forward_builds(name, b, k, dtypes, arch, plan_dtype, unit_class_stride=True):
    """Every forward launch of dist.forward_plan(b, k) as the launcher specialises it: "<name> <i> <kernel>"."""
    dtypes = {**dtypes, "p": dtypes["s"]}  # kd's per-chunk kernel's p_ptr: the student's logits again
    return [(f"{name} {i + 1} {launch['kernel'].fn.__name__}",
             build(launch["kernel"], {"num_warps": launch["num_warps"]}, dtypes, arch, launch["constexprs"],
                   unit_class_stride))
            for i, launch in enumerate(dist.forward_plan(b, k, plan_dtype))]


def _compile_only_builds():
    bwd = dist._dist_bwd_kernel
    grads = {"GRAD_S": True, "GRAD_T": True}
    fp32 = dict.fromkeys("st", torch.float32)
    mixed = {"s": torch.bfloat16, "t": torch.float32}
    fp16 = dict.fromkeys("st", torch.float16)
    builds = []
    for arch in (90, 80):
        # ImageNet-1k at the KD target's batch, fp32
        builds += _forward_builds("fwd fp32 K=1000", 256, 1000, fp32, arch, torch.float32)
        builds += [("bwd fp32 K=1000", build(bwd, dist._bwd_config(128, 1000), fp32, arch,
                                             {"ONE_CHUNK": True, "ALIGN": 4, **grads}))]
        # bf16 student logits against fp32 teacher logits (under bf16 autocast): ALIGN 4, as for fp32 rows
        builds += _forward_builds("fwd bf16-fp32 K=100 mixed", 128, 100, mixed, arch, torch.float32)
        builds += [("bwd bf16-fp32 K=100 mixed", build(bwd, dist._bwd_config(128, 100), mixed, arch,
                                                       {"ONE_CHUNK": True, "ALIGN": 4, "GRAD_S": True,
                                                        "GRAD_T": False}))]
    # any class stride, K > MAX_BLOCK_K (odd: ALIGN 1)
    builds += _forward_builds("fwd fp16 K=1537 strided", 256, 1537, fp16, 90, torch.float16,
                              unit_class_stride=False)
    builds += [("bwd fp16 K=1537 strided", build(bwd, dist._bwd_config(256, 1537), fp16, 90,
                                                 {"ONE_CHUNK": False, "ALIGN": 1, **grads},
                                                 unit_class_stride=False))]
    return builds


@pytest.mark.slow
def test_compile_only_sm80_sm90_ptx_with_vectorised_loads():
    pytest.importorskip("triton.backends.nvidia")

    streaming = ("_kl_partial_kernel", "_dist_probs_kernel", "_dist_moments_kernel")  # the launches reading logits
    for name, spec, asm in compile_builds(_compile_only_builds()):
        logit_loads = name.startswith("bwd") or name.endswith(streaming)
        # contiguous fp32 rows, K = 1000 = 4 * 250: 16-byte row loads; bf16 logits widened in registers, their
        # gradient rounded to nearest; no atomics anywhere (the same bits every run)
        usage = check_ptx(name, spec, asm, v4_loads="fp32 K=1000" in name and logit_loads,
                          v4_stores=name.startswith("bwd fp32"), no_atomics=True,
                          widened="bf16" if "mixed" in name and logit_loads else None)
        if usage is not None and name.startswith("fwd"):  # registers: >= 4 programs per SM can be resident
            assert perf_model.resident_per_sm(usage[0]["REG"], spec["num_warps"]) >= 4, f"{name}: {usage}"


# ----------------------------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(("b", "k"), [(512, 1000), (300, 1537)])
def test_gpu_large_batches_match_float64(b, k):
    # On hardware: many row tiles and class chunks in every launch (K = 1537: > MAX_BLOCK_K), against float64
    s, t = logits(b, k, seed=140), logits(b, k, seed=141, scale=3.0)
    _check_fp32(s, t, 1.0, 2.0, 4.0)
    _check_dtypes(torch.bfloat16, torch.float32, b, k, 1.0, seed=142)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32])  # one compile: the GPU test step's budget is shared
def test_gpu_torch_compile_fullgraph_kernels(dtype):
    check_compiled(lambda s, t: 2.0 * dist.dist_loss(s, t, 1.0, 2.0, 4.0) + dist.dist_loss(s, t), dtype)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph_ops_dispatch():
    # backend="auto" on CUDA tensors resolves to the Triton kernel inside the compiled graph
    check_compiled(lambda s, t: ops.dist_loss(s, t) + ops.dist_loss(s, t, 2.0, 1.0, 4.0), torch.float32, k=1537)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_forward_backward():
    b, k = 128, 1000
    s = logits(b, k, seed=101).requires_grad_()
    t = logits(b, k, seed=102)
    ones = torch.ones((), device=DEV)

    def step():
        loss = dist.dist_loss(s, t, 1.0, 2.0, 4.0)
        return (loss, *torch.autograd.grad(loss, (s,), 2.0 * ones))

    new = [logits(b, k, seed=110 + i) for i in range(2)]
    static = cuda_graph_replay(step, (s, t), new)
    (want,), (want_s, _) = grad_run(lambda a, c: _ref64(a, c, 1.0, 2.0, 4.0), [n.double() for n in new], [2.0])
    for a, r in zip(static, (want, want_s)):
        assert_close_rel(a, r, FP32_RTOL, "CUDA graph replay")


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1000, 1537])
def test_gpu_six_launches_forward_one_launch_backward(k):
    s, t = (logits(128, k, seed=120 + i, dtype=torch.bfloat16) for i in range(2))
    s.requires_grad_()
    t.requires_grad_()
    go = torch.ones((), device=DEV)
    for _ in range(2):  # compile the kernels first
        torch.autograd.grad(dist.dist_loss(s, t), (s, t), go)
    torch.cuda.synchronize()
    loss, fwd = cuda_kernel_names(lambda: dist.dist_loss(s, t))
    _, bwd = cuda_kernel_names(lambda: torch.autograd.grad(loss, (s, t), go))
    want = [launch["kernel"].fn.__name__ for launch in dist.forward_plan(128, k, torch.bfloat16)]
    assert want[0] == "_kl_partial_kernel" and want[-1] == "_dist_loss_kernel" and len(want) == 6, want
    assert len(fwd) == len(want) and all(w in f for w, f in zip(want, fwd)), fwd
    assert len(bwd) == 1 and "_dist_bwd_kernel" in bwd[0], bwd


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1537])  # every launch over many programs, K > MAX_BLOCK_K
def test_gpu_forward_is_bitwise_deterministic(k):
    s, t = logits(4096, k, seed=130), logits(4096, k, seed=131)
    first = dist._forward(s, t, 1.0, 2.0, 4.0)
    for _ in range(3):
        for x, y in zip(dist._forward(s, t, 1.0, 2.0, 4.0), first):
            assert torch.equal(x, y)
