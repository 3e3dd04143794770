"""The fused Triton HCL kernel (patfast.kernels.hcl) against the float64 reference.

Without a GPU the kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on CPU
tensors; with one, the same tests run on CUDA tensors. The truth is ``hcl_loss_ref`` on the inputs cast to float64
(the same rounded values, exact arithmetic), gradients by autograd through it. 16-bit results may err by at most
2x PyTorch's own error at that dtype (the reference run in the 16-bit dtype, no upcast) plus a small floor.
Every test draws fresh random inputs (seeded by its test id, reproducible); no input is ever all zeros.
The compile-only tests build every kernel configuration for sm_80 and sm_90 without a GPU and read the PTX.
"""

from __future__ import annotations

import math
import re
import zlib

import pytest
import torch

from patfast import ops
from patfast.bench import step_layouts
from patfast.kernels import perf_model
from patfast.kernels._compile_check import compile_kernels, resource_usage
from patfast.kernels.reference import hcl_loss_ref

triton = pytest.importorskip("triton")
hcl = pytest.importorskip("patfast.kernels.hcl")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F64 = torch.float64

# (B, C, H, W) maps and (B, L, C) tokens: batch 3, odd sizes (7 -> 4 bins overlap), non-square both ways, tiny maps
# where pooled levels are skipped (1x1: none, 2x2: level 1 only, 4x4: levels 2 and 1), a single column (every
# level-4 column bin holds it), wide maps split into column chunks, 56x56 with few channels, tokens (h = 7, 14).
SHAPES_F32 = [
    (3, 4, 7, 7),
    (2, 3, 9, 9),
    (2, 3, 6, 10),
    (2, 3, 10, 6),
    (3, 2, 1, 1),
    (3, 2, 2, 2),
    (2, 3, 4, 4),
    (2, 3, 10, 1),
    (2, 3, 3, 130),
    (2, 2, 56, 56),
    (3, 49, 5),
    (2, 196, 7),
    (2, 1600, 33),
]
SHAPES_F16 = [(3, 4, 7, 7), (2, 3, 6, 10), (2, 2, 56, 56), (3, 49, 5), (2, 196, 7)]
SHAPES_BF16_GPU = [
    (3, 4, 7, 7),
    (2, 3, 10, 6),
    (8, 3136, 96),
    (8, 784, 192),
    (8, 196, 384),
    (8, 49, 768),
    (4, 96, 56, 56),
]


def _id(shape) -> str:
    return "x".join(map(str, shape))


@pytest.fixture
def seed(request) -> int:
    return zlib.crc32(request.node.nodeid.encode())


def _pair(shape, seed, dtype=torch.float32, device=DEV):
    """Student and teacher features: independent draws with different means, so the pooled terms matter."""
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(shape, generator=g, dtype=F64) + 0.5
    ft = 0.8 * torch.randn(shape, generator=g, dtype=F64) - 0.3
    return fs.to(device=device, dtype=dtype), ft.to(device=device, dtype=dtype)


def _scalar(seed) -> float:
    """A random grad_output scale in [0.5, 3): the loss is not the last layer."""
    return 0.5 + 2.5 * torch.rand((), generator=torch.Generator().manual_seed(seed + 1)).item()


def _truth(fs, ft, scale):
    """float64 reference loss and gradients (w.r.t. fs, ft) of scale * loss, on the CPU."""
    a = fs.detach().cpu().to(F64).requires_grad_()
    b = ft.detach().cpu().to(F64).requires_grad_()
    loss = hcl_loss_ref(a, b)
    ga, gb = torch.autograd.grad(loss * scale, (a, b))
    return loss.detach(), ga, gb


def _run(fn, fs, ft, scale):
    """Loss and gradients of scale * fn(fs, ft); fs, ft may be non-leaf views."""
    fs = fs if fs.requires_grad else fs.requires_grad_()
    ft = ft if ft.requires_grad else ft.requires_grad_()
    loss = fn(fs, ft)
    gs, gt = torch.autograd.grad(loss * scale, (fs, ft))
    return loss.detach(), gs, gt


