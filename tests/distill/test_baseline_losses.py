"""The baselines' losses (kernels/reference.py) against their authors' formulas, restated here in the authors' own
way of computing them (probabilities, cat_mask sums, log of softmax), in float64: values and gradients, hard and
soft labels; and OFA's branches against their description (the ViT branch rebuilt from OFA-KD's merge and block
steps with the same weights)."""

import math

import pytest
import torch
import torch.nn.functional as F

from patfast.kernels import reference as ref

B, K = 6, 13


def logits(seed, scale=3.0, b=B, k=K):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, k, generator=g, dtype=torch.float64) * scale).requires_grad_()


def labels(seed, b=B, k=K):
    return torch.randint(0, k, (b,), generator=torch.Generator().manual_seed(seed))


def soft_labels(y, k=K, smoothing=0.2):
    """mixup-style soft labels whose argmax is y."""
    return F.one_hot(y, k).double() * (1 - smoothing) + smoothing / k


def values_and_grads(fn, s, t, *args):
    s, t = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    loss = fn(s, t, *args)
    loss.backward()
    return loss.detach(), s.grad, t.grad


def assert_same(ours, theirs):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --- the formulas as the authors' code computes them -------------------------------------------------------------
def dkd_authors(s, t, y, alpha, beta, temp):
    gt = torch.zeros_like(s).scatter_(1, y.unsqueeze(1), 1).bool()
    other = ~gt
    ps, pt = F.softmax(s / temp, dim=1), F.softmax(t / temp, dim=1)
    ps = torch.cat([(ps * gt).sum(1, keepdim=True), (ps * other).sum(1, keepdim=True)], dim=1)
    pt = torch.cat([(pt * gt).sum(1, keepdim=True), (pt * other).sum(1, keepdim=True)], dim=1)
    tckd = F.kl_div(torch.log(ps), pt, reduction="sum") * temp**2 / y.shape[0]
    pt2 = F.softmax(t / temp - 1000.0 * gt, dim=1)
    ls2 = F.log_softmax(s / temp - 1000.0 * gt, dim=1)
    nckd = F.kl_div(ls2, pt2, reduction="sum") * temp**2 / y.shape[0]
    return alpha * tckd + beta * nckd


def dist_authors(s, t, beta, gamma, temp):
    ys, yt = (s / temp).softmax(dim=1), (t / temp).softmax(dim=1)

    def pearson(a, b, eps=1e-8):
        a, b = a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    inter = 1 - pearson(ys, yt).mean()
    intra = 1 - pearson(ys.transpose(0, 1), yt.transpose(0, 1)).mean()
    return beta * temp**2 * inter + gamma * temp**2 * intra


def ofa_authors(s, t, y, eps, temp):
    mask = F.one_hot(y, s.shape[-1])
    ps, pt = F.softmax(s / temp, dim=1), F.softmax(t / temp, dim=1)
    prod = (pt + mask) ** eps
    return torch.sum(-(prod - mask) * torch.log(ps), dim=-1).mean()


# --- the losses ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temp", [1.0, 4.0])
@pytest.mark.parametrize("alpha,beta", [(1.0, 8.0), (0.5, 2.0)])
def test_dkd_equals_mdistillers_formula(temp, alpha, beta):
    s, t, y = logits(0), logits(1), labels(2)
    ours = values_and_grads(lambda a, b: ref.dkd_loss_ref(a, b, y, alpha, beta, temp), s, t)
    theirs = values_and_grads(lambda a, b: dkd_authors(a, b, y, alpha, beta, temp), s, t)
    assert_same(ours[:2], theirs[:2])  # the value and the student's gradient
    # the teacher's: mdistiller's probability-space NCKD target gives NaN (its masked probability is exactly 0);
    # ours is finite and the true derivative
    assert torch.isnan(theirs[2]).any() and torch.isfinite(ours[2]).all()
    assert torch.autograd.gradcheck(lambda b: ref.dkd_loss_ref(s.detach(), b, y, alpha, beta, temp), (t,))
    soft = values_and_grads(lambda a, b: ref.dkd_loss_ref(a, b, soft_labels(y), alpha, beta, temp), s, t)
    assert_same(soft, ours)  # soft labels: their argmax is the target


def test_dkd_parts_are_what_they_say():
    """TCKD alone (beta 0) is the binary KL; NCKD alone equals KD among the non-target classes only."""
    s, t, y = logits(3), logits(4), labels(5)
    temp = 2.0
    tckd = ref.dkd_loss_ref(s, t, y, 1.0, 0.0, temp)
    p_s, p_t = F.softmax(s / temp, 1).gather(1, y[:, None])[:, 0], F.softmax(t / temp, 1).gather(1, y[:, None])[:, 0]
    binary = p_t * torch.log(p_t / p_s) + (1 - p_t) * torch.log((1 - p_t) / (1 - p_s))
    torch.testing.assert_close(tckd, binary.mean() * temp**2)
    keep = ~F.one_hot(y, K).bool()
    s_nt, t_nt = s[keep].view(B, K - 1), t[keep].view(B, K - 1)
    torch.testing.assert_close(ref.dkd_loss_ref(s, t, y, 0.0, 1.0, temp), ref.kd_loss_ref(s_nt, t_nt, temp))


@pytest.mark.parametrize("temp", [1.0, 4.0])
@pytest.mark.parametrize("beta,gamma", [(1.0, 1.0), (2.0, 0.5)])
def test_dist_equals_ofakd_formula(temp, beta, gamma):
    s, t = logits(6), logits(7)
    ours = values_and_grads(lambda a, b: ref.dist_loss_ref(a, b, beta, gamma, temp), s, t)
    assert_same(ours, values_and_grads(lambda a, b: dist_authors(a, b, beta, gamma, temp), s, t))


