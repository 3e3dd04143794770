"""The baselines' CUDA fast path on an emulated GPU (conftest.py: fake CUDA tensors, CUDA bf16 autocast, Triton
launches recorded): for a CNN and a token student each, the eager forward accepts what CUDA autocast produces and
launches the distiller's Triton kernels (DKD's, DIST's, OFA's) with fp32 scalar terms, their backward launchers give
each gradient in its input's dtype, and torch.compile(fullgraph=True) traces the forward as one graph."""

import copy
import functools

import pytest
import torch

from patfast.data.datasets import CIFAR100_MEAN, CIFAR100_STD
from patfast.distill.build import DistillSettings, build_distiller
from patfast.models.create import create_model

PAIRS = [("vit_small_patch16_224", "resnet18"), ("convnext_atto", "deit_tiny_patch16_224")]  # token -> CNN, CNN -> ViT
# the modules whose kernels launch (DKD's forward starts with kd.py's per-chunk kernel over the non-target classes,
# DIST's with the same kernel over all classes)
KERNELS = {"ofa": {"patfast.kernels.ofa"}, "dkd": {"patfast.kernels.kd", "patfast.kernels.dkd"},
           "dist": {"patfast.kernels.kd", "patfast.kernels.dist"},
           "fitnet": set()}
IMG, BATCH, CLASSES = 224, 4, 100


@functools.lru_cache(maxsize=2)
def real_models(teacher: str, student: str):
    torch.manual_seed(0)
    return create_model(teacher, CLASSES, IMG), create_model(student, CLASSES, IMG)


class KeepGraphs:
    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


@pytest.mark.slow
@pytest.mark.parametrize("teacher,student", PAIRS)
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_baseline_fast_path_on_fake_cuda(fake_cuda, name, teacher, student):
    t, s = (copy.deepcopy(m) for m in real_models(teacher, student))
    torch.manual_seed(0)
    d = build_distiller(name, s, t, DistillSettings(), img_size=IMG, data_mean=CIFAR100_MEAN, data_std=CIFAR100_STD)
    fake_cuda.module(d).train()
    x = fake_cuda.tensor(torch.randn(BATCH, 3, IMG, IMG))
    y = fake_cuda.tensor(torch.randint(0, CLASSES, (BATCH,)))
    calls = []
    with fake_cuda.mode, fake_cuda.autocast(), fake_cuda.record_kernel_functions(calls):
        logits, losses = d(x, y)
    assert fake_cuda.modules_launched() == KERNELS[name]
    assert logits.device.type == "cuda" and logits.shape == (BATCH, CLASSES)
    assert tuple(losses) == d.terms
    for term, loss in losses.items():
        assert loss.device.type == "cuda" and loss.shape == () and loss.dtype == torch.float32, term
    for cls, args in calls:
        for inp, grad in fake_cuda.replay_backward(cls, args):
            assert grad is not None and grad.dtype == inp.dtype and grad.shape == inp.shape, cls.__name__

    backend = KeepGraphs()
    compiled = torch.compile(d, fullgraph=True, backend=backend)
    with fake_cuda.mode, fake_cuda.autocast():
        _, traced = compiled(x, y)
    assert len(backend.graphs) == 1 and traced.keys() == losses.keys()
