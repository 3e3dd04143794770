"""SPEC section 6: each switch of the official variant against the paper behaviour.

Single-switch variants are built the way build_distiller wires a variant (conftest's make_pat); the named variants
are checked for their switches and for the wiring build_distiller does.
"""

from dataclasses import fields

import pytest
import torch

from patfast import ops
from patfast.distill.prompts import PromptBlock, SqueezeExcite
from patfast.distill.raa import RegionAwareAttention
from patfast.distill.variant import PatVariant
from patfast.models.stages import StageShape

IMG = 64


def test_named_variants():
    paper, official = PatVariant.named("paper"), PatVariant.named("official")
    names = [f.name for f in fields(PatVariant)]
    assert sorted(names) == sorted(["token_reshape_bug", "se_gate_only", "pos_by_batch_index", "class_token_last",
                                    "teacher_train_first_batch", "float32_pos_table"])
    assert not any(getattr(paper, n) for n in names)
    assert all(getattr(official, n) for n in names)
    assert PatVariant() == paper
    with pytest.raises(ValueError):
        PatVariant.named("unofficial")


@pytest.mark.parametrize("name", ["paper", "official"])
def test_build_distiller_wires_every_switch(make_pat, name):
    d = make_pat(teacher="deit_tiny_patch16_224", student="deit_tiny_patch16_224", img=32, variant=name)
    off = name == "official"
    assert d.variant == PatVariant.named(name)
    assert d.teacher.taps.token_return == ("reshape" if off else "transpose")  # 1
    assert all(m.gate_only == off for m in d.modules() if isinstance(m, SqueezeExcite))  # 2
    assert d.raa.pos_by_batch_index == off  # 3
    assert d.teacher.taps.class_token == d.student_taps.class_token == ("last" if off else "first")  # 4
    from patfast.distill.raa import sinusoid_table

    assert torch.equal(d.raa.pos_table, sinusoid_table(5000, d.raa.q.in_features, float32_arith=off))


# 1 ---------------------------------------------------------------------------------------------------------------


def _scramble_reference(clean_in, nhwc, num_prefix):
    """What the official map -> tokens reshape makes of an untouched input (beta = 0), written out."""
    if nhwc:
        b, h, w, c = clean_in.shape
        return clean_in.permute(0, 3, 1, 2).reshape(b, h, w, c)
    prefix, spatial = clean_in[:, :num_prefix], clean_in[:, num_prefix:]
    b, n, c = spatial.shape
    g = int(n ** 0.5)
    m = spatial.transpose(1, 2).reshape(b, c, g, g)
    return torch.cat([prefix, m.reshape(b, n, c)], dim=1)