def _triton_hcl(fs, ft):
    return ops.hcl_loss(fs, ft, backend="triton")


def _assert_f32_close(loss, gs, gt, truth):
    loss64, gs64, gt64 = truth
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double().cpu(), loss64, rtol=1e-5, atol=0)
    for got, want in ((gs, gs64), (gt, gt64)):
        assert got.dtype == torch.float32
        # relative to the gradient's scale: rel. error <= 1e-5 of max |grad|
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def _max_err(x, truth) -> float:
    return (x.detach().double().cpu() - truth).abs().max().item()


def _assert_within_2x_torch(dtype, fs, ft, scale, loss, gs, gt):
    """Kernel error <= 2 x PyTorch's own error at ``dtype`` (reference without upcast) + a small floor."""
    truth = _truth(fs, ft, scale)
    torch_run = _run(hcl_loss_ref, fs.detach().clone(), ft.detach().clone(), scale)  # same device and dtype
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # spacing of the subnormals
    for got, ref, want in zip((loss, gs, gt), torch_run, truth):
        floor = 1e-6 * want.abs().max().item() + tiny
        assert _max_err(got, want) <= 2 * _max_err(ref, want) + floor, (
            f"kernel error {_max_err(got, want):.3g} > 2 x torch {dtype} error {_max_err(ref, want):.3g} + {floor:.2g}"
        )
    assert loss.dtype == torch.float32 and gs.dtype == dtype and gt.dtype == dtype


# ----------------------------------------------------------------------------------------------------------------
# Values and gradients
# ----------------------------------------------------------------------------------------------------------------


def test_registered_in_ops():
    assert "hcl_loss" in ops.triton_ops()


@pytest.mark.parametrize("shape", SHAPES_F32, ids=_id)
def test_float32_matches_float64_reference(shape, seed):
    fs, ft = _pair(shape, seed)
    scale = _scalar(seed)
    got = _run(_triton_hcl, fs, ft, scale)
    _assert_f32_close(*got, _truth(fs, ft, scale))


@pytest.mark.parametrize("shape", SHAPES_F16, ids=_id)
def test_float16_error_at_most_twice_torch(shape, seed):
    fs, ft = _pair(shape, seed, torch.float16)
    scale = _scalar(seed)
    _assert_within_2x_torch(torch.float16, fs, ft, scale, *_run(_triton_hcl, fs, ft, scale))


@pytest.mark.parametrize("shape", [(3, 4, 7, 7), (2, 196, 7)], ids=_id)
def test_bfloat16_error_at_most_twice_torch(shape, seed):
    fs, ft = _pair(shape, seed, torch.bfloat16)
    scale = _scalar(seed)
    _assert_within_2x_torch(torch.bfloat16, fs, ft, scale, *_run(_triton_hcl, fs, ft, scale))


