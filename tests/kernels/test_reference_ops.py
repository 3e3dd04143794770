"""The eager reference ops (patfast.kernels.reference) and their public dispatch (patfast.ops).

Every expected value comes from an independent oracle written here (explicit loops, hand-written formulas,
SPEC section 2's analytic gradient), never from the code under test.
"""

import math

import pytest
import torch

from patfast import ops
from patfast.kernels import reference

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(_small_threads):
    # Tiny float64 tensors gain nothing from a second intra-op thread, and on a busy 2-core machine waking it costs
    # milliseconds per op (gradcheck runs thousands of ops). Runs after conftest's fixture, restores its setting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, dtype=F64, scale=1.0, requires_grad=False):
    x = torch.randn(*shape, generator=_gen(seed), dtype=dtype) * scale
    return x.requires_grad_(requires_grad)


# ----------------------------------------------------------------------------------------------------------------
# Independent oracles
# ----------------------------------------------------------------------------------------------------------------


def _bins(size, level):
    """Adaptive-pool bins along one axis, SPEC section 2: bin i covers [floor(i*S/l), ceil((i+1)*S/l))."""
    return [((i * size) // level, -((-(i + 1) * size) // level)) for i in range(level)]


def _levels(height):
    """(level, weight) pairs used by HCL: levels 4, 2, 1 with level < height; weights 1/2, 1/4, ... in order."""
    used, weight = [], 1.0
    for level in (4, 2, 1):
        if level < height:
            weight /= 2
            used.append((level, weight))
    return used


def _pool_naive(x, level):
    """(B, C, H, W) -> (B, C, level, level) by averaging each explicit bin."""
    b, c, h, w = x.shape
    out = torch.empty(b, c, level, level, dtype=x.dtype)
    for i, (r0, r1) in enumerate(_bins(h, level)):
        for j, (c0, c1) in enumerate(_bins(w, level)):
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].sum(dim=(2, 3)) / ((r1 - r0) * (c1 - c0))
    return out


def _hcl_naive(fs, ft):
    """HCL of two (B, C, H, W) maps, from SPEC section 2 with explicit bins."""
    loss = ((fs - ft) ** 2).sum() / fs.numel()
    total = 1.0
    for level, weight in _levels(fs.shape[2]):
        diff = _pool_naive(fs, level) - _pool_naive(ft, level)
        loss = loss + weight * (diff**2).sum() / diff.numel()
        total += weight
    return loss / total


def _tokens_from_map_naive(m):
    """(B, C, h, w) map -> (B, h*w, C) tokens with token r*w + c = pixel (r, c), by an explicit loop."""
    b, c, h, w = m.shape
    tokens = torch.empty(b, h * w, c, dtype=m.dtype)
    for r in range(h):
        for col in range(w):
            tokens[:, r * w + col, :] = m[:, :, r, col]
    return tokens


def _hcl_grad_naive(fs, ft):
    """dL/dfs of HCL by SPEC section 2's one-pass formula (dL/dft is its negative)."""
    b, c, h, w = fs.shape
    grad = 2 * (fs - ft) / fs.numel()
    total = 1.0
    for level, weight in _levels(h):
        ps, pt = _pool_naive(fs, level), _pool_naive(ft, level)
        n_level = b * c * level * level
        for i, (r0, r1) in enumerate(_bins(h, level)):
            for j, (c0, c1) in enumerate(_bins(w, level)):
                area = (r1 - r0) * (c1 - c0)
                term = weight * 2 * (ps[:, :, i, j] - pt[:, :, i, j]) / (n_level * area)
                grad[:, :, r0:r1, c0:c1] += term[:, :, None, None]
        total += weight
    return grad / total


def _kd_naive(s, t, temperature):
    """sum_k p_t (log p_t - log p_s), mean over the batch, times T^2, with softmax written out by hand."""
    zs, zt = s / temperature, t / temperature
    zs = zs - zs.max(dim=1, keepdim=True).values
    zt = zt - zt.max(dim=1, keepdim=True).values
    log_p_s = zs - torch.log(torch.exp(zs).sum(dim=1, keepdim=True))
    log_p_t = zt - torch.log(torch.exp(zt).sum(dim=1, keepdim=True))
    p_t = torch.exp(log_p_t)
    return (p_t * (log_p_t - log_p_s)).sum() / s.shape[0] * temperature**2


def _raa_naive(tokens, nw, nb, qw, qb, kvw, kvb, pos, num_heads, eps=1e-5):
    """Per-sample, per-head loop with explicit matmuls."""
    b, n, d = tokens.shape
    hd = d // num_heads
    out = torch.empty_like(tokens)
    for i in range(b):
        x = tokens[i]
        mu = x.sum(dim=1, keepdim=True) / d
        var = ((x - mu) ** 2).sum(dim=1, keepdim=True) / d
        xn = (x - mu) / torch.sqrt(var + eps) * nw + nb
        p = pos[i if pos.shape[0] > 1 else 0].expand(n, d)
        q = xn @ qw.T + qb + p
        kv = xn @ kvw.T + kvb
        k = kv[:, :d] + p
        v = kv[:, d:]
        for h in range(num_heads):
            sl = slice(h * hd, (h + 1) * hd)
            scores = (q[:, sl] @ k[:, sl].T) / math.sqrt(hd)
            out[i, :, sl] = torch.softmax(scores, dim=-1) @ v[:, sl]
    return out


def _raa_params(d, seed, dtype=F64, requires_grad=False):
    """norm_weight, norm_bias, q_weight, q_bias, kv_weight, kv_bias as a dict of random tensors."""
    g = _gen(seed)
    params = dict(
        norm_weight=1.0 + 0.5 * torch.randn(d, generator=g, dtype=dtype),
        norm_bias=0.1 * torch.randn(d, generator=g, dtype=dtype),
        q_weight=d**-0.5 * torch.randn(d, d, generator=g, dtype=dtype),
        q_bias=0.1 * torch.randn(d, generator=g, dtype=dtype),
        kv_weight=d**-0.5 * torch.randn(2 * d, d, generator=g, dtype=dtype),
        kv_bias=0.1 * torch.randn(2 * d, generator=g, dtype=dtype),
    )
    return {k: v.requires_grad_(requires_grad) for k, v in params.items()}


def _pos(layout, b, n, d, seed, dtype=F64, requires_grad=False):
    shape = (1, n, d) if layout == "paper" else (b, 1, d)
    return _randn(*shape, seed=seed, dtype=dtype, scale=0.5, requires_grad=requires_grad)


def _shape_id(shape):
    return "x".join(map(str, shape))


def test_oracle_bins_match_spec_example():
    # SPEC section 2, literally: "For 7 -> 4: [0,2) [1,4) [3,6) [5,7)".
    assert _bins(7, 4) == [(0, 2), (1, 4), (3, 6), (5, 7)]
    assert _bins(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert _bins(2, 4) == [(0, 1), (0, 1), (1, 2), (1, 2)]


# ----------------------------------------------------------------------------------------------------------------
# HCL
# ----------------------------------------------------------------------------------------------------------------

HCL_MAP_SHAPES = [
    (3, 2, 7, 7),  # 7 -> 4 overlapping bins, 7 -> 2 overlapping ([0,4) [3,7))
    (3, 2, 9, 9),
    (3, 2, 6, 10),  # non-square: each axis pooled with its own size
    (3, 2, 10, 6),
    (3, 2, 1, 5),  # h = 1: no pooled level
    (3, 2, 2, 8),  # h = 2: level 1 only, although W = 8 would allow more (the rule reads the height)
    (3, 2, 4, 4),  # h = 4: levels 2, 1
    (3, 2, 4, 7),
    (3, 2, 8, 3),  # h = 8: all levels although W = 3 < 4 (the width is stretched: bins repeat columns)
    (3, 2, 14, 14),
]


@pytest.mark.parametrize("shape", HCL_MAP_SHAPES, ids=_shape_id)
def test_hcl_maps_match_naive_oracle(shape):
    fs = _randn(*shape, seed=1)
    ft = _randn(*shape, seed=2, scale=1.5) + 0.3
    expected = _hcl_naive(fs, ft)
    torch.testing.assert_close(reference.hcl_loss_ref(fs, ft), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(ops.hcl_loss(fs, ft, backend="reference"), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize(("height", "normaliser"), [(1, 1.0), (2, 1.5), (4, 1.75), (7, 1.875), (14, 1.875)])
def test_hcl_level_skip_and_normaliser(height, normaliser):
    # The difference d = a(b, c, row) * (-1)^col has zero mean over every pooled bin (W = 8: every level-4, -2, -1
    # bin spans an even number of whole columns), so every pooled term vanishes and loss = mean(d^2) / normaliser
    # exactly. Using a pooled level that should be skipped (e.g. level 4 at h = 4) changes the normaliser.
    b, c, w = 3, 2, 8
    a = _randn(b, c, height, 1, seed=3) + 2.0
    sign = torch.tensor([(-1.0) ** col for col in range(w)], dtype=F64)
    d = a * sign
    fs = _randn(b, c, height, w, seed=4)
    ft = fs - d
    for level, _ in _levels(height):
        assert _pool_naive(d, level).abs().max() < 1e-12
    assert 1 + sum(weight for _, weight in _levels(height)) == normaliser
    expected = (a**2).mean() / normaliser
    torch.testing.assert_close(reference.hcl_loss_ref(fs, ft), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize(("h", "w"), [(14, 14), (3, 4), (4, 5), (7, 7)])
def test_hcl_tokens_are_the_transposed_map(h, w):
    # (B, L, C) tokens with token r*w + c = pixel (r, c) of a (B, C, h, w) map; L = 196 is the ViT/Mixer case.
    b, c = 3, 5
    ms = _randn(b, c, h, w, seed=5)
    mt = _randn(b, c, h, w, seed=6)
    ts, tt = _tokens_from_map_naive(ms), _tokens_from_map_naive(mt)
    assert math.isqrt(h * w) == h  # the map height is floor(sqrt(L)) for these shapes
    torch.testing.assert_close(reference.tokens_to_map(ts), ms, rtol=0, atol=0)
    torch.testing.assert_close(reference.hcl_loss_ref(ts, tt), _hcl_naive(ms, mt), rtol=1e-12, atol=0)
    torch.testing.assert_close(ops.hcl_loss(ts, tt), _hcl_naive(ms, mt), rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(3, 2, 7, 7), (2, 3, 6, 10), (2, 2, 4, 5)], ids=_shape_id)
def test_hcl_gradient_matches_spec_formula(shape):
    fs = _randn(*shape, seed=7, requires_grad=True)
    ft = _randn(*shape, seed=8, requires_grad=True)
    (2.0 * reference.hcl_loss_ref(fs, ft)).backward()  # grad_output != 1
    expected = 2.0 * _hcl_grad_naive(fs.detach(), ft.detach())
    torch.testing.assert_close(fs.grad, expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ft.grad, -expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("shape", [(3, 2, 7, 7), (3, 2, 5, 3), (3, 12, 2), (3, 49, 2)], ids=_shape_id)
def test_hcl_gradcheck(shape):
    fs = _randn(*shape, seed=9, requires_grad=True)
    ft = _randn(*shape, seed=10, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.hcl_loss(a, b, backend="reference"), (fs, ft))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hcl_upcast(dtype):
    fs64 = _randn(3, 4, 7, 7, seed=11)
    ft64 = _randn(3, 4, 7, 7, seed=12)
    fs, ft = fs64.to(dtype), ft64.to(dtype)
    truth = _hcl_naive(fs.double(), ft.double())  # same rounded inputs, exact arithmetic
    up = reference.hcl_loss_ref(fs, ft, upcast=True)
    plain = reference.hcl_loss_ref(fs, ft)
    assert up.dtype == torch.float32 and plain.dtype == dtype
    torch.testing.assert_close(up.double(), truth, rtol=1e-5, atol=0)
    torch.testing.assert_close(plain.double(), truth, rtol=2e-2, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# KD
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_matches_explicit_composition_and_analytic_grads(temperature):
    b, k = 3, 41
    s = _randn(b, k, seed=13, scale=2.0, requires_grad=True)
    t = _randn(b, k, seed=14, scale=3.0, requires_grad=True)
    loss = ops.kd_loss(s, t, temperature, backend="reference")
    torch.testing.assert_close(loss, _kd_naive(s.detach(), t.detach(), temperature), rtol=1e-12, atol=0)

    (2.0 * loss).backward()  # grad_output != 1
    with torch.no_grad():
        log_p_s = torch.log(torch.exp(s / temperature) / torch.exp(s / temperature).sum(1, keepdim=True))
        log_p_t = torch.log(torch.exp(t / temperature) / torch.exp(t / temperature).sum(1, keepdim=True))
        p_s, p_t = log_p_s.exp(), log_p_t.exp()
        kl_per_row = (p_t * (log_p_t - log_p_s)).sum(1, keepdim=True)
        # L = T^2/B sum_b KL_b;  dKL_b/ds = (p_s - p_t)/T;  dKL_b/dt = p_t (log p_t - log p_s - KL_b)/T
        grad_s = 2.0 * temperature / b * (p_s - p_t)
        grad_t = 2.0 * temperature / b * p_t * (log_p_t - log_p_s - kl_per_row)
    torch.testing.assert_close(s.grad, grad_s, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(t.grad, grad_t, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_gradcheck(temperature):
    s = _randn(3, 41, seed=15, requires_grad=True)
    t = _randn(3, 41, seed=16, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.kd_loss(a, b, temperature, backend="reference"), (s, t))


def test_kd_of_identical_logits_is_zero_and_upcast_dtype():
    s = _randn(3, 41, seed=17)
    assert reference.kd_loss_ref(s, s.clone(), 4.0).abs() < 1e-15
    s16, t16 = s.to(torch.bfloat16), _randn(3, 41, seed=18).to(torch.bfloat16)
    up = reference.kd_loss_ref(s16, t16, 2.0, upcast=True)
    assert up.dtype == torch.float32 and reference.kd_loss_ref(s16, t16, 2.0).dtype == torch.bfloat16
    torch.testing.assert_close(up.double(), _kd_naive(s16.double(), t16.double(), 2.0), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# RAA
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["paper", "official"])
@pytest.mark.parametrize(("n", "num_heads"), [(64, 8), (36, 8), (36, 4)])
def test_raa_matches_naive_loop(layout, n, num_heads):
    b, d = 3, 64
    tokens = _randn(b, n, d, seed=19, scale=2.0) + 0.5
    params = _raa_params(d, seed=20)
    pos = _pos(layout, b, n, d, seed=21)
    expected = _raa_naive(tokens, *params.values(), pos, num_heads)
    out = ops.raa_attention(tokens, **params, pos=pos, num_heads=num_heads, backend="reference")
    assert out.shape == (b, n, d)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    # float32 (the dtype the training runs in without autocast) against the float64 oracle
    out32 = reference.raa_attention_ref(tokens.float(), *(p.float() for p in params.values()), pos.float(), num_heads)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["paper", "official"])
def test_raa_gradcheck_all_seven_inputs(layout):
    b, n, d, num_heads = 3, 5, 8, 2
    tokens = _randn(b, n, d, seed=22, requires_grad=True)
    params = _raa_params(d, seed=23, requires_grad=True)
    pos = _pos(layout, b, n, d, seed=24, requires_grad=True)
    inputs = (tokens, *params.values(), pos)
    assert len(inputs) == 8  # tokens, norm w/b, q w/b, kv w/b, pos

    def fn(x, nw, nb, qw, qb, kvw, kvb, p):
        return ops.raa_attention(x, nw, nb, qw, qb, kvw, kvb, p, num_heads, backend="reference")

    assert torch.autograd.gradcheck(fn, inputs)


def test_raa_upcast_returns_tokens_dtype():
    b, n, d = 2, 16, 32
    tokens = _randn(b, n, d, seed=25).to(torch.bfloat16)
    params = {k: v.to(torch.bfloat16) for k, v in _raa_params(d, seed=26).items()}
    pos = _pos("paper", b, n, d, seed=27).to(torch.bfloat16)
    expected = _raa_naive(tokens.double(), *(p.double() for p in params.values()), pos.double(), 4)
    up = reference.raa_attention_ref(tokens, *params.values(), pos, 4, upcast=True)
    assert up.dtype == torch.bfloat16
    torch.testing.assert_close(up.double(), expected, rtol=1e-2, atol=1e-2)


def test_raa_batch_permutation_paper_vs_official():
    # Paper layout (1, N, D): the op acts per sample, so permuting the batch permutes the output.
    # Official layout (B, 1, D): sample b gets the bias pos[b] on its queries and keys; the key bias changes the
    # attention weights, so a sample's output depends on its place in the batch.
    b, n, d, num_heads = 4, 16, 32, 4
    tokens = _randn(b, n, d, seed=28)
    params = _raa_params(d, seed=29)
    perm = torch.tensor([2, 0, 3, 1])

    def run(x, pos):
        return ops.raa_attention(x, **params, pos=pos, num_heads=num_heads, backend="reference")

    pos_paper = _pos("paper", b, n, d, seed=30)
    torch.testing.assert_close(run(tokens[perm], pos_paper), run(tokens, pos_paper)[perm], rtol=1e-12, atol=1e-12)

    pos_official = _pos("official", b, n, d, seed=31, dtype=F64) * 4.0
    moved = run(tokens[perm], pos_official)
    assert (moved - run(tokens, pos_official)[perm]).abs().max() > 1e-2
    # ... and the difference is exactly the per-sample bias travelling with (or not with) the sample:
    torch.testing.assert_close(moved, run(tokens, pos_official[perm.argsort()])[perm], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch and validation
# ----------------------------------------------------------------------------------------------------------------


def _op_calls():
    """(op name, callable taking backend=...) for one small valid input of each op, float32 on the CPU."""
    fs, ft = _randn(3, 2, 7, 7, seed=40, dtype=torch.float32), _randn(3, 2, 7, 7, seed=41, dtype=torch.float32)
    s, t = _randn(3, 41, seed=42, dtype=torch.float32), _randn(3, 41, seed=43, dtype=torch.float32)
    tokens = _randn(3, 36, 64, seed=44, dtype=torch.float32)
    params = _raa_params(64, seed=45, dtype=torch.float32)
    pos = _pos("official", 3, 36, 64, seed=46, dtype=torch.float32)
    return {
        "hcl_loss": (lambda **kw: ops.hcl_loss(fs, ft, **kw), lambda: reference.hcl_loss_ref(fs, ft)),
        "kd_loss": (lambda **kw: ops.kd_loss(s, t, 4.0, **kw), lambda: reference.kd_loss_ref(s, t, 4.0)),
        "raa_attention": (
            lambda **kw: ops.raa_attention(tokens, **params, pos=pos, num_heads=8, **kw),
            lambda: reference.raa_attention_ref(tokens, *params.values(), pos, 8),
        ),
    }


OP_NAMES = ["hcl_loss", "kd_loss", "raa_attention"]


@pytest.mark.parametrize("op", OP_NAMES)
def test_auto_on_cpu_is_the_reference_exactly(op):
    call, ref = _op_calls()[op]
    expected = ref()
    assert torch.equal(call(), expected)
    assert torch.equal(call(backend="auto"), expected)
    assert torch.equal(call(backend="reference"), expected)


@pytest.mark.parametrize("op", OP_NAMES)
def test_triton_backend_without_a_kernel_raises(op, monkeypatch):
    monkeypatch.delitem(ops._TRITON_TARGETS, op)  # every op has a kernel now: test the rule on an unregistered one
    monkeypatch.delitem(ops._TRITON_IMPLS, op, raising=False)
    call, _ = _op_calls()[op]
    with pytest.raises(NotImplementedError, match="has no Triton kernel"):
        call(backend="triton")


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("backend", ["cuda", "Reference", "", "torch"])
def test_unknown_backend_raises_value_error_naming_the_choices(op, backend):
    call, _ = _op_calls()[op]
    with pytest.raises(ValueError, match=r"unknown backend .*'auto', 'reference', 'triton'"):
        call(backend=backend)


def test_auto_picks_a_registered_triton_kernel_only_for_cuda_tensors(monkeypatch):
    # A fake registration: the selection rule is tested without a GPU or a real kernel.
    def fake_kernel(*args):
        return "triton"

    monkeypatch.setitem(ops._TRITON_IMPLS, "kd_loss", fake_kernel)
    monkeypatch.setitem(ops._TRITON_IMPLS, "raa_attention", fake_kernel)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert ops._select("kd_loss", "auto", cpu) is reference.kd_loss_ref
    assert ops._select("kd_loss", "auto", cuda) is fake_kernel
    assert ops._select("kd_loss", "reference", cuda) is reference.kd_loss_ref
    assert ops._select("kd_loss", "triton", cpu) is fake_kernel  # explicit: also CPU (TRITON_INTERPRET=1)
    assert ops._select("raa_attention", "auto", cuda) is fake_kernel  # registered (issue #4)
    monkeypatch.delitem(ops._TRITON_TARGETS, "raa_attention")
    monkeypatch.delitem(ops._TRITON_IMPLS, "raa_attention")
    assert ops._select("raa_attention", "auto", cuda) is reference.raa_attention_ref  # not registered
    assert ops._select("kd_loss", "auto", cuda, torch.float64) is reference.kd_loss_ref  # kernels: fp32/16-bit
    assert ops._select("kd_loss", "auto", cuda, torch.bfloat16, torch.float32) is fake_kernel  # mixed kernel dtypes
    assert ops._select("kd_loss", "auto", cuda, torch.float32, torch.float64) is reference.kd_loss_ref  # any float64
    s = _randn(3, 41, seed=47, dtype=torch.float32)
    assert ops.kd_loss(s, s, backend="triton") == "triton"


def test_without_triton_auto_is_the_reference_and_triton_says_why(monkeypatch):
    # What patfast.ops decided at import when triton is not importable: no implementations, and the reason.
    monkeypatch.setattr(ops, "_TRITON_IMPLS", {})
    monkeypatch.setattr(ops, "_TRITON_MISSING", "triton is not installed")
    cuda = torch.device("cuda", 0)
    for op in ops.triton_ops():
        assert ops._select(op, "auto", cuda, torch.float32) is ops._REFERENCE_IMPLS[op]
        with pytest.raises(ImportError, match=f"{op}: backend='triton' is not available: triton is not installed"):
            ops._select(op, "triton", cuda, torch.float32)


def _bad_calls():
    x = torch.randn(3, 2, 7, 7)
    tok = torch.randn(3, 36, 64)
    p = _raa_params(64, seed=48, dtype=torch.float32)
    pos = torch.randn(1, 36, 64)

    def raa(tokens=tok, pos=pos, num_heads=8, **over):
        return lambda: ops.raa_attention(tokens, **{**p, **over}, pos=pos, num_heads=num_heads)

    return [
        ("hcl-shape", lambda: ops.hcl_loss(x, x[:, :1]), r"same shape.*\(3, 2, 7, 7\).*\(3, 1, 7, 7\)"),
        ("hcl-rank2", lambda: ops.hcl_loss(x[0, 0], x[0, 0]), r"\(B, C, H, W\) maps or \(B, L, C\) tokens.*rank-2"),
        ("hcl-rank5", lambda: ops.hcl_loss(x[None], x[None]), "rank-5"),
        ("hcl-empty", lambda: ops.hcl_loss(x[:0], x[:0]), "empty"),
        ("hcl-cls-token", lambda: ops.hcl_loss(torch.randn(2, 197, 8), torch.randn(2, 197, 8)), "class token"),
        ("kd-shape", lambda: ops.kd_loss(torch.randn(3, 41), torch.randn(3, 40)), r"same shape.*\(3, 41\).*\(3, 40\)"),
        ("kd-rank3", lambda: ops.kd_loss(torch.randn(3, 4, 5), torch.randn(3, 4, 5)), r"\(B, num_classes\)"),
        ("kd-temperature", lambda: ops.kd_loss(torch.randn(3, 4), torch.randn(3, 4), 0.0), "temperature"),
        ("raa-rank2", raa(tokens=tok[0]), r"\(B, N, D\)"),
        ("raa-heads", raa(num_heads=5), "D = 64 must be divisible by num_heads.*5"),
        ("raa-kv-weight", raa(kv_weight=torch.randn(64, 64)), r"kv_weight must have shape \(128, 64\)"),
        ("raa-pos", raa(pos=torch.randn(3, 36, 32)), r"pos must be broadcastable to \(B, N, D\)"),
        ("raa-pos-batch", raa(pos=torch.randn(2, 1, 64)), r"\(3, 1, 64\) \(official\)"),
    ]


@pytest.mark.parametrize(("call", "match"), [c[1:] for c in _bad_calls()], ids=[c[0] for c in _bad_calls()])
def test_validation_errors_are_clear_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_valid_token_shapes_and_layouts_pass_validation():
    ops.hcl_loss(torch.randn(2, 12, 3), torch.randn(2, 12, 3))  # h = 3, w = 4
    tok = torch.randn(3, 36, 64)
    p = _raa_params(64, seed=49, dtype=torch.float32)
    for pos in (torch.randn(1, 36, 64), torch.randn(3, 1, 64), torch.randn(3, 36, 64), torch.randn(1, 1, 64)):
        assert ops.raa_attention(tok, **p, pos=pos, num_heads=8).shape == (3, 36, 64)
