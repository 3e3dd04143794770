"""Region-Aware Attention and the aligners (SPEC section 3), checked against SPEC's table and formulas written here."""

import math

import pytest
import torch
import torch.nn.functional as F

from patfast import ops
from patfast.distill.aligners import MapAligner, TokenAligner, stage_aligner
from patfast.distill.raa import RegionAwareAttention, StageProjector, sinusoid_table
from patfast.models.stages import StageShape


def _nearest(x, size):
    """Nearest resize by index, written out: output pixel j reads input pixel floor(j * in / out)."""
    h, w = x.shape[-2:]
    rows = (torch.arange(size) * h) // size
    cols = (torch.arange(size) * w) // size
    return x[:, :, rows][:, :, :, cols]


def _to_tokens(m):
    return m.flatten(2).transpose(1, 2)


# SPEC section 3's projector table, plus the small stages met at 32-64 px (H < grid: resized up to the 4x4 grid)
@pytest.mark.parametrize("height, patch, size", [(56, 14, 56), (28, 7, 28), (14, 4, 16), (7, 2, 8),
                                                 (4, 1, 4), (2, 1, 4), (1, 1, 4)])
@pytest.mark.parametrize("kind", ["map", "tokens"])
def test_projector_patch_size_and_resize(kind, height, patch, size):
    c, d = 6, 32
    proj = StageProjector(StageShape(kind, c, height, height), d, grid=4)
    assert proj.proj.kernel_size == (patch, patch) and proj.proj.stride == (patch, patch)
    assert proj.proj.in_channels == c and proj.proj.out_channels == d and proj.proj.bias is not None
    x = torch.randn(3, c, height, height)
    out = proj(x if kind == "map" else _to_tokens(x))
    assert out.shape == (3, 16, d)
    expected = F.conv2d(_nearest(x, size), proj.proj.weight, proj.proj.bias, stride=patch)  # (3, d, 4, 4)
    torch.testing.assert_close(out, _to_tokens(expected), rtol=1e-5, atol=1e-5)


