"""The CUDA fast path of PAT on an emulated GPU (see conftest.py: fake CUDA tensors, CUDA bf16 autocast, Triton
launches recorded, Dynamo told Triton is there), for teachers of every family, CNN and token students, both variants
(the official one where its switches change the forward's code).

Per pair, at 224 px with the default RAA (d 512, 8 heads), batch 8:
(a) two eager forwards (no feedback yet, then with feedback) accept the stage dtypes CUDA autocast produces, launch
    the HCL, KD and RAA Triton kernels, read nothing on the host, and give fp32 loss terms; every kernel's backward
    launchers accept the same inputs and give each gradient in its input's dtype and shape;
(b) torch.compile(distiller, fullgraph=True) traces the steady-state forward (with feedback, as TrainStep compiles
    it) as ONE graph under CUDA autocast, holding the Triton launches of the kernels' forward and, in the bodies of
    their autograd.Functions, of their backward; fullgraph turns any graph break — a host read, an untraceable call —
    into a failure.
"""

import copy
import functools

import pytest
import torch

from patfast.data.datasets import CIFAR100_MEAN, CIFAR100_STD
from patfast.distill.build import DistillSettings, build_distiller
from patfast.models.create import create_model

KERNELS = {"patfast.kernels.hcl", "patfast.kernels.kd", "patfast.kernels.raa"}
# (teacher, student): every teacher family; CNN, ViT and MLP students; the paper's pairs where they fit
PAIRS = [
    ("swin_tiny_patch4_window7_224", "resnet18"),  # Swin (NHWC tokens) -> CNN
    ("vit_small_patch16_224", "mobilenetv2_100"),  # ViT (class token) -> CNN
    ("convnext_tiny", "deit_tiny_patch16_224"),  # ConvNeXt -> ViT
    ("convnext_tiny", "resmlp_12_224"),  # ConvNeXt -> MLP
    ("mixer_b16_224", "deit_tiny_patch16_224"),  # Mixer -> ViT
    ("resnet50", "deit_tiny_patch16_224"),  # ResNet (BatchNorm) -> ViT
]
# The official variant where its switches change the forward's code: token teachers (switch 1, the map -> token
# scramble; 4, ViT's class token taken last) and with them 2 (SE gate) and 3 (batch-indexed positional term), which
# act the same in every pair; the CNN teachers add nothing there, so they run the paper variant only (switch 5,
# the first-batch teacher mode, is not part of a traced forward).
VARIANTS = {t: ("paper", "official") if t.startswith(("swin", "vit", "mixer")) else ("paper",) for t, _ in PAIRS}
IMG, BATCH, CLASSES = 224, 8, 100
MEAN, STD = CIFAR100_MEAN, CIFAR100_STD


@functools.lru_cache(maxsize=1)
def real_models(teacher: str, student: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The pair built once on the CPU (initialising full-size timm models takes seconds); copied per test."""
    torch.manual_seed(0)
    return create_model(teacher, CLASSES, IMG), create_model(student, CLASSES, IMG)


def build(fake, teacher: str, student: str, variant: str):
    t, s = (copy.deepcopy(m) for m in real_models(teacher, student))
    torch.manual_seed(0)
    d = build_distiller("pat", s, t, DistillSettings(pat_variant=variant), img_size=IMG, data_mean=MEAN, data_std=STD)
    fake.module(d).train()
    x = fake.tensor(torch.randn(BATCH, 3, IMG, IMG))
    y = fake.tensor(torch.randint(0, CLASSES, (BATCH,)))
    return d, x, y


class CountGraphs:
    """A torch.compile backend that runs the captured graphs eagerly and keeps them."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def triton_launches(gm) -> dict[str, int]:
    """Triton launches traced into the graph, by where they sit: "forward" (the graph itself and the forward bodies
    of the autograd.Functions it calls) and "backward" (those Functions' backward bodies, which Dynamo traces too)."""
    counts = {"forward": 0, "backward": 0}
    for name, sub in gm.named_modules():
        if isinstance(sub, torch.fx.GraphModule):
            n = sum("triton_kernel_wrapper" in str(node.target) for node in sub.graph.nodes)
            counts["backward" if name.split(".")[-1].startswith("bwd_body") else "forward"] += n
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("teacher,student,variant", [(t, s, v) for t, s in PAIRS for v in VARIANTS[t]])
def test_fast_path_forward_on_fake_cuda(fake_cuda, teacher, student, variant):
    d, x, y = build(fake_cuda, teacher, student, variant)
    calls = []
    # (a) eager: step 0 (no feedback: the fusion blocks are skipped), then a step with feedback
    for step in range(2):
        fake_cuda.launches.clear()
        with fake_cuda.mode, fake_cuda.autocast(), fake_cuda.record_kernel_functions(calls):
            logits, losses = d(x, y)
        assert fake_cuda.modules_launched() == KERNELS, f"step {step}: Triton kernels launched from " \
            f"{sorted(fake_cuda.modules_launched())}"
        assert logits.device.type == "cuda" and logits.shape == (BATCH, CLASSES)
        for name, loss in losses.items():
            assert loss.device.type == "cuda" and loss.shape == () and loss.dtype == torch.float32, name
    assert all(p.feedback is not None for p in d.prompts.values())
    hcl_pairs = [launch.dtypes[:2] for launch in fake_cuda.launches if launch.module.endswith("hcl")]
    print(f"{teacher} -> {student} ({variant}): HCL (student, teacher) dtypes per stage {hcl_pairs}")

    fake_cuda.launches.clear()
    for cls, args in calls:  # the backward launchers of every kernel call of the two forwards
        for inp, grad in fake_cuda.replay_backward(cls, args):
            assert grad is not None and grad.dtype == inp.dtype and grad.shape == inp.shape, cls.__name__
    assert fake_cuda.modules_launched() == KERNELS

    # (b) the steady-state forward as one graph, under CUDA autocast
    backend = CountGraphs()
    compiled = torch.compile(d, fullgraph=True, backend=backend)
    with fake_cuda.mode, fake_cuda.autocast():
        _, traced = compiled(x, y)
    assert len(backend.graphs) == 1
    launches = triton_launches(backend.graphs[0])
    # HCL (one per stage), KD and RAA: forward and backward launches, all inside the one graph
    assert launches["forward"] >= 6 and launches["backward"] >= 6, launches
    assert traced.keys() == losses.keys()
    print(f"{teacher} -> {student} ({variant}): {len(backend.graphs)} graph, Triton launches traced {launches}")