def _layouts(seed):
    """name -> (fs, ft): non-contiguous inputs, read in place through their strides."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(shape, generator=g) + 0.3).to(DEV)

    b, c, h, w = 3, 5, 7, 9
    cl = rnd(b, c, h, w).to(memory_format=torch.channels_last)
    return {
        "channels_last": (cl, rnd(b, c, h, w).to(memory_format=torch.channels_last)),
        "channels_last_vs_contiguous": (cl.clone(memory_format=torch.channels_last), rnd(b, c, h, w)),
        "transposed": (rnd(b, c, w, h).transpose(2, 3), rnd(b, c, w, h).transpose(2, 3)),
        "sliced": (rnd(b, 2 * c, h + 2, w)[:, ::2, 1:-1], rnd(b, c, h, w + 3)[..., 3:]),
        "permuted_batch": (rnd(c, b, h, w).transpose(0, 1), rnd(b, c, h, w)),
        "tokens_cls_sliced": (rnd(b, 50, c)[:, 1:], rnd(b, 50, c)[:, 1:]),
        "tokens_transposed": (rnd(b, c, 49).transpose(1, 2), rnd(b, 49, c)),
        "tokens_expanded_teacher": (rnd(b, 49, c), rnd(1, 49, c).expand(b, 49, c)),
    }


@pytest.mark.parametrize("layout", list(_layouts(0)))
def test_non_contiguous_inputs(layout, seed):
    fs, ft = _layouts(seed)[layout]
    assert not (fs.is_contiguous() and ft.is_contiguous())
    scale = _scalar(seed)
    truth = _truth(fs, ft, scale)
    loss, gs, gt = _run(_triton_hcl, fs, ft, scale)
    _assert_f32_close(loss, gs, gt, truth)
    if fs.is_contiguous(memory_format=torch.channels_last) and fs.dim() == 4 and not fs.is_contiguous():
        assert gs.is_contiguous(memory_format=torch.channels_last)  # gradients keep a dense input's layout


@pytest.mark.parametrize("case", ["tokens", "nchw", "channels_last_vs_nchw", "nchw_7x7_fp16"])
def test_gpu_tile_configurations(case, monkeypatch, seed):
    # The tiles a GPU launches with (narrowed to >= 4 x 132 programs, the row loop pipelined), run here in the
    # interpreter: every program owns fewer channels than on the CPU, every layout its own aligned strides.
    monkeypatch.setattr(hcl, "_plan", lambda feat_s, fill=None, plan=hcl._plan: plan(feat_s, fill=True))
    dtype = torch.float16 if case.endswith("fp16") else torch.float32
    shape = {"tokens": (2, 784, 24), "nchw": (2, 12, 28, 28), "channels_last_vs_nchw": (2, 32, 14, 14),
             "nchw_7x7_fp16": (2, 40, 7, 7)}[case]
    fs, ft = _pair(shape, seed, dtype)
    if case == "channels_last_vs_nchw":
        fs = fs.to(memory_format=torch.channels_last)
    block_c = hcl._plan(fs)[4]
    assert block_c < triton.next_power_of_2(fs.shape[-1] if fs.dim() == 3 else fs.shape[1])  # narrowed
    scale = _scalar(seed)
    got = _run(_triton_hcl, fs, ft, scale)
    if dtype == torch.float32:
        _assert_f32_close(*got, _truth(fs, ft, scale))
    else:
        _assert_within_2x_torch(dtype, fs, ft, scale, *got)


def test_inputs_are_read_in_place(monkeypatch, seed):
    # No reshaping copy: the forward kernel gets the caller's storage (class token sliced off, channels_last).
    seen = []
    launcher = hcl._forward

    def spy(plan, fs, ft, coef, partials):
        seen.append((fs.data_ptr(), ft.data_ptr()))
        return launcher(plan, fs, ft, coef, partials)

    monkeypatch.setattr(hcl, "_forward", spy)
    tok = torch.randn(2, 50, 6, generator=torch.Generator().manual_seed(seed)).to(DEV)
    cl = torch.randn(2, 3, 5, 5).to(DEV).to(memory_format=torch.channels_last)
    hcl.hcl_loss(tok[:, 1:], tok[:, 1:] * 0.5)
    hcl.hcl_loss(cl, cl + 1)
    assert seen[0][0] == tok[:, 1:].data_ptr() and seen[1][0] == cl.data_ptr()


def test_only_the_inputs_that_need_grad_get_one(seed):
    fs, ft = _pair((3, 4, 7, 7), seed)
    fs.requires_grad_()
    scale = _scalar(seed)
    (hcl.hcl_loss(fs, ft) * scale).backward()  # teacher detached: the kernel writes grad_s only
    assert ft.grad is None
    _, gs64, _ = _truth(fs, ft, scale)
    torch.testing.assert_close(fs.grad.double().cpu(), gs64, rtol=1e-5, atol=1e-5 * gs64.abs().max().item())
    ft.requires_grad_()
    gt64 = _truth(fs, ft, 1.0)[2]
    (gt,) = torch.autograd.grad(hcl.hcl_loss(fs.detach(), ft), (ft,))  # student detached: grad_t only
    torch.testing.assert_close(gt.double().cpu(), gt64, rtol=1e-5, atol=1e-5 * gt64.abs().max().item())


def test_forward_without_grad(seed):
    fs, ft = _pair((2, 196, 7), seed)
    with torch.no_grad():
        loss = hcl.hcl_loss(fs, ft)
    torch.testing.assert_close(loss.double().cpu(), _truth(fs, ft, 1.0)[0], rtol=1e-5, atol=0)


def test_stages_sum_matches_per_stage_references(seed):
    # Four stages of mixed rank, layout and size in one call: forward 4 kernels + 1 sum, backward 4 kernels.
    shapes = [(2, 64, 3), (2, 5, 8, 8), (2, 16, 6), (2, 7, 2, 3)]
    pairs = [_pair(s, seed + i) for i, s in enumerate(shapes)]
    pairs[1] = tuple(x.to(memory_format=torch.channels_last) for x in pairs[1])
    feats_s = [p[0].requires_grad_() for p in pairs]
    feats_t = [p[1].requires_grad_() for p in pairs]
    scale = _scalar(seed)
    loss = hcl.hcl_loss_stages(feats_s, feats_t)
    grads = torch.autograd.grad(loss * scale, feats_s + feats_t)
    truths = [_truth(s, t, scale) for s, t in zip(feats_s, feats_t)]
    torch.testing.assert_close(loss.double().cpu(), sum(t[0] for t in truths), rtol=1e-5, atol=0)
    for got, want in zip(grads, [t[1] for t in truths] + [t[2] for t in truths]):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


# ----------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------


def _bad_calls():
    x = torch.randn(3, 2, 7, 7)
    meta = torch.empty(3, 2, 7, 7, device="meta")
    return [
        ("shape", lambda: hcl.hcl_loss(x, x[:, :1]), r"same shape.*\(3, 2, 7, 7\).*\(3, 1, 7, 7\)"),
        ("dtype-teacher", lambda: hcl.hcl_loss(x, x.double()), r"teacher dtype torch.float64 is not supported"),
        ("float64", lambda: hcl.hcl_loss(x.double(), x.double()), r"float64 is not supported"),
        ("rank2", lambda: hcl.hcl_loss(x[0, 0], x[0, 0]), r"\(B, C, H, W\) maps or \(B, L, C\) tokens.*rank-2"),
        ("rank5", lambda: hcl.hcl_loss(x[None], x[None]), "rank-5"),
        ("empty", lambda: hcl.hcl_loss(x[:0], x[:0]), "empty"),
        ("devices", lambda: hcl.hcl_loss(x, meta), r"different devices \(cpu and meta\)"),
        ("cls-token", lambda: hcl.hcl_loss(torch.randn(2, 197, 8), torch.randn(2, 197, 8)), "class token"),
        ("stages-count", lambda: hcl.hcl_loss_stages([x, x], [x]), "2 student and 1 teacher"),
        ("stages-none", lambda: hcl.hcl_loss_stages([], []), "no stages"),
        ("stages-devices", lambda: hcl.hcl_loss_stages([x, meta], [x, meta]), "stage 1 is on meta, stage 0 on cpu"),
        ("stage-shape", lambda: hcl.hcl_loss_stages([x, x], [x, x[:1]]), r"stage 1.*same shape"),
    ]


@pytest.mark.parametrize(("call", "match"), [c[1:] for c in _bad_calls()], ids=[c[0] for c in _bad_calls()])
def test_input_checks_raise_clear_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------------------------------------------
# Compile-only: every kernel and configuration for sm_80 and sm_90, no GPU needed
# ----------------------------------------------------------------------------------------------------------------

def _meta(shape, dtype, layout="contiguous"):
    """A meta tensor of ``shape`` (tokens (B, L, C) or an NCHW-shaped map) in ``dtype`` and ``layout``."""
    x = torch.empty(shape, device="meta", dtype=dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def _build(kernel_name, fs, ft, arch, write_t=True):
    """A compile_kernels build mirroring what the launcher and the JIT would specialise on a GPU for real tensors
    like ``fs``, ``ft`` (perf_model.hcl_build: the same rules the performance model compiles with)."""
    return perf_model.hcl_build(kernel_name, fs, ft, write_t=write_t, arch=arch)


def _pat_shape(config):
    """A batch-128 PAT stage shape that launches with ``config`` (tokens when channel-contiguous, else NCHW)."""
    for c, w in hcl._PAT_STAGES:
        channel_contiguous = config[-1]
        if (*hcl._launch_config(128, c, w, channel_contiguous), channel_contiguous) == config:
            return (128, w * w, c) if channel_contiguous else (128, c, w, w)
    raise AssertionError(f"no PAT stage launches with {config}")


def _vector_rows(fs) -> bool:
    """Whether the streaming loads of ``fs`` can be 8- or 16-byte vectors: its contiguous axis is channels, or
    columns, whose runs are a multiple of 8 bytes long."""
    (_, c, _, w), strides = hcl._as_map(fs)
    return any(strides[axis] == 1 and n * fs.element_size() % 8 == 0 for axis, n in ((1, c), (3, w)))


def _compile_cases():
    """(id, build, expect vectorised global loads). Every configuration of both kernels at the PAT stage shapes
    that launch it: the token (channel-contiguous) ones in bf16 for sm_90, the NCHW ones in fp16 for sm_80 and in
    bf16 for sm_90 (rows of 56 and 28 pixels: vector loads, from the layout's alignment). Then the Swin stage-1
    tokens in fp32 for sm_80 and sm_90 and in fp16 for sm_80, and an aligned fp32 NCHW map (32x32); the
    grad_s-only variant of the backward; mixed student / teacher dtypes (bf16 tokens against fp32, an fp32 map
    against bf16, an fp16 student's grad_s alone against fp32); mixed layouts as PAT feeds them (a channels_last
    bf16 aligner output against an NCHW fp32 / bf16 teacher map; against Swin tokens); a 1x1x1x1 map (every int
    argument becomes a constexpr); every stage of every benchmark pair with the layouts a recorded PAT step gives it."""
    kernels = ("_hcl_fwd_kernel", "_hcl_bwd_kernel")
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    short = {fp32: "fp32", fp16: "fp16", bf16: "bf16"}
    cases = []

    def add(kernel, fs, ft, arch, tag="", **kw):
        types = short[fs.dtype] + ("" if ft.dtype == fs.dtype else f"-{short[ft.dtype]}")
        layout = "".join("c" if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                         and not x.is_contiguous() else "" for x in (fs, ft))
        name = f"{kernel[5:8]}-{_id(fs.shape)}-{types}-sm{arch}{tag}{'-cl' * bool(layout)}"
        name += "".join(f"-{k}" for k in kw)
        cases.append((name, _build(kernel, fs, ft, arch, **kw), _vector_rows(fs) and _vector_rows(ft)))

    for config in hcl.COMPILE_CONFIGS:
        shape = _pat_shape(config)
        for dtype, arch in ((bf16, 90),) if config[-1] else ((fp16, 80), (bf16, 90)):
            for kernel in kernels:
                add(kernel, _meta(shape, dtype), _meta(shape, dtype), arch)
    stage1 = (128, 3136, 96)
    for dtype, arch in ((fp32, 90), (fp32, 80), (fp16, 80)):
        for kernel in kernels:
            add(kernel, _meta(stage1, dtype), _meta(stage1, dtype), arch)
    nchw = (128, 96, 32, 32)
    for kernel in kernels:
        add(kernel, _meta(nchw, fp32), _meta(nchw, fp32), 90)
    add("_hcl_bwd_kernel", _meta(stage1, bf16), _meta(stage1, bf16), 90, write_t=False)
    # Mixed dtypes (issue #11): a bf16 student against an fp32 teacher (tokens, the Swin stage-1 configuration) and
    # the reverse on an NCHW map, each pointer loaded and stored in its own dtype
    for arch in (80, 90):
        for kernel in kernels:
            add(kernel, _meta(stage1, bf16), _meta(stage1, fp32), arch)
            add(kernel, _meta(nchw, fp32), _meta(nchw, bf16), arch)
    add("_hcl_bwd_kernel", _meta(stage1, fp16), _meta(stage1, fp32), 80, write_t=False)
    # Mixed layouts, as a PAT step on a GPU feeds them: the aligners' channels_last bf16 maps against a ConvNeXt /
    # ResNet teacher's NCHW maps (fp32 or bf16) at the stage-1 and stage-2 shapes, and against Swin-T's tokens
    for kernel in kernels:
        for shape in ((128, 96, 56, 56), (128, 192, 28, 28)):
            for dtype_t in (fp32, bf16):
                add(kernel, _meta(shape, bf16, "channels_last"), _meta(shape, dtype_t), 90)
        add(kernel, _meta((128, 96, 56, 56), bf16, "channels_last"),
            _meta((128, 96, 56, 56), bf16, "channels_last"), 90)
    # C = H = W = 1 and every stride 1: the JIT turns all of them into constexprs (plain Python ints in the kernel)
    for kernel in kernels:
        add(kernel, _meta((1, 1, 1, 1), fp32), _meta((1, 1, 1, 1), fp32), 90)
    # Every stage of every benchmark pair as a recorded PAT step feeds it (patfast/bench/step_layouts.json: dtypes,
    # strides, offsets), at batch 128 on sm_90
    for pair, layouts in step_layouts.load().items():
        for i, (s, t) in enumerate(layouts.hcl):
            for kernel in kernels:
                add(kernel, s.empty(128, "meta"), t.empty(128, "meta"), 90, tag=f"-{pair}-stage{i + 1}")
    return cases


COMPILE_CASES = _compile_cases()


def _copy_widths(ptx: str) -> set[int]:
    """Bytes per thread of the global loads in ``ptx``: cp.async copies (global -> shared, the pipelined loads) and
    the vector loads (ld.global.v2 / .v4 of 32-bit words)."""
    widths = {int(n, 0) for n in re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*,\s*(0x[0-9a-f]+|\d+)\s*[,;]", ptx)}
    return widths | {4 * int(n) for n in re.findall(r"ld\.global[.\w]*\.v([24])\.b32", ptx)}


MAX_REGISTERS = 128  # per thread: at 8 warps, 2 programs resident per SM (65536 registers)


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton.backends.nvidia")

    return dict(zip([c[0] for c in COMPILE_CASES], compile_kernels([c[1] for c in COMPILE_CASES])))


@pytest.mark.parametrize(("name", "build", "vectorised"), COMPILE_CASES, ids=[c[0] for c in COMPILE_CASES])
def test_compiles_for_sm80_and_sm90(name, build, vectorised, compiled):
    asm = compiled[name]
    ptx = asm["ptx"]
    assert f".target sm_{build['arch']}" in ptx and ".entry" in ptx
    assert len(asm["cubin"]) > 0
    if vectorised:  # the streaming loads of the inputs are pipelined 8- or 16-byte vector copies
        assert _copy_widths(ptx) & {8, 16}, sorted(set(re.findall(r"ld\.global[.\w]*", ptx)))
        assert "cp.async.commit_group" in ptx, "the row loop is not software-pipelined"
    if vectorised and name.startswith("bwd"):
        assert re.search(r"st\.global[.\w]*\.v[24]\.", ptx), "gradient stores are not vectorised"
    mixed = re.search(r"-(bf16|fp16)-fp32-|-fp32-(bf16|fp16)-", name)
    if mixed:  # the 16-bit side is widened in registers, its gradient rounded to nearest even
        half = (mixed.group(1) or mixed.group(2)).replace("fp", "f")
        assert f"cvt.f32.{half}" in ptx
        if name.startswith("bwd"):
            assert re.search(rf"cvt\.rn\.{half}(x2)?\.f32", ptx), "16-bit gradient not rounded to nearest"
    usage = resource_usage(asm["cubin"])
    if usage is not None:  # every build: nothing spills, registers within the bound
        assert max(u["STACK"] for u in usage) == 0, f"register spills: {usage}"
        assert max(u["REG"] for u in usage) <= MAX_REGISTERS, f"registers: {usage}"


def test_compile_configs_cover_the_pat_stages():
    # The compile-only tests build exactly the configurations the PAT stages launch with at batch 128.
    launched = {(*hcl._launch_config(128, c, w, cc), cc) for c, w in hcl._PAT_STAGES for cc in (True, False)}
    assert launched == set(hcl.COMPILE_CONFIGS)
    assert all(math.prod(cfg[:2]) <= hcl._TILE for cfg in launched)


# ----------------------------------------------------------------------------------------------------------------
# GPU only (run by benchmarks/gpu_check.sh: pytest -m gpu)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES_BF16_GPU, ids=_id)
def test_gpu_bfloat16_error_at_most_twice_torch(shape, seed):
    fs, ft = _pair(shape, seed, torch.bfloat16, torch.device("cuda"))
    scale = _scalar(seed)
    _assert_within_2x_torch(torch.bfloat16, fs, ft, scale, *_run(_triton_hcl, fs, ft, scale))


@pytest.mark.gpu
def test_gpu_swin_stages_match_reference(seed):
    shapes = [(4, 3136, 96), (4, 784, 192), (4, 196, 384), (4, 49, 768)]
    pairs = [_pair(s, seed + i, device=torch.device("cuda")) for i, s in enumerate(shapes)]
    feats_s = [p[0].requires_grad_() for p in pairs]
    feats_t = [p[1].requires_grad_() for p in pairs]
    loss = hcl.hcl_loss_stages(feats_s, feats_t)
    grads = torch.autograd.grad(loss * 2.0, feats_s + feats_t)
    truths = [_truth(s, t, 2.0) for s, t in zip(feats_s, feats_t)]
    torch.testing.assert_close(loss.double().cpu(), sum(t[0] for t in truths), rtol=1e-5, atol=0)
    for got, want in zip(grads, [t[1] for t in truths] + [t[2] for t in truths]):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("via", ["ops", "kernel"])
def test_gpu_torch_compile_fullgraph(via, seed):
    fn = (lambda s, t: ops.hcl_loss(s, t)) if via == "ops" else hcl.hcl_loss  # ops: backend "auto" -> Triton on CUDA

    def step(s, t):
        return fn(s, t) * 2.0

    compiled = torch.compile(step, fullgraph=True)
    fs, ft = _pair((4, 196, 384), seed, torch.bfloat16, torch.device("cuda"))
    got = _run(compiled, fs.clone(), ft.clone(), 1.0)
    want = _run(step, fs.clone(), ft.clone(), 1.0)
    for g, w in zip(got, want):  # same kernels; only the sum of the partials may be reordered by Inductor
        torch.testing.assert_close(g, w, rtol=1e-6, atol=0)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_forward_and_backward(seed):
    cuda = torch.device("cuda")
    fs, ft = _pair((4, 784, 192), seed, torch.bfloat16, cuda)
    fs.requires_grad_()
    ft.requires_grad_()

    def step():
        loss = ops.hcl_loss(fs, ft)
        gs, gt = torch.autograd.grad(loss * 2.0, (fs, ft))
        return loss, gs, gt

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile and warm up outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    new_s, new_t = _pair((4, 784, 192), seed + 7, torch.bfloat16, cuda)
    with torch.no_grad():
        fs.copy_(new_s)
        ft.copy_(new_t)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(static_out, step()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