def test_projector_resize_14_to_16_and_7_to_8_duplicate_the_right_rows():
    # nearest 14 -> 16 repeats input rows 6 and 13 (output rows 7 and 15); 7 -> 8 repeats row 6 (output row 7)
    assert ((torch.arange(16) * 14) // 16).tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7, 7, 8, 9, 10, 11, 12, 13]
    assert ((torch.arange(8) * 7) // 8).tolist() == [0, 0, 1, 2, 3, 4, 5, 6]
    for h, size in [(14, 16), (7, 8)]:
        x = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1).expand(1, 1, h, h)
        assert torch.equal(F.interpolate(x, size=(size, size), mode="nearest"), _nearest(x, size))


def _sinusoid(length, dim):
    """SPEC section 6: enc[pos, 2i] = sin(pos * 10000^(-2i/d)), enc[pos, 2i+1] = cos(same)."""
    t = torch.zeros(length, dim, dtype=torch.float64)
    for pos in range(length):
        for i in range(dim // 2):
            a = pos * 10000 ** (-2 * i / dim)
            t[pos, 2 * i] = math.sin(a)
            t[pos, 2 * i + 1] = math.cos(a)
    return t


def test_sinusoid_table_formula():
    table = sinusoid_table(5000, 512)
    assert table.shape == (5000, 512)
    for pos in (0, 1, 7, 63, 4999):
        for i in (0, 1, 10, 100, 255):
            a = pos * 10000 ** (-2 * i / 512)
            assert abs(table[pos, 2 * i].item() - math.sin(a)) < 1e-6
            assert abs(table[pos, 2 * i + 1].item() - math.cos(a)) < 1e-6
    torch.testing.assert_close(sinusoid_table(70, 64).double(), _sinusoid(70, 64), rtol=0, atol=1e-6)


def test_sinusoid_table_in_float32_arithmetic():
    # the official variant's table: the same formula in float32 arithmetic (the authors'), so close to the float64
    # table where RAA reads it (rows < 1024: batch indices or 64 tokens) but not the same bits
    exact, official = sinusoid_table(5000, 512), sinusoid_table(5000, 512, float32_arith=True)
    assert official.dtype == torch.float32 and not torch.equal(exact, official)
    truth = _sinusoid(64, 512)
    assert (official[:64].double() - truth).abs().max() < 1e-5
    assert (exact[:64].double() - truth).abs().max() <= 6e-8  # half a float32 step at |x| <= 1
    assert (official[:1024] - exact[:1024]).abs().max() < 1e-4


def _stage_shapes():
    return [StageShape("map", 8, 16, 16), StageShape("map", 16, 8, 8), StageShape("tokens", 24, 4, 4),
            StageShape("map", 32, 2, 2)]


def _stage_feats(b=3):
    return [torch.randn(b, 8, 16, 16), torch.randn(b, 16, 8, 8), torch.randn(b, 16, 24), torch.randn(b, 32, 2, 2)]


def _attention(tokens, raa, pos):
    """SPEC section 3 written with torch's own scaled_dot_product_attention (scale = head_dim^-0.5)."""
    b, n, d = tokens.shape
    h = raa.num_heads
    xn = F.layer_norm(tokens, (d,), raa.norm.weight, raa.norm.bias, 1e-5)
    q = xn @ raa.q.weight.T + raa.q.bias + pos
    kv = xn @ raa.kv.weight.T + raa.kv.bias
    k, v = kv[..., :d] + pos, kv[..., d:]

    def heads(t):
        return t.reshape(b, n, h, d // h).transpose(1, 2)

    o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    return o.transpose(1, 2).reshape(b, n, d)


def test_raa_defaults():
    raa = RegionAwareAttention(_stage_shapes())
    assert raa.queries == 16 and raa.num_heads == 8
    assert raa.norm.normalized_shape == (512,)
    assert raa.q.weight.shape == (512, 512) and raa.q.bias is not None
    assert raa.kv.weight.shape == (1024, 512) and raa.kv.bias is not None
    out = raa(_stage_feats(2))
    assert [tuple(o.shape) for o in out] == [(2, 16, 512)] * 4


@pytest.mark.parametrize("official", [False, True])
def test_raa_concatenates_stage_major_and_attends_as_spec_says(monkeypatch, official):
    raa = RegionAwareAttention(_stage_shapes(), dim=64, num_heads=8, pos_by_batch_index=official)
    with torch.no_grad():
        raa.norm.weight.normal_()
        raa.norm.bias.normal_()
    feats = _stage_feats(3)
    seen = {}
    real = ops.raa_attention

    def spy(tokens, *args, **kw):
        seen["tokens"], seen["pos"] = tokens, args[6]
        return real(tokens, *args, **kw)

    monkeypatch.setattr(ops, "raa_attention", spy)
    out = raa(feats)
    tokens = seen["tokens"]
    assert tokens.shape == (3, 64, 64)
    for i in range(4):  # tokens 16i..16i+15 = stage i+1
        assert torch.equal(tokens[:, 16 * i:16 * (i + 1)], raa.projectors[i](feats[i]))
    table = _sinusoid(64, 64).float()
    pos = table[:3, None, :] if official else table[None, :64, :]  # (B, 1, d) by batch index / (1, N, d) by token
    assert seen["pos"].shape == pos.shape
    torch.testing.assert_close(seen["pos"], pos, rtol=0, atol=1e-6)
    expected = _attention(tokens, raa, pos)
    assert len(out) == 4
    torch.testing.assert_close(torch.cat(out, dim=1), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# aligners
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target, expected", [
    (StageShape("map", 40, 8, 8), (2, 40, 8, 8)),
    (StageShape("map", 96, 7, 7), (2, 96, 7, 7)),  # 4 -> 7 nearest (ConvNeXt-T stage 4 at 224)
    (StageShape("tokens", 192, 4, 4), (2, 16, 192)),  # DeiT-T at 64 px
    (StageShape("tokens", 96, 16, 16), (2, 256, 96)),  # Swin-T stage 1 at 64 px
    (StageShape("tokens", 384, 14, 14), (2, 196, 384)),  # ViT-S at 224 (class token removed)
])
def test_aligner_output_shapes(target, expected):
    aligner = stage_aligner(64, target)
    assert isinstance(aligner, MapAligner if target.kind == "map" else TokenAligner)
    assert aligner(torch.randn(2, 16, 64)).shape == expected


def test_map_aligner_grid_order_and_upsample():
    d = 4
    aligner = MapAligner(d, StageShape("map", d, 8, 8)).eval()
    with torch.no_grad():
        aligner.conv.weight.copy_(torch.eye(d).view(d, d, 1, 1))
    x = torch.arange(16, dtype=torch.float32).view(1, 16, 1).expand(2, 16, d)  # token k carries the value k
    out = aligner(x)
    r = torch.arange(8)
    # token k sits at grid (k // 4, k % 4); a 2x nearest upsample; eval BN with fresh stats divides by sqrt(1 + eps)
    expected = ((r[:, None] // 2) * 4 + r[None, :] // 2).float() / math.sqrt(1 + 1e-5)
    torch.testing.assert_close(out, expected.expand(2, d, 8, 8), rtol=1e-6, atol=1e-6)


def test_token_aligner_follows_spec_order():
    """BatchNorm1d(16) over the token axis -> Linear(d -> D_T) -> transpose -> BatchNorm1d(D_T) -> Linear(16 -> L_T)."""
    d, target = 32, StageShape("tokens", 24, 5, 5)
    a = TokenAligner(d, target).eval()
    for bn in (a.bn_tokens, a.bn_channels):
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
    x = torch.randn(3, 16, d)

    def bn(t, m):  # over axis 1
        shape = (1, -1, 1)
        return ((t - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps) * m.weight.view(shape)
                + m.bias.view(shape))

    h = bn(x, a.bn_tokens) @ a.channels.weight.T + a.channels.bias  # (3, 16, 24)
    h = bn(h.transpose(1, 2), a.bn_channels) @ a.tokens.weight.T + a.tokens.bias  # (3, 24, 25)
    torch.testing.assert_close(a(x), h.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_aligner_init():
    m = MapAligner(512, StageShape("map", 256, 4, 4))
    assert m.conv.bias is None and m.conv.kernel_size == (1, 1)
    # kaiming_normal, fan_out, relu: std = sqrt(2 / fan_out), fan_out = 256 * 1 * 1
    assert abs(m.conv.weight.std().item() / math.sqrt(2 / 256) - 1) < 0.05
    assert torch.equal(m.bn.weight, torch.ones(512)) and torch.equal(m.bn.bias, torch.zeros(512))
    t = TokenAligner(512, StageShape("tokens", 384, 14, 14))
    for lin in (t.channels, t.tokens):
        assert abs(lin.weight.std().item() / 0.02 - 1) < 0.1
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
    assert t.bn_tokens.num_features == 16 and t.bn_channels.num_features == 384
