"""The frozen teacher wrapper: re-normalisation, eval mode whatever train() says, clean vs prompted forwards."""

import pytest
import torch
from torch import nn

from patfast.models.create import create_model
from patfast.models.stages import StageTaps
from patfast.models.teacher import Teacher

IMG = 32


def _teacher(name="resnet18", **kw):
    model = create_model(name, 10, IMG)
    taps = StageTaps(model, IMG)
    kw = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "data_mean": (0.5, 0.5, 0.5),
          "data_std": (0.25, 0.25, 0.25)} | kw
    return Teacher(model, taps, **kw), model


def test_renormalises_inputs_to_the_teachers_mean_and_std():
    mean_s, std_s = (0.1, 0.2, 0.3), (0.5, 0.4, 0.3)
    mean_t, std_t = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    teacher, model = _teacher(mean=mean_t, std=std_t, data_mean=mean_s, data_std=std_s)
    x = torch.randn(2, 3, IMG, IMG)
    pixels = x * torch.tensor(std_s).view(1, 3, 1, 1) + torch.tensor(mean_s).view(1, 3, 1, 1)  # the raw image
    expected_in = (pixels - torch.tensor(mean_t).view(1, 3, 1, 1)) / torch.tensor(std_t).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model(expected_in)
    torch.testing.assert_close(teacher.clean(x), expected, rtol=1e-5, atol=1e-5)


def test_same_normalisation_passes_inputs_through():
    teacher, model = _teacher()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(teacher.clean(x), model(x))


def test_frozen_eval_mode_and_graphs():
    teacher, model = _teacher()
    outer = nn.ModuleDict({"teacher": teacher})
    outer.train()
    assert teacher.training  # the wrapper follows ...
    assert not any(m.training for m in model.modules())  # ... the timm model stays in eval mode
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.randn(2, 3, IMG, IMG)
    clean = teacher.clean(x)
    assert not clean.requires_grad and clean.grad_fn is None
    # the prompted forward keeps a graph (so gradients can reach prompt blocks) once an input needs grad
    scale = nn.Parameter(torch.ones(()))

    class Scale(nn.Module):
        def forward(self, t):
            return t * scale

    teacher.taps.set_prompts([Scale(), None, None, None])
    logits, feats = teacher.prompted(x)
    assert not teacher.taps.prompting
    assert logits.requires_grad and len(feats) == 4 and all(f.requires_grad for f in feats)
    logits.sum().backward()
    assert scale.grad is not None
    assert all(p.grad is None for p in model.parameters())


def test_prompting_flag_is_reset_when_the_prompted_forward_fails():
    teacher, _ = _teacher()

    class Boom(nn.Module):
        def forward(self, t):
            raise RuntimeError("boom")

    teacher.taps.set_prompts([Boom()])
    with pytest.raises(RuntimeError):
        teacher.prompted(torch.randn(2, 3, IMG, IMG))
    assert not teacher.taps.prompting
