"""What the logit-loss kernel tests (test_kd.py, test_dkd.py, test_dist.py, test_ofa.py) share: inputs, running a
loss forward and backward, judging its results against float64, compile-only builds with their PTX checks, and the
GPU-only torch.compile, CUDA-graph and launch-listing helpers.

A plain module, not a test file: the tests import it as ``tests.kernels.logit_cases`` (pytest runs from the
repository root, ``python -m pytest``, which puts the root on sys.path). Imported after tests/conftest.py has set
TRITON_INTERPRET, which BF16_ULPS reads.
"""

import inspect
import math
import os
import re

import torch

from patfast.kernels._compile_check import compile_kernels, resource_usage

F64 = torch.float64
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

GRAD_OUT = 0.375  # upstream gradient != 1 (the loss is "not the last layer"), exact in every dtype
FP32_RTOL = 1e-5
BF16_ULPS = 1.0 if os.environ.get("TRITON_INTERPRET") == "1" else 0.5  # the interpreter truncates fp32 -> bf16
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FLOAT_ARGS = ("temperature", "alpha", "beta", "gamma", "eps", "mask_value")  # the kernels' fp32 scalar arguments


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def logits(b, k, seed, *, dtype=torch.float32, scale=2.0, device=DEV):
    """(b, k) normal logits times scale, drawn in float64 from their own generator, rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, k, generator=g, dtype=F64) * scale).to(device=device, dtype=dtype)


def target(b, k, seed, device=DEV):
    """(b,) int64 class indices in [0, k), from their own generator."""
    return torch.randint(0, k, (b,), generator=torch.Generator().manual_seed(seed)).to(device)


def column_slice(b, k, seed):
    """Rows of a wider tensor: row stride k + 7, data pointer 12 bytes in."""
    return logits(b, k + 7, seed=seed)[:, 3:3 + k]


def transposed_slice(b, k, seed):
    """Class stride b, row stride 1."""
    return logits(k + 5, b, seed=seed).t()[:, 2:2 + k]


# ----------------------------------------------------------------------------------------------------------------
# Running and judging
# ----------------------------------------------------------------------------------------------------------------


def grad_run(fn, inputs, grad_outs):
    """Calls fn(*inputs) (one loss or a tuple), back-propagates grad_outs; returns (losses, grads of every input) in
    float64."""
    leaves = [x.detach().requires_grad_(True) for x in inputs]  # detach, not clone: keeps every stride
    assert all(leaf.stride() == x.stride() for leaf, x in zip(leaves, inputs))
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gos = [torch.tensor(g, dtype=o.dtype, device=o.device) for g, o in zip(grad_outs, outs)]
    torch.autograd.backward(outs, gos)
    return [o.detach().double() for o in outs], [x.grad.double() for x in leaves]


def rel_err(actual, expected) -> float:
    """Max-norm relative error: max |actual - expected| / max |expected|."""
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.double().cpu() - expected.cpu()).abs().max() / scale).item()


def assert_close_rel(actual, expected, rtol, what):
    """|actual - expected| <= rtol * max(|expected|), elementwise."""
    err = rel_err(actual, expected)
    assert err <= rtol, f"{what}: max-norm relative error {err:.3g} > {rtol:g}"


def judge(what, got, torch_got, want, dtype):
    """A 16-bit result: at most 2x eager PyTorch's error on the same inputs, plus the rounding of the result itself
    (half an ulp of the largest true value; a whole one for bf16 under the interpreter) and the subnormal spacing.
    An fp32 result of fp32 inputs (a teacher gradient beside a 16-bit student): FP32_RTOL. Where eager PyTorch gives
    NaN at this dtype (e.g. its fp16 probabilities underflow to 0 and it takes their log), the kernel must be within
    the rounding of its own result."""
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


def check_dtypes(loss, ref, ds, dt, b, k, seed):
    """A (student, teacher) loss at the logits dtypes ds, dt (16-bit, or one of them fp32): loss(s, t) and its two
    gradients judged (judge) against ref(s, t) in float64, beside eager PyTorch's ref(s, t) at those dtypes. The loss
    is judged at the 16-bit input's dtype, each gradient at its input's."""
    s = logits(b, k, seed=seed, dtype=ds, scale=2.0)
    t = logits(b, k, seed=seed + 1, dtype=dt, scale=3.0)
    ours = grad_run(loss, (s, t), [GRAD_OUT])
    torch_run = grad_run(ref, (s, t), [GRAD_OUT])
    truth = grad_run(ref, (s.double(), t.double()), [GRAD_OUT])
    half = ds if ds != torch.float32 else dt
    for what, a, h, r, dtype in zip(("loss", "grad logits_s", "grad logits_t"), [*ours[0], *ours[1]],
                                    [*torch_run[0], *torch_run[1]], [*truth[0], *truth[1]], (half, ds, dt)):
        judge(what, a, h, r, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Compile-only: PTX/cubin for sm_80 and sm_90 without a GPU
# ----------------------------------------------------------------------------------------------------------------


def build(kernel, config, dtype, arch, constexprs, unit_class_stride=True, *, floats=FLOAT_ARGS):
    """A compile_kernels build for ``kernel`` as the launcher would specialise it for contiguous (aligned) inputs.

    config: the launcher's tiles and num_warps; dtype: one torch dtype for all logits, or {"s": ..., "t": ...,
    "p": ...}, one per logits input (s_ptr, t_ptr, p_ptr) and its gradient (ds_ptr, ...); every other pointer is
    fp32 but y_ptr (int64 targets, stride 1); floats: the fp32 scalar arguments (the other scalars are i32). Every
    tl.constexpr argument of the kernel must have a value (constexprs, config or a unit stride)."""
    dtypes = dtype if isinstance(dtype, dict) else dict.fromkeys("stp", dtype)
    pointer_input = {"s_ptr": "s", "t_ptr": "t", "p_ptr": "p", "ds_ptr": "s", "dt_ptr": "t", "dp_ptr": "p"}
    cx = {**constexprs, **{k: v for k, v in config.items() if k != "num_warps"}, "y_stride": 1}
    if unit_class_stride:
        cx.update({f"{x}_stride_k": 1 for x in "stp"})
    cx = {k: v for k, v in cx.items() if k in kernel.arg_names}  # e.g. a merge kernel has no tiles of logits
    fn = getattr(kernel, "fn", kernel)  # a JITFunction or the interpreter's InterpretedFunction
    unset = [n for n, p in inspect.signature(fn).parameters.items() if "constexpr" in str(p.annotation) and n not in cx]
    assert not unset, f"{fn.__name__}: no value for its constexpr arguments {unset}"
    signature = {}
    for name in kernel.arg_names:
        if name in cx:
            signature[name] = "constexpr"
        elif name == "y_ptr":
            signature[name] = "*i64"
        elif name in pointer_input:
            signature[name] = f"*{TRITON_DTYPE[dtypes[pointer_input[name]]]}"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        else:
            signature[name] = "fp32" if name in floats else "i32"
    aligned = [n for n in kernel.arg_names if n.endswith("_ptr")]
    return dict(kernel=kernel, signature=signature, constexprs=cx, arch=arch, num_warps=config["num_warps"],
                aligned=aligned)


def fwd_bwd_builds(fwd, bwd, fwd_config, bwd_config, *, contiguous, strided):
    """The builds of a one-launch forward and a one-launch backward of (student, teacher) logits, named as
    compile-only tests read them: for sm_90 and sm_80, "fwd fp32 K=1000" / "bwd fp32 K=1000" (contiguous rows of
    ImageNet-1k), "fwd bf16-fp32 K=100 mixed" / "bwd bf16-fp32 K=100 mixed" (bf16 student against fp32 teacher
    logits, under bf16 autocast; the backward for the student only); for sm_90 "fwd fp16 K=1537 strided" / "bwd fp16
    K=1537 strided" (any class stride). contiguous / strided: the constexprs (ALIGN, ...) for those layouts."""
    grads = {"GRAD_S": True, "GRAD_T": True}
    fp32 = dict.fromkeys("st", torch.float32)
    mixed = {"s": torch.bfloat16, "t": torch.float32}
    fp16 = dict.fromkeys("st", torch.float16)
    builds = []
    for arch in (90, 80):
        builds += [
            ("fwd fp32 K=1000", build(fwd, fwd_config(128, 1000), fp32, arch, contiguous)),
            ("bwd fp32 K=1000", build(bwd, bwd_config(128, 1000), fp32, arch, {**contiguous, **grads})),
            ("fwd bf16-fp32 K=100 mixed", build(fwd, fwd_config(128, 100), mixed, arch, contiguous)),
            ("bwd bf16-fp32 K=100 mixed", build(bwd, bwd_config(128, 100), mixed, arch,
                                                {**contiguous, "GRAD_S": True, "GRAD_T": False})),
        ]
    builds += [("fwd fp16 K=1537 strided", build(fwd, fwd_config(256, 1537), fp16, 90, strided,
                                                 unit_class_stride=False)),
               ("bwd fp16 K=1537 strided", build(bwd, bwd_config(256, 1537), fp16, 90, {**strided, **grads},
                                                 unit_class_stride=False))]
    return builds


