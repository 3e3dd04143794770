"""The HCL and KD inputs of a real PAT step, recorded per benchmark pair: shapes, dtypes and memory layouts.

`patfast bench kernels` times the HCL and KL ops on inputs built from these records ("as in the step") beside its
contiguous, one-dtype cases ("same layout"). Nothing here is hand-written: ``record_pair`` runs one PAT training
forward the way the CUDA fast path runs it (patfast.train.step.TrainStep with its CUDA settings: bf16 autocast,
channels_last parameters and input, ``patfast.ops`` "auto", the aligners' upsample-last order) on an emulated GPU, and
wraps ``patfast.ops.hcl_loss_stages`` and ``patfast.ops.kd_loss_pair`` to write down every input they get.
benchmarks/record_step_layouts.py writes the records into step_layouts.json (committed, with how it was made);
tests/bench/test_step_layouts.py checks that a fresh recording still gives the committed records.

The emulated GPU (as tests/emulation/conftest.py, whose tests check the same path): parameters, buffers and the
input batch are ``FakeTensorMode`` tensors on device "cuda", so every op's meta function decides the shapes, dtypes
and strides it would give on a GPU and nothing is computed (a full-size Swin-T costs no more than a tiny model);
CUDA autocast dispatches through the real AutocastCUDA kernels (only its constructor is told CUDA is there); the
Triton launches of the fused ops are no-ops (their launchers still run and allocate their outputs). Random-init timm
models at 224 px (the stage shapes of the real thing), 100 classes (`patfast bench train`'s default), batch 2.

What is recorded is the eager forward with feedback, the steady state that TrainStep compiles (PAT's first step,
without feedback, is recorded too and must agree). Inductor keeps a user Triton kernel's input strides as eager
gives them (torch._inductor.config.triton_kernel_default_layout_constraint, "needs_fixed_stride_order"), so the
compiled step hands the kernels the same layouts.

A tensor's record, per sample (without the batch axis): ``shape``, ``strides`` and ``batch_stride`` (elements),
``offset`` (its storage offset, elements), ``dtype``, ``requires_grad``. The batch axis is the outermost in memory
(checked when recording), so ``TensorLayout.empty(batch)`` rebuilds the same layout at any batch size with
torch.empty_strided.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import time
import unittest.mock as mock
from dataclasses import asdict, dataclass

import torch

# name -> (teacher, student): the pairs the benchmarks run. Swin-T -> ResNet18 is `patfast bench train`'s default
# and gpu_check's target pair; ConvNeXt-T -> DeiT-T and ViT-S -> MobileNetV2 its other pairs; ResNet-50 (a kernel
# bench teacher, TEACHERS in patfast/bench/kernels.py) with the student the emulation tests give it.
PAIRS: dict[str, tuple[str, str]] = {
    "swin_t->resnet18": ("swin_tiny_patch4_window7_224", "resnet18"),
    "convnext_t->deit_t": ("convnext_tiny", "deit_tiny_patch16_224"),
    "resnet50->deit_t": ("resnet50", "deit_tiny_patch16_224"),
    "vit_s->mobilenetv2": ("vit_small_patch16_224", "mobilenetv2_100"),
}
IMG, BATCH, CLASSES = 224, 2, 100
DATA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "step_layouts.json")
KERNEL_MODULES = ("patfast.kernels.hcl", "patfast.kernels.kd", "patfast.kernels.raa")  # what a PAT step launches
HOW = ("one PAT training forward (paper variant, with feedback: the steady state) as the CUDA fast path runs it "
       "(TrainStep's CUDA settings: bf16 autocast, channels_last parameters and input, patfast.ops 'auto', "
       "upsample-last aligners) on an emulated GPU (FakeTensorMode tensors on 'cuda', CUDA autocast, Triton "
       "launches as no-ops); random-init timm models at {img} px, {classes} classes, batch {batch}; every input of "
       "patfast.ops.hcl_loss_stages and patfast.ops.kd_loss_pair recorded per sample")


@dataclass(frozen=True)
class TensorLayout:
    """One recorded input, per sample: (B, *shape) with strides (batch_stride, *strides) from storage offset
    ``offset`` (elements), of ``dtype``."""

    shape: tuple[int, ...]
    strides: tuple[int, ...]
    batch_stride: int
    offset: int
    dtype: str  # "bfloat16", "float32", ...
    requires_grad: bool

    @classmethod
    def of(cls, x: torch.Tensor) -> TensorLayout:
        shape, strides = tuple(x.shape[1:]), tuple(x.stride()[1:])
        span = 1 + sum((n - 1) * s for n, s in zip(shape, strides))  # elements one sample spans
        if x.shape[0] > 1 and x.stride(0) < span:
            raise ValueError(f"a {tuple(x.shape)} tensor with strides {x.stride()}: its batch axis is not the "
                             "outermost in memory, so its layout depends on the batch size")
        return cls(shape, strides, int(x.stride(0)), int(x.storage_offset()), str(x.dtype).removeprefix("torch."),
                   bool(x.requires_grad))

    @classmethod
    def from_json(cls, d: dict) -> TensorLayout:
        return cls(tuple(d["shape"]), tuple(d["strides"]), d["batch_stride"], d["offset"], d["dtype"],
                   d["requires_grad"])

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def size(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.shape)

    def stride(self) -> tuple[int, ...]:
        return (self.batch_stride, *self.strides)

    def empty(self, batch: int, device="cpu") -> torch.Tensor:
        """An uninitialised (batch, *shape) tensor of this dtype and layout (strides and storage offset)."""
        if not self.offset:
            return torch.empty_strided(self.size(batch), self.stride(), dtype=self.torch_dtype, device=device)
        span = self.offset + (batch - 1) * self.batch_stride + 1 + sum(
            (n - 1) * s for n, s in zip(self.shape, self.strides))
        base = torch.empty(span, dtype=self.torch_dtype, device=device)
        return base.as_strided(self.size(batch), self.stride(), self.offset)

    def layout_text(self) -> str:
        """e.g. "(96,56,56) bfloat16 strides (1,5376,96)" (per sample; batch stride omitted when dense)."""
        dense = self.batch_stride == _numel(self.shape) and not self.offset
        extra = "" if dense else f", batch stride {self.batch_stride}" + (f", offset {self.offset}" if self.offset
                                                                        else "")
        return (f"({','.join(map(str, self.shape))}) {self.dtype} strides ({','.join(map(str, self.strides))}"
                f"{extra})")

    def contiguous(self) -> bool:
        """Standard (row-major) strides, dense batch, no offset."""
        expect, n = [], 1
        for d in reversed(self.shape):
            expect.append(n)
            n *= d
        return tuple(reversed(expect)) == self.strides and self.batch_stride == n and not self.offset


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class StepLayouts:
    """The recorded inputs of one pair: HCL per stage (student, teacher), the KL pair (logits_s, logits_pt,
    logits_t) and its temperature."""

    name: str
    teacher: str
    student: str
    hcl: tuple[tuple[TensorLayout, TensorLayout], ...]
    kd_pair: tuple[TensorLayout, TensorLayout, TensorLayout]
    temperature: float

    @classmethod
    def from_json(cls, name: str, d: dict) -> StepLayouts:
        hcl = tuple((TensorLayout.from_json(s["student"]), TensorLayout.from_json(s["teacher"])) for s in d["hcl"])
        kd = tuple(TensorLayout.from_json(d["kd_loss_pair"][k]) for k in ("logits_s", "logits_pt", "logits_t"))
        return cls(name, d["teacher"], d["student"], hcl, kd, d["kd_loss_pair"]["temperature"])

    def to_json(self) -> dict:
        return {
            "teacher": self.teacher, "student": self.student,
            "hcl": [{"stage": i, "student": s.to_json(), "teacher": t.to_json()}
                    for i, (s, t) in enumerate(self.hcl, 1)],
            "kd_loss_pair": {"logits_s": self.kd_pair[0].to_json(), "logits_pt": self.kd_pair[1].to_json(),
                             "logits_t": self.kd_pair[2].to_json(), "temperature": self.temperature},
        }


# ----------------------------------------------------------------------------------------------------------------
# The emulated GPU and the recording
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def emulated_cuda():
    """-> a FakeTensorMode; inside, Triton launches of the kernel modules are no-ops (the kernels are JITFunctions,
    also where TRITON_INTERPRET=1 made them interpreter objects) and torch.autocast("cuda") can be constructed."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.jit import JITFunction

    import patfast.ops  # noqa: F401  (imports the kernel modules as the dispatch does)

    with contextlib.ExitStack() as stack:
        for name in KERNEL_MODULES:
            module = importlib.import_module(name)
            for attr, value in list(vars(module).items()):
                fn = getattr(value, "fn", None)
                if fn is not None and type(value).__name__ == "InterpretedFunction":
                    stack.enter_context(mock.patch.object(module, attr, JITFunction(fn)))
        stack.enter_context(mock.patch.object(JITFunction, "run", lambda self, *args, **kwargs: None))
        stack.enter_context(mock.patch.object(torch._C, "_select_conv_backend", _conv_backend_of_a_gpu))
        yield FakeTensorMode(allow_non_fake_inputs=False)


