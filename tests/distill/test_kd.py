"""The kd and none distillers, and build_distiller's user errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from patfast import ops
from patfast.distill.base import Vanilla
from patfast.distill.build import DistillSettings, build_distiller
from patfast.distill.kd import KD
from patfast.errors import UserError
from patfast.models.create import create_model

IMG = 32
NORM = {"data_mean": (0.5,) * 3, "data_std": (0.25,) * 3}


def _kl(target_logits, logits, t):
    p = F.softmax(target_logits.double() / t, -1)
    kl = (p * (F.log_softmax(target_logits.double() / t, -1) - F.log_softmax(logits.double() / t, -1))).sum(-1)
    return kl.mean().item() * t * t


def test_kd_distiller(make_batch):
    s, t = create_model("resnet18", 10, IMG), create_model("convnext_atto", 10, IMG)
    d = build_distiller("kd", s, t, DistillSettings(kd_temperature=4.0, kd_weight=2.0), img_size=IMG, **NORM)
    assert isinstance(d, KD)
    d.train()
    assert not any(m.training for m in t.modules())
    x, y = make_batch()
    logits, losses = d(x, y)
    assert set(losses) == {"loss_gt", "loss_kd"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        clean = t(x)
    torch.testing.assert_close(losses["loss_kd"], 2.0 * ops.kd_loss(logits, clean, 4.0))
    # against float64: the fp32 log-softmaxes round by ~1e-7 a row, times weight x T^2 = 32 (a small KL of near
    # uniform logits has no relative accuracy to spare: 3.4e-6 off of 0.24 was seen)
    assert math.isclose(losses["loss_kd"].item(), 2.0 * _kl(clean, logits.detach(), 4.0), rel_tol=1e-5,
                        abs_tol=32 * 3e-7)
    assert math.isclose(losses["loss_gt"].item(), F.cross_entropy(logits, y, label_smoothing=0.1).item(),
                        rel_tol=1e-6)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in t.parameters())
    assert all(p.grad is not None for p in s.parameters() if p.requires_grad)
    assert {id(p) for p in d.trainable_parameters()} == {id(p) for p in s.parameters()}


def test_none_distiller(make_batch):
    s = create_model("resnet18", 10, IMG)
    d = build_distiller("none", s, None, DistillSettings(smoothing=0.0, gt_weight=2.0), img_size=IMG, **NORM)
    assert isinstance(d, Vanilla)
    x, y = make_batch()
    logits, losses = d(x, y)
    assert set(losses) == {"loss_gt"}
    assert math.isclose(losses["loss_gt"].item(), 2.0 * F.cross_entropy(logits, y).item(), rel_tol=1e-6)
    soft = F.softmax(torch.randn(4, 10), -1)  # mixup/cutmix targets: soft-target cross-entropy
    logits, losses = d(x, soft)
    expected = -(soft * F.log_softmax(logits, -1)).sum(-1).mean()
    assert math.isclose(losses["loss_gt"].item(), 2.0 * expected.item(), rel_tol=1e-6)


def test_build_errors():
    s = create_model("resnet18", 10, IMG)
    with pytest.raises(UserError):
        build_distiller("crd", s, None, img_size=IMG, **NORM)
    for name in ("kd", "pat", "ofa", "dkd", "dist", "fitnet"):  # each needs a teacher
        with pytest.raises(UserError):
            build_distiller(name, s, None, img_size=IMG, **NORM)


def test_unknown_variant_is_a_user_error():
    from patfast.models.create import create_model

    with pytest.raises(UserError, match="unknown PAT variant"):
        build_distiller("pat", create_model("resnet10t", 10, 32), create_model("resnet10t", 10, 32),
                        DistillSettings(pat_variant="bogus"), img_size=32, data_mean=(0.5,) * 3, data_std=(0.5,) * 3)