@pytest.mark.parametrize("teacher", ["deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "convnext_atto"])
@pytest.mark.parametrize("bug", [False, True])
def test_1_token_reshape_bug(make_pat, make_batch, teacher, bug):
    d = make_pat(teacher=teacher, img=IMG, variant=PatVariant(token_reshape_bug=bug)).train()
    t = d.teacher
    modules = dict(t.model.named_modules())
    seen = []
    modules[t.taps.prompt_points[0]].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    x, _ = make_batch(b=2, img=IMG)
    with torch.no_grad():  # the clean forward, through the taps (Teacher.clean lets its features go)
        clean = t.model(t._input(x))
    clean_feats = [f.clone() for f in t.taps.features()]
    prompted, feats = t.prompted(x)
    assert all(p.beta.item() == 0.0 for p in d.prompts.values())
    tokens_teacher = teacher != "convnext_atto"
    if bug and tokens_teacher:  # official: the prompted teacher is corrupted at beta = 0
        assert not torch.allclose(prompted, clean, atol=1e-4)
        assert not torch.allclose(feats[0], clean_feats[0], atol=1e-4)
        expected = _scramble_reference(seen[0], t.taps.nhwc, t.taps.num_prefix)
        assert torch.equal(seen[1], expected)
    else:  # paper (and any CNN teacher): beta = 0 leaves the teacher bit-identical
        assert torch.equal(prompted, clean)
        assert all(torch.equal(f, c) for f, c in zip(feats, clean_feats))
        assert torch.equal(seen[1], seen[0])


# 2 ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate_only", [False, True])
def test_2_se_gate_only(gate_only):
    c, h = 32, 8
    shape = StageShape("map", c, h, h)
    block = PromptBlock(shape, shape, se_gate_only=gate_only)
    x = torch.randn(2, c, h, h)
    with torch.no_grad():
        block.beta.fill_(1.0)
        p = block.prompt(x)
        block.feedback = torch.randn(2, c, h, h)
        fused = block.fusion(torch.cat([x, block.feedback], dim=1))
        delta = block(x) - x
        se = block.prompt[3](x)
    if gate_only:  # official: per-sample per-channel biases
        assert p.shape == (2, c, 1, 1) and fused.shape == (2, c, 1, 1)
        assert se.shape == (2, c, 1, 1) and bool(((se > 0) & (se < 1)).all())  # the sigmoid gate itself
        torch.testing.assert_close(delta, delta[:, :, :1, :1].expand_as(delta), rtol=0, atol=1e-6)
    else:  # paper: spatial prompts, SE returns x * gate
        assert p.shape == (2, c, h, h) and fused.shape == (2, c, h, h)
        gate = se / x
        torch.testing.assert_close(gate, gate[:, :, :1, :1].expand_as(gate), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(delta, delta[:, :, :1, :1].expand_as(delta), atol=1e-4)


# 3 ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("by_batch", [False, True])
def test_3_pos_by_batch_index(by_batch):
    shapes = [StageShape("map", 8, 8, 8), StageShape("map", 16, 4, 4), StageShape("tokens", 24, 2, 2),
              StageShape("map", 32, 1, 1)]
    raa = RegionAwareAttention(shapes, dim=64, num_heads=8, pos_by_batch_index=by_batch).eval()
    a = [torch.randn(1, 8, 8, 8), torch.randn(1, 16, 4, 4), torch.randn(1, 4, 24), torch.randn(1, 32, 1, 1)]
    b = [torch.randn_like(t) for t in a]
    with torch.no_grad():
        ab = torch.cat(raa([torch.cat([u, v]) for u, v in zip(a, b)]), dim=1)
        ba = torch.cat(raa([torch.cat([v, u]) for u, v in zip(a, b)]), dim=1)
        aa = torch.cat(raa([torch.cat([u, u]) for u in a]), dim=1)
    if by_batch:  # official: the same sample gives another output at another place in the batch
        assert not torch.allclose(ab[0], ba[1], atol=1e-4)
        assert not torch.allclose(aa[0], aa[1], atol=1e-4)
    else:  # paper: a sample's output does not depend on where it sits in the batch
        torch.testing.assert_close(ab[0], ba[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(aa[0], aa[1], rtol=1e-5, atol=1e-5)


# 4 ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("last", [False, True])
def test_4_class_token_last(make_pat, make_batch, last, monkeypatch):
    d = make_pat(teacher="deit_tiny_patch16_224", student="deit_tiny_patch16_224", img=IMG,
                 variant=PatVariant(class_token_last=last)).train()
    raw = {}
    d.student.blocks[1].register_forward_hook(lambda m, a, o: raw.__setitem__("student", o.detach()))
    d.teacher.model.blocks[1].register_forward_hook(lambda m, a, o: raw.__setitem__("teacher", o.detach()))
    seen = []
    d.teacher.model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        d.prompts["1"].beta.fill_(1.0)
    used = {}  # the stage features PAT computes with: RAA's input (student), HCL's targets (teacher)
    raa_forward, hcl = d.raa.forward, ops.hcl_loss_stages
    d.raa.forward = lambda feats: (used.__setitem__("student", feats[0]), raa_forward(feats))[1]
    monkeypatch.setattr(ops, "hcl_loss_stages",
                        lambda s, t, **k: (used.__setitem__("teacher", t[0]), hcl(s, t, **k))[1])
    x, y = make_batch(b=2, img=IMG)
    d(x, y)
    keep = slice(0, 16) if last else slice(1, 17)
    assert torch.equal(used["student"], raw["student"][:, keep])
    assert torch.equal(used["teacher"], raw["teacher"][:, keep])
    clean_in, prompted_in = seen
    changed = (prompted_in - clean_in).abs().amax(dim=(0, 2)) > 0  # per token
    if last:  # official: the real class token is prompted like a patch, the last patch is set aside
        assert changed[0] and not changed[16]
    else:
        assert not changed[0] and changed[16]
    assert changed[1:16].all()


# 5 ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bug", [False, True])
def test_5_teacher_train_first_batch(make_pat, make_batch, bug):
    # a BatchNorm teacher: official runs the CLEAN forward of an epoch's first batch in train mode (batch statistics,
    # running statistics move once) and the prompted forward in eval mode, as the authors' forward does
    d = make_pat(teacher="resnet18", student="mobilenetv2_100", variant=PatVariant(teacher_train_first_batch=bug))
    d.train()
    teacher = d.teacher.model
    modes = []
    teacher.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    stats, tracked = teacher.bn1.running_mean.clone(), teacher.bn1.num_batches_tracked.item()
    x, y = make_batch()

    d(x, y, first_batch=False)  # not the first batch: the teacher is in eval mode in both variants
    assert modes == [False, False] and torch.equal(teacher.bn1.running_mean, stats)

    d(x, y, first_batch=True)
    if bug:  # official: [clean in train mode, prompted in eval mode]; the running statistics moved once
        assert modes[2:4] == [True, False]
        assert not torch.equal(teacher.bn1.running_mean, stats)
        assert teacher.bn1.num_batches_tracked.item() == tracked + 1
    else:
        assert modes[2:4] == [False, False]
        assert torch.equal(teacher.bn1.running_mean, stats)
        assert teacher.bn1.num_batches_tracked.item() == tracked
    assert not any(m.training for m in teacher.modules())  # back in eval mode afterwards