_REAL_SELECT_CONV_BACKEND = torch._C._select_conv_backend


def _conv_backend_of_a_gpu(input, weight, *args, **kwargs):
    """torch._C._select_conv_backend as on an sm_80+ GPU, for the fake-tensor convolution (which asks it for the
    output's memory format). Without a CUDA device cuDNN is never picked for bfloat16 (its check of bf16 support
    asks the device's compute capability), so a bf16 convolution would get the slow fallback and a contiguous
    output where cuDNN gives a channels_last one for channels_last inputs; here such a convolution gets the backend
    the same convolution in float32 gets (cuDNN where it applies)."""
    backend = _REAL_SELECT_CONV_BACKEND(input, weight, *args, **kwargs)
    cudnn = (torch._C._ConvBackend.Cudnn, torch._C._ConvBackend.CudnnTranspose)
    if backend in cudnn or not input.is_cuda or torch.bfloat16 not in (input.dtype, weight.dtype):
        return backend
    kwargs = {k: v.float() if torch.is_tensor(v) and v.dtype == torch.bfloat16 else v for k, v in kwargs.items()}
    wide = _REAL_SELECT_CONV_BACKEND(input.float(), weight.float(), *args, **kwargs)
    return wide if wide in cudnn else backend


def _cuda_autocast() -> torch.autocast:
    """CUDA bf16 autocast without CUDA: only its constructor asks whether CUDA is there."""
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        return torch.autocast("cuda", dtype=torch.bfloat16)