def compile_builds(builds):
    """compile_kernels on [(name, build), ...]: [(name, build, asm), ...]."""
    return [(name, b, asm) for (name, b), asm in zip(builds, compile_kernels([b for _, b in builds]))]


def check_ptx(name, spec, asm, *, v4_loads=False, v4_stores=False, no_atomics=False, widened=None):
    """The checks every compile-only test makes of one build (spec, its compile_kernels dict; asm, its result): PTX
    for its target, a cubin, no register spills; and, as asked: v4_loads, 16-byte (v4) row loads; v4_stores, 16-byte
    gradient stores; no_atomics, no atom. (a deterministic result); widened "bf16" / "f16", 16-bit logits widened to
    fp32 in registers and, in a backward (name "bwd ..."), their gradients rounded to nearest. Returns the cubin's
    resource usage (None without cuobjdump)."""
    ptx = asm["ptx"]
    assert f".target sm_{spec['arch']}" in ptx, name
    assert asm.get("cubin"), f"{name}: no cubin"
    if v4_loads:  # e.g. contiguous fp32 rows, K = 1000 = 4 * 250
        assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx), f"{name}: row loads are not vectorised"
    if v4_stores:
        assert re.search(r"st\.global(\.\w+)*\.v4\.b32", ptx), f"{name}: gradient stores are not vectorised"
    if no_atomics:
        assert "atom." not in ptx, f"{name}: atomics (the result must be deterministic)"
    if widened:
        assert f"cvt.f32.{widened}" in ptx, name
        if name.startswith("bwd"):
            assert re.search(rf"cvt\.rn\.{widened}(x2)?\.f32", ptx), f"{name}: gradient not rounded to nearest"
    usage = resource_usage(asm["cubin"])
    assert usage is None or max(u["STACK"] for u in usage) == 0, f"{name}: register spills: {usage}"
    return usage