def test_dist_is_zero_for_identical_and_two_for_opposite_relations():
    s = logits(8)
    assert abs(float(ref.dist_loss_ref(s, s).detach())) < 1e-4  # not 0: the eps 1e-8 in the divisor
    # a teacher whose softmax is an affine image with negative slope of the student's: correlation -1 both ways
    two = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    assert float(ref.dist_loss_ref(two, two.flip(1))) == pytest.approx(4.0, abs=1e-6)


@pytest.mark.parametrize("eps", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_ofa_equals_ofakd_formula(eps, temp):
    s, t, y = logits(9), logits(10), labels(11)
    ours = values_and_grads(lambda a, b: ref.ofa_loss_ref(a, b, y, eps, temp), s, t)
    assert_same(ours, values_and_grads(lambda a, b: ofa_authors(a, b, y, eps, temp), s, t))
    assert_same(values_and_grads(lambda a, b: ref.ofa_loss_ref(a, b, soft_labels(y), eps, temp), s, t), ours)


def test_ofa_with_eps_1_is_the_cross_entropy_to_the_teacher():
    s, t, y = logits(12), logits(13), labels(14)
    ce = -(F.softmax(t, 1) * F.log_softmax(s, 1)).sum(1).mean()
    torch.testing.assert_close(ref.ofa_loss_ref(s, t, y, 1.0), ce)


def test_ofa_stays_finite_where_the_authors_log_of_softmax_is_not():
    s, t, y = logits(15, scale=400.0), logits(16), labels(17)
    assert not torch.isfinite(ofa_authors(s, t, y, 1.0, 1.0))
    ours = ref.ofa_loss_ref(s, t, y, 1.0)
    assert torch.isfinite(ours)
    ours.backward()
    assert torch.isfinite(s.grad).all()


def test_fitnet_is_the_mse_of_every_element():
    a, b = logits(18).view(2, 3, 13), logits(19).view(2, 3, 13)
    torch.testing.assert_close(ref.fitnet_loss_ref(a, b), ((a - b) ** 2).mean())


# --- OFA's branches ------------------------------------------------------------------------------------------------
def test_vit_branch_is_ofakds_merge_blocks_and_class_token():
    """A DeiT-like stage of 14 x 14 tokens + a class token: one merge (14 -> 7, GELU after it: the first merge), 3
    blocks for stage 1, the class token's output -> Linear; recomputed here step by step with the branch's weights."""
    from patfast.distill.ofa_branches import ofa_branch
    from patfast.models.stages import StageShape

    torch.manual_seed(0)
    dim, classes = 32, 5
    branch = ofa_branch(1, StageShape("tokens", dim, 14, 14), student_dim=dim, teacher_dim=48, num_classes=classes,
                        prefix_dim=dim).double().eval()
    assert len(branch.merge) == 1 and len(branch.blocks) == 3 and branch.head.out_features == classes
    x = torch.randn(2, 196, dim, dtype=torch.float64)
    cls = torch.randn(2, 1, dim, dtype=torch.float64)
    got = branch(x, cls)

    merge = branch.merge[0]
    g = x.view(2, 14, 14, dim)
    cat = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], -1).view(2, 49, 4 * dim)
    h = F.gelu(F.linear(F.layer_norm(cat, (4 * dim,), merge.norm.weight, merge.norm.bias), merge.reduction.weight))
    h = torch.cat([cls, h], dim=1)
    for block in branch.blocks:
        h = block(h)
    torch.testing.assert_close(got, branch.head(h[:, 0]))


def test_branch_shapes_follow_ofakd():
    from patfast.distill.ofa_branches import CnnBranch, SepConv, TokenBranch, ofa_branch
    from patfast.models.stages import StageShape

    # CNN: stage s < 4 -> 4 - s SepConvs, channels doubling, the last to max(D_S, D_T); stage 4 -> a 1x1 conv
    b1 = ofa_branch(1, StageShape("map", 64, 56, 56), student_dim=512, teacher_dim=768, num_classes=100)
    assert isinstance(b1, CnnBranch) and [type(m) for m in b1.body] == [SepConv] * 3
    assert [m.op[5].out_channels for m in b1.body] == [128, 256, 768]
    assert b1(torch.randn(2, 64, 56, 56)).shape == (2, 100)
    b4 = ofa_branch(4, StageShape("map", 512, 7, 7), student_dim=512, teacher_dim=384, num_classes=100)
    assert isinstance(b4.body[0], torch.nn.Conv2d) and b4.body[0].out_channels == 512
    # tokens: floor(log2(grid / 7)) merges (Swin-T-like 56 x 56 stage 1: 3), max(4 - s, 1) blocks, mean pooling
    t1 = ofa_branch(1, StageShape("tokens", 48, 56, 56), student_dim=96, teacher_dim=768, num_classes=10)
    assert isinstance(t1, TokenBranch) and len(t1.merge) == 3 and len(t1.blocks) == 3
    assert [type(m.act).__name__ for m in t1.merge] == ["GELU", "GELU", "Identity"]
    assert t1(torch.randn(2, 56 * 56, 48)).shape == (2, 10)
    # an odd grid (12 x 12 at 192 px) is padded to even before its merge: OFA-KD's code would refuse it
    assert max(int(math.log2(12 / 7)), 0) == 0
    odd = ofa_branch(2, StageShape("tokens", 32, 28, 21), student_dim=32, teacher_dim=32, num_classes=3)
    assert odd(torch.randn(1, 28 * 21, 32)).shape == (1, 3)