def _to_fake_cuda(mode, module: torch.nn.Module) -> None:
    """Every parameter and buffer of ``module`` replaced by a fake CUDA copy of the same strides (in place)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(_fake(mode, p.data), p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = _fake(mode, b)


def _fake(mode, t: torch.Tensor) -> torch.Tensor:
    fake = mode.from_tensor(t)
    with mode:
        return fake.to("cuda")


def record_pair(name: str, teacher: str | None = None, student: str | None = None, *, batch: int = BATCH,
                img: int = IMG, classes: int = CLASSES) -> StepLayouts:
    """Run one PAT step's forward of (teacher -> student) as the CUDA fast path does, on the emulated GPU, and
    return what patfast.ops.hcl_loss_stages and patfast.ops.kd_loss_pair got (see the module docstring)."""
    from patfast import ops
    from patfast.data.datasets import CIFAR100_MEAN, CIFAR100_STD
    from patfast.distill.build import DistillSettings, build_distiller
    from patfast.models.create import create_model
    from patfast.train.step import has_convs

    if teacher is None or student is None:
        teacher, student = PAIRS[name]
    torch.manual_seed(0)
    t_model, s_model = create_model(teacher, classes, img), create_model(student, classes, img)
    # the fast path's distiller (patfast.bench.train.build_step "fast"): ops "auto", the upsample-last aligners
    distiller = build_distiller("pat", s_model, t_model, DistillSettings(backend="auto",
                                                                         pat_aligner_order="upsample-last"),
                                img_size=img, data_mean=CIFAR100_MEAN, data_std=CIFAR100_STD)
    distiller.train()
    if has_convs(distiller):  # TrainStep on CUDA (Speed.channels_last): 4-D parameters and buffers channels_last
        distiller.to(memory_format=torch.channels_last)
    calls: list[tuple] = []
    real_hcl, real_pair = ops.hcl_loss_stages, ops.kd_loss_pair

    def hcl_loss_stages(feats_s, feats_t, **kwargs):
        calls.append(("hcl", [(TensorLayout.of(s), TensorLayout.of(t)) for s, t in zip(feats_s, feats_t)]))
        return real_hcl(feats_s, feats_t, **kwargs)

    def kd_loss_pair(logits_s, logits_pt, logits_t, temperature=1.0, **kwargs):
        calls.append(("kd", tuple(TensorLayout.of(x) for x in (logits_s, logits_pt, logits_t)), float(temperature)))
        return real_pair(logits_s, logits_pt, logits_t, temperature, **kwargs)

    with emulated_cuda() as mode, mock.patch.object(ops, "hcl_loss_stages", hcl_loss_stages), \
            mock.patch.object(ops, "kd_loss_pair", kd_loss_pair):
        _to_fake_cuda(mode, distiller)
        x = _fake(mode, torch.randn(batch, 3, img, img)).contiguous(memory_format=torch.channels_last)
        y = _fake(mode, torch.randint(0, classes, (batch,)))
        steps = []
        for _ in range(2):  # PAT's first step (no feedback yet), then the steady state (with feedback)
            calls.clear()
            with mode, _cuda_autocast():
                distiller(x, y)
            hcl = [c for c in calls if c[0] == "hcl"]
            kd = [c for c in calls if c[0] == "kd"]
            if len(hcl) != 1 or len(kd) != 1:
                raise RuntimeError(f"{name}: a PAT forward called hcl_loss_stages {len(hcl)} times and kd_loss_pair "
                                   f"{len(kd)} times (expected once each)")
            steps.append((tuple(hcl[0][1]), kd[0][1], kd[0][2]))
    if steps[0] != steps[1]:
        raise RuntimeError(f"{name}: the first step (no feedback) and the steady state give the ops different "
                           f"layouts:\n{steps[0]}\n{steps[1]}")
    hcl, kd, temperature = steps[1]
    return StepLayouts(name, teacher, student, hcl, kd, temperature)


def made_by(command: str) -> dict:
    """How a recording was made: command, git commit (+changes when the tree differs), date, versions."""
    import platform
    import subprocess

    import timm
    import triton

    import patfast

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*args):
        try:
            return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    head = git("rev-parse", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"command": command, "commit": head + ("+changes" if dirty else ""), "date": time.strftime("%Y-%m-%d"),
            "patfast": patfast.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "triton": triton.__version__, "python": platform.python_version()}


def record(names=None, *, command: str = "python benchmarks/record_step_layouts.py", log=print) -> dict:
    """The whole document: {"about", "made_by", "settings", "pairs": {name: StepLayouts.to_json()}}."""
    pairs = {}
    for name in names or PAIRS:
        t0 = time.monotonic()
        pairs[name] = record_pair(name).to_json()
        log(f"{name}: recorded in {time.monotonic() - t0:.1f} s")
    return {"about": HOW.format(img=IMG, classes=CLASSES, batch=BATCH), "made_by": made_by(command),
            "settings": {"img_size": IMG, "classes": CLASSES, "batch": BATCH, "variant": "paper",
                         "autocast": "cuda bfloat16", "channels_last": True, "backend": "auto",
                         "aligner_order": "upsample-last"},
            "pairs": pairs}


def dumps(doc: dict) -> str:
    """The document as JSON, indented, with each tensor's record on one line."""
    text = json.dumps(doc, indent=2)
    # an innermost object (a tensor record: numbers, strings, booleans, lists of ints) onto one line
    flat = re.compile(r"\{\n[^{}]*?\n\s*\}")
    return flat.sub(lambda m: json.dumps(json.loads(m.group(0))), text) + "\n"


def write(doc: dict, path: str = DATA_FILE) -> None:
    with open(path, "w") as f:
        f.write(dumps(doc))


def load(path: str = DATA_FILE) -> dict[str, StepLayouts]:
    """The committed records: name -> StepLayouts (in the file's order, PAIRS' order)."""
    with open(path) as f:
        doc = json.load(f)
    return {name: StepLayouts.from_json(name, d) for name, d in doc["pairs"].items()}


__all__ = ["PAIRS", "DATA_FILE", "TensorLayout", "StepLayouts", "emulated_cuda", "record_pair", "record", "load",
           "made_by", "dumps", "write"]