# ----------------------------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------------------------


def check_compiled(step, dtype=torch.float32, *, n_inputs=2, k=1000, grad_outs=(1.0,), inputs=None):
    """torch.compile(step, fullgraph=True) against eager step (same kernels, eager first): losses and gradients
    within FP32_RTOL (fp32) or 1e-2 (16-bit). inputs: the tensors, or None for n_inputs (64, k) logits of dtype
    (seeds 90, 91, ...)."""
    if inputs is None:
        inputs = [logits(64, k, seed=90 + i, dtype=dtype) for i in range(n_inputs)]
    want = grad_run(step, inputs, grad_outs)
    torch._dynamo.reset()
    got = grad_run(torch.compile(step, fullgraph=True), inputs, grad_outs)
    rtol = FP32_RTOL if dtype == torch.float32 else 1e-2
    for a, r in zip([*got[0], *got[1]], [*want[0], *want[1]]):
        assert_close_rel(a, r, rtol, "torch.compile vs eager")


def cuda_graph_replay(step, tensors, new):
    """step() warmed up on a side stream, captured in a CUDA graph; then new copied into tensors and the graph
    replayed: its (static) outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    with torch.no_grad():
        for x, n in zip(tensors, new):
            x.copy_(n)
    graph.replay()
    torch.cuda.synchronize()
    return static


def cuda_kernel_names(fn):
    """Runs fn() under the profiler: (its result, the names of the CUDA kernels it launched, in order)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    return out, [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
