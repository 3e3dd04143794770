"""GPU emulation on the CPU: the CUDA fast path's forward, run and traced on fake CUDA tensors.

What is emulated, and how:
- CUDA tensors: ``FakeTensorMode`` tensors on device "cuda" (parameters, buffers and inputs; 4-D ones channels_last,
  as TrainStep makes them). Shapes, dtypes, devices and strides are propagated by every op's real meta function;
  nothing is computed, so a full-size Swin-T costs no more than a tiny model.
- CUDA autocast: ``torch.autocast("cuda", dtype=torch.bfloat16)``, whose constructor alone checks that CUDA is
  there (``torch.cuda.is_available`` / ``is_bf16_supported`` are patched for the constructor only). Inside it, the
  ops dispatch through the real AutocastCUDA kernels: each op gets the dtype it gets on a GPU (matmuls and convs
  bf16; layer_norm, softmax and the other fp32-list ops fp32; residual adds promoted).
- Triton: ``patfast.ops`` "auto" sends CUDA tensors to the Triton kernels. Without a GPU the kernels are the
  interpreter's objects (TRITON_INTERPRET=1, tests/conftest.py); here they are replaced by ``JITFunction``s of the
  same source, and ``JITFunction.run`` by a recorder: an eager launch is counted with its tensor dtypes, not run.
  Dynamo is told that Triton can run (``torch.utils._triton.has_triton``), so it traces the launches as it does on
  a GPU (``triton_kernel_wrapper_mutation`` nodes) instead of refusing them.
- Host reads: a fake tensor has no value; ``.item()``, ``bool()`` and friends raise (eagerly) or break the graph
  (traced), so a step that reads the device fails here.

What it cannot cover: the backward through the autograd engine (it asks the CUDA driver for a primary context on
fake CUDA tensors; the kernels' own backward launchers are replayed directly instead), Inductor's code generation,
real numerics (see tests/emulation/test_rehearsal.py for a 16-bit interpreter run, and the GPU tests), and speed.
"""

from __future__ import annotations

import contextlib
import sys
import unittest.mock as mock
from dataclasses import dataclass, field

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

if torch.cuda.is_available():
    pytest.skip("GPU emulation is for machines without CUDA (the GPU tests cover a real one)",
                allow_module_level=True)

from triton.runtime.jit import JITFunction  # noqa: E402

KERNEL_MODULES = ("patfast.kernels.hcl", "patfast.kernels.kd", "patfast.kernels.raa", "patfast.kernels.dkd",
                  "patfast.kernels.dist", "patfast.kernels.ofa")


class FakeCtx:
    """Enough of an autograd context to call a torch.autograd.Function's forward and backward by hand."""

    def __init__(self, needs_input_grad: tuple[bool, ...]):
        self.needs_input_grad = needs_input_grad
        self.saved_tensors: tuple = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        pass


@dataclass
class Launch:
    module: str  # e.g. "patfast.kernels.hcl"
    kernel: str
    dtypes: tuple[torch.dtype, ...]  # of the tensor arguments, in order


@dataclass
class FakeCuda:
    """One emulated GPU: a fake-tensor mode, the kernel launch recorder, CUDA autocast and Dynamo's Triton switch."""

    mode: FakeTensorMode = field(default_factory=lambda: FakeTensorMode(allow_non_fake_inputs=False))
    launches: list[Launch] = field(default_factory=list)

    def module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Every parameter and buffer of `module` (built for real on the CPU) replaced by a fake CUDA copy, 4-D ones
        channels_last (what TrainStep does on CUDA). In place; returns `module`."""
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[name] = torch.nn.Parameter(self.tensor(p.data), p.requires_grad)
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = self.tensor(b)
        return module

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A fake CUDA copy of the real tensor `t` (4-D: channels_last)."""
        fake = self.mode.from_tensor(t)
        with self.mode:
            fake = fake.to("cuda")
            return fake.contiguous(memory_format=torch.channels_last) if fake.dim() == 4 else fake

    @staticmethod
    def autocast(dtype: torch.dtype = torch.bfloat16) -> torch.autocast:
        """CUDA autocast without CUDA: only its constructor asks whether CUDA is there."""
        with mock.patch("torch.cuda.is_available", return_value=True), \
                mock.patch("torch.cuda.is_bf16_supported", return_value=True):
            return torch.autocast("cuda", dtype=dtype)

    def modules_launched(self) -> set[str]:
        return {launch.module for launch in self.launches}

    @staticmethod
    @contextlib.contextmanager
    def record_kernel_functions(calls: list):
        """Inside the block, every call of a torch.autograd.Function defined in patfast.kernels is appended to `calls`
        as (function class, args), then run as usual."""
        original = vars(torch.autograd.Function)["apply"]  # a classmethod (Python or C, by torch version)

        def apply(cls, *args, **kwargs):
            if cls.__module__.startswith("patfast.kernels"):
                calls.append((cls, args))
            return original.__get__(None, cls)(*args, **kwargs)

        with mock.patch.object(torch.autograd.Function, "apply", classmethod(apply)):
            yield

    def replay_backward(self, cls, args) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Run `cls`'s forward and backward launchers by hand on the recorded (fake CUDA) inputs, with a gradient of
        ones in each output's dtype -> [(input, its gradient)] for the tensor inputs that require grad."""
        needs = tuple(torch.is_tensor(a) and a.requires_grad for a in args)
        ctx = FakeCtx(needs)
        with self.mode:
            with torch.no_grad():
                out = cls.forward(ctx, *args)
            outs = out if isinstance(out, tuple) else (out,)
            grads = cls.backward(ctx, *(torch.ones_like(o) for o in outs))
        grads = grads if isinstance(grads, tuple) else (grads,)
        return [(a, g) for a, g, need in zip(args, grads, needs) if need]


@pytest.fixture
def fake_cuda(monkeypatch):
    """A FakeCuda with the Triton kernels as recorded JITFunctions and Dynamo's has_triton on, for one test."""
    import patfast.ops  # noqa: F401  (imports the kernel modules as the dispatch does)

    emulated = FakeCuda()
    for name in KERNEL_MODULES:
        module = sys.modules.get(name) or __import__(name, fromlist=["_"])
        for attr, value in list(vars(module).items()):
            fn = getattr(value, "fn", None)
            if fn is not None and not isinstance(value, JITFunction) and type(value).__name__ == "InterpretedFunction":
                monkeypatch.setattr(module, attr, JITFunction(fn))

    def record(self, *args, grid, warmup=False, **kwargs):
        dtypes = tuple(a.dtype for a in args if torch.is_tensor(a))
        emulated.launches.append(Launch(self.fn.__module__, self.fn.__name__, dtypes))

    monkeypatch.setattr(JITFunction, "run", record)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    torch._dynamo.reset()
    yield emulated
    torch._dynamo.reset()
