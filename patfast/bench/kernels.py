"""Kernel benchmarks on PAT's shapes: HCL over 4 teacher stages, the KD / PAT KL pair (`patfast bench kernels`).

Cases
    hcl_loss_stages  HCL summed over the 4 stages of a teacher at 224 (what PAT's loss_fd computes):
                       swin_t      tokens (B,3136,96) (B,784,192) (B,196,384) (B,49,768)
                       convnext_t  maps   (B,96,56,56) (B,192,28,28) (B,384,14,14) (B,768,7,7)
                       resnet50    maps   (B,256,56,56) (B,512,28,28) (B,1024,14,14) (B,2048,7,7)
                       vit_s       tokens (B,196,384) x 4 (the recorded step's shapes, below)
                     student and teacher features both require grad (the backward writes both gradients).
                     "same layout": both sides contiguous, in the bench dtype (bf16 on CUDA, fp32 on the CPU).
                     "<teacher>-><student> (as in the step)": the shapes, dtypes, strides and storage offsets
                     patfast.ops.hcl_loss_stages got in a PAT training step of that pair, recorded on the CUDA fast
                     path (patfast/bench/step_layouts.py, step_layouts.json; benchmarks/record_step_layouts.py),
                     rebuilt at the bench batch size with torch.empty_strided; each tensor in its recorded dtype
                     whatever the bench dtype. Pairs: swin_t->resnet18, convnext_t->deit_t, resnet50->deit_t,
                     vit_s->mobilenetv2 (--teacher selects them by their teacher).
    kd_loss_pair     PAT's two KL terms (s vs t at T, prompted teacher pt vs t at 1), logits (B, K), T = 1;
                     gradients to s and pt (t is the no-grad clean teacher). Also "K=<k> (as in the step)": the
                     logits as patfast.ops.kd_loss_pair got them in the recorded steps (one case per distinct
                     record; every pair's is the same: bf16, contiguous (B, 100), which on CUDA is the K=100
                     same-layout case again), where --classes selects its K.
    kd_loss          plain KD, logits (B, K), T = 1; gradient to s.
    dkd_loss         Decoupled KD, logits (B, K) and (B,) int64 targets, mdistiller's alpha = 1, beta = 8, T = 4;
                     gradient to s.
    dist_loss        DIST, logits (B, K), OFA-KD's beta = gamma = 1, T = 1; gradient to s.
    ofa_loss         OFA's branch loss, logits (B, K) and (B,) int64 targets, OFA-KD's eps = 1, T = 1; gradient to s.
                     (dkd_loss, dist_loss and ofa_loss: with --op all, the default; --op kd is PAT's two KL ops.)
    raa_block        region-aware attention, the whole block: LayerNorm -> q / kv Linear -> +pos on q, k
                     -> 8-head softmax attention; tokens (B, 64, 512), pos (1, 64, 512) (paper variant); gradients
                     to tokens, every parameter and pos. All tensors in the input dtype (bf16 on CUDA, params too).
    raa_core         the attention core alone: q, k, v (B, 8, 64, 64) -> softmax(q k^T / 8) v; gradients to q, k, v.
    B = 64, 128, 256; K = 100, 1000; modes "fwd" and "fwd+bwd" (torch.autograd.grad of the losses with
    precomputed ones as grad_outputs, so no fill kernel is timed).
Providers (one process, one card, the same inputs)
    eager     the op with backend="reference" (patfast.kernels.reference: stock PyTorch)
    compiled  torch.compile(the same call, dynamic=False), compiled once per shape and warmed up before timing
    triton    the op with backend="triton" (the fused kernels)
    RAA also (its providers differ per op, see PROVIDERS_OF):
    sdpa_flash / sdpa_cudnn  the same PyTorch front (raa_block) followed by F.scaled_dot_product_attention with that
              backend pinned (torch.nn.attention.sdpa_kernel); a backend that is unavailable is recorded as not
              measured with PyTorch's reason. CUDA only (on the CPU "flash" would pick PyTorch's CPU kernel).
    raa_core: eager = softmax(q k^T * scale) v in stock PyTorch, triton = patfast.kernels.raa.raa_core; no compiled.
    torch.compile(raa_block reference): the row records whether Inductor rewrote the attention to an SDPA op
    ("inductor_sdpa": "yes (<op>)" / "no" / "unknown (<why>)", read from the generated code).
    On CUDA, inputs are bfloat16 and every provider runs under torch.autocast(bf16), as a training step does.
Rows of hcl_loss_stages and kd_loss_pair say "layout": "same layout" or "as in the step"; those as in the step also
"pairs" (the recorded pairs) and "inputs" (per input: per-sample shape, dtype, strides), and their "dtype" is their
inputs' dtypes joined by "+" (e.g. "bfloat16+float32": bf16 students, a fp32 teacher stage).
Traffic model (the bytes each figure's GB/s counts; the floor a perfect kernel must move)
    HCL  fwd: read fs + ft = 2 tensor passes; fwd+bwd: 6 passes (fwd reads 2, bwd reads 2 and writes 2 grads)
         (as in the step: the same passes, each tensor and its gradient at its own dtype's size)
    KD   the logits read and the gradients written: kd_loss fwd 2 passes, fwd+bwd 5 (2 + read 2, write 1);
         kd_loss_pair fwd 3 passes, fwd+bwd 8 (3 + read 3, write 2); a pass = B * K elements.
         dkd_loss, dist_loss, ofa_loss as kd_loss: fwd 2, fwd+bwd 5 (the floor: targets and per-row statistics
         are O(B); DIST's kernels read the logits again (docs/kernels.md#dist), which the floor does not count).
    RAA core  T = B*H*N*hd elements (one of q, k, v, O), L = B*H*N fp32 LSE values: fwd reads q, k, v and writes O and
              LSE = 4T + L; bwd reads q, k, v, dO, LSE and writes dQ, dK, dV = 7T + L; fwd+bwd = 11T + 2L.
    RAA block X = B*N*D (tokens, output), P = parameters + pos = 3D^2 + 5D + N*D: fwd reads tokens and P and writes
              the output = 2X + P; fwd+bwd adds reading dOut, tokens and P and writing dTokens and the grads of P
              = 5X + 3P. Intermediates (q, k, v, O) are not counted: the floor of a fully fused block.
    RAA fwd+bwd rows also time the backward alone ("ms_bwd": autograd.grad with retain_graph on a saved forward).
Also measured: kernel launches per call (torch.profiler CUDA kernel events; forward and backward separately) for
each fwd+bwd row, and for the launch-bound KD ops the time per call when replayed from a CUDA graph
(triton.testing.do_bench_cudagraph: no host gaps between launches).
On the CPU only the reference providers run, at tiny batch sizes: Triton kernels run there only through the
interpreter, so their timings would be meaningless.
After the rows: the performance model of each Triton case (patfast.bench.kernel_model, kernels/perf_model.py).
"""

from __future__ import annotations

import functools
import json
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from patfast import ops
from patfast.bench.measure import Profiled, bench_ms, num, use_triton_interpreter
from patfast.bench.record import FAILED, error_text, mark_failed, row_failures, write_json
from patfast.errors import UserError

TEACHERS: dict[str, tuple[tuple[int, ...], ...]] = {  # per-sample stage shapes at 224
    "swin_t": ((3136, 96), (784, 192), (196, 384), (49, 768)),
    "convnext_t": ((96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)),
    "resnet50": ((256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)),
}
KD_CLASSES = (100, 1000)
KD_OPS = ("kd_loss_pair", "kd_loss")  # --op kd: PAT's KL terms
BASELINE_OPS = ("dkd_loss", "dist_loss", "ofa_loss")  # the baselines' logit losses: --op all only (see build_cases)
LOGIT_OPS = (*KD_OPS, *BASELINE_OPS)  # every (B, K) logits case: the same inputs, providers, CUDA-graph timing
RAA_OPS = ("raa_block", "raa_core")
OPS = ("hcl_loss_stages", *LOGIT_OPS, *RAA_OPS)
PROVIDERS = ("eager", "compiled", "triton")
SDPA_PROVIDERS = ("sdpa_flash", "sdpa_cudnn")
PROVIDERS_OF = {op: PROVIDERS for op in ("hcl_loss_stages", *LOGIT_OPS)} | {
    "raa_block": ("eager", "compiled", *SDPA_PROVIDERS, "triton"),
    "raa_core": ("eager", *SDPA_PROVIDERS, "triton"),
}
RAA_TOKENS, RAA_DIM, RAA_HEADS = 64, 512, 8  # PAT's region-aware attention: N = 64 tokens, D = 512, 8 heads
RAA_HEAD_DIM = RAA_DIM // RAA_HEADS
MODES = ("fwd", "fwd+bwd")
CUDA_BATCHES = (64, 128, 256)
TEMPERATURE = 1.0  # PAT's default
DKD_ARGS = (1.0, 8.0, 4.0)  # alpha, beta, T: mdistiller's DKD defaults
DIST_ARGS = (1.0, 1.0, 1.0)  # beta, gamma, T: OFA-KD's DIST defaults
OFA_ARGS = (1.0, 1.0)  # eps, T: OFA-KD's defaults
INTERPRET_TOLERANCE = 1e-3  # largest rel. error of an interpreter run (fp32, CPU) vs the reference; else FAILED


def interpret_tolerance(dtype: torch.dtype) -> float:
    """The largest rel. error (norm-wise) of an interpreter output of ``dtype`` vs the float32 reference:
    INTERPRET_TOLERANCE, or for a 16-bit output (the gradients of 16-bit inputs) one unit in its last place, the
    rounding of the output alone (the interpreter converts float32 to bfloat16 by truncation, not to nearest, so
    its bf16 gradients sit up to one ulp off; measured 4e-3 to 5e-3 on the recorded bf16 cases)."""
    if dtype in (torch.float16, torch.bfloat16):
        return max(INTERPRET_TOLERANCE, torch.finfo(dtype).eps)
    return INTERPRET_TOLERANCE

PASSES = {  # (fwd, fwd+bwd) tensor passes of the traffic model
    "hcl_loss_stages": (2, 6),
    "kd_loss_pair": (3, 8),
    "kd_loss": (2, 5),
    "dkd_loss": (2, 5),
    "dist_loss": (2, 5),
    "ofa_loss": (2, 5),
}

NO_CUDA = ("no CUDA: Triton kernels run only through the interpreter here, timings would be meaningless; "
           "reference providers only")
NO_CUDA_SDPA = ("no CUDA: the flash and cuDNN SDPA backends exist on a GPU only (on the CPU SDPBackend.FLASH_ATTENTION "
                "would select PyTorch's CPU kernel, a different thing); reference providers only")


STEP = " (as in the step)"  # the name suffix of the cases built from a recorded step (step_layouts.json)
SAME_LAYOUT, STEP_LAYOUT = "same layout", "as in the step"
LAYOUT_OPS = ("hcl_loss_stages", "kd_loss_pair")  # the ops that have cases as in the step: rows say which layout


@dataclass(frozen=True)
class Case:
    op: str  # one of OPS
    name: str  # HCL: the teacher; KD: "K=<classes>"; as in the step: "<pair> (as in the step)", "K=<k> (as ...)"
    batch: int
    shapes: tuple[tuple[int, ...], ...]  # HCL: one per stage (the student's); KD: the (B, K) of each logits tensor
    # as in the step: the recorded layout of every input (HCL: the students' stages, then the teachers'; KD pair:
    # s, pt, t), each a step_layouts.TensorLayout; None: the same layout (contiguous, the bench dtype)
    inputs: tuple | None = None
    pairs: tuple[str, ...] = ()  # as in the step: the recorded pairs whose inputs these are
    temperature: float | None = None  # KD pair as in the step: the recorded T (None: TEMPERATURE)

    @property
    def layout(self) -> str:
        return SAME_LAYOUT if self.inputs is None else STEP_LAYOUT

    def dtype_name(self, dtype: torch.dtype) -> str:
        """The rows' "dtype": the bench dtype, or the recorded inputs' dtypes ("bfloat16+float32")."""
        if self.inputs is None:
            return str(dtype).removeprefix("torch.")
        return "+".join(dict.fromkeys(x.dtype for x in self.inputs))

    def inputs_text(self) -> list[str]:
        """As in the step: one line per input, e.g. "student stage 1: (3136,96) bfloat16 strides (1,3136)"."""
        if self.inputs is None:
            return []
        if self.op == "hcl_loss_stages":
            n = len(self.inputs) // 2
            roles = [f"{side} stage {i}" for side in ("student", "teacher") for i in range(1, n + 1)]
        else:
            roles = ["logits_s", "logits_pt", "logits_t"]
        return [f"{role}: {x.layout_text()}" + ("" if x.requires_grad else ", no grad")
                for role, x in zip(roles, self.inputs)]

    @property
    def shape(self) -> list:
        """JSON form: HCL a list of stage shapes, KD the (B, K) of one logits tensor."""
        return [list(s) for s in self.shapes] if self.op == "hcl_loss_stages" else list(self.shapes[0])

    def elements(self) -> int:
        """Elements of one tensor pass (HCL: one input over all stages; KD: one logits tensor; RAA: one of q / k /
        v / O (core) or of tokens / output (block))."""
        total = 0
        for s in self.shapes if self.op == "hcl_loss_stages" else self.shapes[:1]:
            n = 1
            for d in s:
                n *= d
            total += n
        return total

    def _step_bytes(self) -> tuple[int, int]:
        """As in the step: (bytes of one read of every input, bytes of one write of every gradient), each tensor
        (batch x per-sample elements, gaps not counted) at its own dtype's size."""
        read = grads = 0
        for x in self.inputs:
            n = self.batch * _numel(x.shape) * torch.empty((), dtype=x.torch_dtype).element_size()
            read += n
            grads += n if x.requires_grad else 0
        return read, grads

    def traffic_bytes(self, mode: str, itemsize: int) -> int:
        fwd = mode == "fwd"
        if self.inputs is not None:  # fwd reads every input once; fwd+bwd reads them again and writes the grads
            read, grads = self._step_bytes()
            return read if fwd else 2 * read + grads
        if self.op == "raa_core":
            lse = self.elements() // self.shapes[0][-1] * 4  # fp32, one per (b, h, token)
            return (4 if fwd else 11) * self.elements() * itemsize + (1 if fwd else 2) * lse
        if self.op == "raa_block":
            x, params = self.elements(), raa_params(self.shapes[0][1], self.shapes[0][2])
            return ((2 * x + params) if fwd else (5 * x + 3 * params)) * itemsize
        return PASSES[self.op][MODES.index(mode)] * self.elements() * itemsize

    def traffic_text(self, mode: str, itemsize: int) -> str:
        fwd = mode == "fwd"
        if self.inputs is not None:
            read, grads = self._step_bytes()
            return (f"{read} B (every input read once, each in its own dtype)" if fwd else
                    f"2 x {read} B (inputs read in fwd and bwd) + {grads} B (gradients written), each in its own "
                    "dtype")
        if self.op == "raa_core":
            lse = self.elements() // self.shapes[0][-1]
            return (f"{4 if fwd else 11} x {self.elements()} elements x {itemsize} B + {1 if fwd else 2} x {lse} "
                    "fp32 LSE")
        if self.op == "raa_block":
            x, params = self.elements(), raa_params(self.shapes[0][1], self.shapes[0][2])
            return (f"({'2' if fwd else '5'} x {x} activations + {'1' if fwd else '3'} x {params} params/pos) "
                    f"x {itemsize} B")
        return f"{PASSES[self.op][MODES.index(mode)]} passes x {self.elements()} elements x {itemsize} B"


def raa_params(tokens: int, dim: int) -> int:
    """Elements of RAA's parameters and pos: LayerNorm 2D, q D^2 + D, kv 2D^2 + 2D, pos (1, N, D)."""
    return 3 * dim * dim + 5 * dim + tokens * dim


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@functools.cache
def step_records() -> dict:
    """The recorded steps, pair name -> step_layouts.StepLayouts ({} when the data file cannot be read; then
    step_records_error() says why)."""
    from patfast.bench import step_layouts

    try:
        return step_layouts.load()
    except (OSError, ValueError, KeyError, TypeError) as e:
        _STEP_ERROR.append(f"{step_layouts.DATA_FILE}: {type(e).__name__}: {e}")
        return {}


_STEP_ERROR: list[str] = []


def step_records_error() -> str | None:
    step_records()
    return _STEP_ERROR[0] if _STEP_ERROR else None


def step_teacher(pair: str) -> str:
    """The teacher of a recorded pair's name: "swin_t->resnet18" -> "swin_t" (the --teacher that selects it)."""
    return pair.split("->")[0]


def teacher_names() -> list[str]:
    """--teacher's names: TEACHERS, then the teachers of recorded pairs that TEACHERS lacks (vit_s)."""
    extra = [step_teacher(p) for p in step_records() if step_teacher(p) not in TEACHERS]
    return [*TEACHERS, *dict.fromkeys(extra)]


def hcl_stage_shapes(teacher: str) -> tuple[tuple[int, ...], ...]:
    """Per-sample stage shapes of a teacher: TEACHERS, or (for a recorded pair's teacher TEACHERS lacks) the
    recorded step's."""
    if teacher in TEACHERS:
        return TEACHERS[teacher]
    for pair, record in step_records().items():
        if step_teacher(pair) == teacher:
            return tuple(s.shape for s, _ in record.hcl)
    raise KeyError(teacher)


def hcl_case(teacher: str, batch: int) -> Case:
    """The same-layout case: both sides contiguous, in the bench dtype."""
    return Case("hcl_loss_stages", teacher, batch, tuple((batch, *s) for s in hcl_stage_shapes(teacher)))


def hcl_step_case(pair: str, batch: int) -> Case:
    """HCL as in the recorded step of ``pair``: the students' and teachers' recorded layouts at ``batch``."""
    record = step_records()[pair]
    students, teachers = zip(*record.hcl)
    return Case("hcl_loss_stages", pair + STEP, batch, tuple(s.size(batch) for s in students),
                inputs=(*students, *teachers), pairs=(pair,))


def kd_step_cases(pairs, batch: int) -> list[Case]:
    """kd_loss_pair as in the recorded steps of ``pairs``: one case per distinct record (the pairs that share it
    in ``Case.pairs``), named "K=<k> (as in the step)" (with the first pair's name where two records share K)."""
    groups: dict[tuple, list[str]] = {}
    for pair in pairs:
        record = step_records()[pair]
        groups.setdefault((record.kd_pair, record.temperature), []).append(pair)
    per_k: dict[int, int] = {}
    for (logits, _), _ in groups.items():
        per_k[logits[0].shape[-1]] = per_k.get(logits[0].shape[-1], 0) + 1
    cases = []
    for (logits, temperature), names in groups.items():
        k = logits[0].shape[-1]
        name = f"K={k}" + ("" if per_k[k] == 1 else f" {names[0]}") + STEP
        cases.append(Case("kd_loss_pair", name, batch, (logits[0].size(batch),), inputs=logits, pairs=tuple(names),
                          temperature=temperature))
    return cases


def kd_case(op: str, classes: int, batch: int) -> Case:
    return Case(op, f"K={classes}", batch, ((batch, classes),))


def raa_case(op: str, batch: int) -> Case:
    """raa_block: tokens (B, 64, 512); raa_core: q, k, v (B, 8, 64, 64)."""
    shape = (batch, RAA_TOKENS, RAA_DIM) if op == "raa_block" else (batch, RAA_HEADS, RAA_TOKENS, RAA_HEAD_DIM)
    return Case(op, f"N={RAA_TOKENS},D={RAA_DIM},H={RAA_HEADS}", batch, (shape,))


def build_cases(op: str, teachers, classes, batches) -> list[Case]:
    """The same-layout cases of ``teachers`` (those TEACHERS or a recorded pair has shapes for), then the cases as
    in the step of the recorded pairs whose teacher is in ``teachers`` (KD: those whose recorded K is in
    ``classes``)."""
    cases = []
    pairs = [p for p in step_records() if step_teacher(p) in teachers]
    if op in ("hcl", "all"):
        cases += [hcl_case(t, b) for t in teachers for b in batches]
        cases += [hcl_step_case(p, b) for p in pairs for b in batches]
    if op in ("kd", "all"):
        cases += [kd_case(o, k, b) for o in KD_OPS for k in classes for b in batches]
        # as in the step: the recorded K, where --classes selects it (the default 100,1000 does)
        by_batch = [[c for c in kd_step_cases(pairs, b) if c.shapes[0][-1] in classes] for b in batches]
        cases += [cs[i] for i in range(len(by_batch[0]) if by_batch else 0) for cs in by_batch]
    if op == "all":  # not in --op kd, whose cases and output gpu_check.sh's kd step and its tests count
        cases += [kd_case(o, k, b) for o in BASELINE_OPS for k in classes for b in batches]
    if op in ("raa", "all"):
        cases += [raa_case(o, b) for o in RAA_OPS for b in batches]
    return cases


# ----------------------------------------------------------------------------------------------------------------
# Running one (case, provider, mode)
# ----------------------------------------------------------------------------------------------------------------


def make_inputs(case: Case, mode: str, device: torch.device, dtype: torch.dtype) -> tuple[tuple, list]:
    """(args of the op, the tensors whose gradients fwd+bwd computes); fresh random inputs, never zeros."""
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(f"{case.op} {case.name} {case.batch} {mode}".encode()))
    grad = mode == "fwd+bwd"

    def rand(shape, requires_grad, scale=1.0):
        x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(scale).to(dtype)
        return x.requires_grad_(requires_grad)

    def rand_as(layout, scale=1.0):  # as in the step: the recorded dtype, strides and offset, filled in place
        x = layout.empty(case.batch, device)
        x.copy_(torch.randn(x.shape, generator=gen, device=device, dtype=torch.float32).mul_(scale))
        return x.requires_grad_(grad and layout.requires_grad)

    if case.inputs is not None:
        xs = [rand_as(x, 1.0 if case.op == "hcl_loss_stages" else 3.0) for x in case.inputs]
        wants = [x for x, layout in zip(xs, case.inputs) if grad and layout.requires_grad]
        if case.op == "hcl_loss_stages":
            n = len(xs) // 2
            return (xs[:n], xs[n:]), wants
        temperature = TEMPERATURE if case.temperature is None else case.temperature
        return (*xs, temperature), wants
    if case.op == "hcl_loss_stages":
        fs = [rand(s, grad) for s in case.shapes]
        ft = [rand(s, grad) for s in case.shapes]
        return (fs, ft), fs + ft
    if case.op == "raa_core":
        q, k, v = (rand(case.shapes[0], grad) for _ in range(3))
        return (q, k, v), [q, k, v]
    if case.op == "raa_block":
        b, n, d = case.shapes[0]
        tensors = [rand((b, n, d), grad), 1.0 + rand((d,), grad, 0.1), rand((d,), grad, 0.1),
                   rand((d, d), grad, d**-0.5), rand((d,), grad, 0.1), rand((2 * d, d), grad, d**-0.5),
                   rand((2 * d,), grad, 0.1), rand((1, n, d), grad, 0.5)]
        tensors[1] = tensors[1].detach().requires_grad_(grad)  # a leaf (1.0 + ... is not)
        return (*tensors, RAA_HEADS), tensors
    shape = case.shapes[0]
    s, t = rand(shape, grad, 3.0), rand(shape, False, 3.0)
    if case.op == "kd_loss":
        return (s, t, TEMPERATURE), [s]
    if case.op == "dkd_loss":
        target = torch.randint(0, shape[1], (shape[0],), generator=gen, device=device)
        return (s, t, target, *DKD_ARGS), [s]
    if case.op == "dist_loss":
        return (s, t, *DIST_ARGS), [s]
    if case.op == "ofa_loss":
        target = torch.randint(0, shape[1], (shape[0],), generator=gen, device=device)
        return (s, t, target, *OFA_ARGS), [s]
    pt = rand(shape, grad, 3.0)
    return (s, pt, t, TEMPERATURE), [s, pt]


def _float32_copies(args: tuple, grad_inputs: list) -> tuple[tuple, list]:
    """``args`` with every 16-bit tensor (also inside lists) replaced by a float32 copy (a leaf, requiring grad as
    the original did), and ``grad_inputs`` mapped to the copies: the reference's inputs for a 16-bit case."""
    copies: dict[int, torch.Tensor] = {}

    def up(x):
        if isinstance(x, list):
            return [up(v) for v in x]
        if not torch.is_tensor(x) or x.dtype not in (torch.float16, torch.bfloat16):
            return x
        copies[id(x)] = x.detach().float().requires_grad_(x.requires_grad)
        return copies[id(x)]

    new = tuple(up(a) for a in args)
    return new, [copies.get(id(x), x) for x in grad_inputs]


SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}


def raa_core_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) v in stock PyTorch (the reference's attention, alone)."""
    return torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1) @ v


def raa_block_sdpa(tokens, norm_weight, norm_bias, q_weight, q_bias, kv_weight, kv_bias, pos, num_heads):
    """The reference's front (LayerNorm, q / kv Linear, +pos) followed by F.scaled_dot_product_attention."""
    import torch.nn.functional as F

    from patfast.kernels.reference import LAYER_NORM_EPS

    b, n, d = tokens.shape
    xn = F.layer_norm(tokens, (d,), norm_weight, norm_bias, LAYER_NORM_EPS)
    q = F.linear(xn, q_weight, q_bias) + pos
    k, v = F.linear(xn, kv_weight, kv_bias).split(d, dim=-1)
    k = k + pos
    q, k, v = (t.unflatten(-1, (num_heads, d // num_heads)).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d).to(tokens.dtype)


def _raa_function(case: Case, provider: str) -> Callable:
    if provider in SDPA_BACKENDS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKENDS[provider])
        inner = raa_block_sdpa if case.op == "raa_block" else torch.nn.functional.scaled_dot_product_attention

        def pinned(*args):
            with sdpa_kernel(backend):
                return inner(*args)

        return pinned
    if case.op == "raa_block":
        backend = "triton" if provider == "triton" else "reference"
        return lambda *args: ops.raa_attention(*args, backend=backend)
    if provider == "triton":
        from patfast.kernels.raa import raa_core

        return lambda q, k, v: raa_core(q, k, v, q.shape[-1] ** -0.5)
    return raa_core_eager


def op_function(case: Case, provider: str, amp: bool) -> Callable:
    """The call a provider makes: eager/compiled use backend="reference", triton backend="triton"; RAA's SDPA
    providers the front + F.scaled_dot_product_attention under sdpa_kernel(<backend>)."""
    if case.op in RAA_OPS:
        op = _raa_function(case, provider)
        backend = None
    else:
        op = getattr(ops, case.op)
        backend = "triton" if provider == "triton" else "reference"

    def call(*args):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            return op(*args) if backend is None else op(*args, backend=backend)

    if provider == "compiled":
        return torch.compile(call, dynamic=False)
    return call


class Runner:
    """One (case, provider, mode) ready to run: ``step()`` is the timed call; forward/backward for profiling."""

    def __init__(self, fn: Callable, args: tuple, grad_inputs: list, mode: str):
        self.fn, self.args, self.grad_inputs, self.mode = fn, args, grad_inputs, mode
        self.grad_outputs: list | None = None

    def forward(self) -> tuple:
        out = self.fn(*self.args)
        return out if isinstance(out, tuple) else (out,)

    def backward(self, outs: tuple):
        if self.grad_outputs is None:
            self.grad_outputs = [torch.ones_like(o) for o in outs]
        return torch.autograd.grad(outs, self.grad_inputs, self.grad_outputs)

    def step(self):
        outs = self.forward()
        return self.backward(outs) if self.mode == "fwd+bwd" else outs


def count_launches(runner: Runner, cuda: bool) -> tuple[list[str], list[str]]:
    """Names of the GPU kernels (and memsets/copies) one forward and one backward launch, from torch.profiler.

    On the CPU this runs the same code with CPU activity only (so the dry run exercises it; without CUDA through
    torch's CPU-only profiler, measure.Profiled) and finds no GPU kernels; the caller reports that as not measured.
    """
    from torch.autograd import DeviceType

    def kernels(fn):
        with Profiled(cuda=cuda, cpu=not cuda) as prof:
            out = fn()
            if cuda:
                torch.cuda.synchronize()
        return out, [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]

    outs, fwd = kernels(runner.forward)
    _, bwd = kernels(lambda: runner.backward(outs))
    return fwd, bwd


def graph_ms(runner: Runner) -> tuple[float, float | None, float | None]:
    """(median, p20, p80) ms per call replayed from a CUDA graph (no host gaps between the launches)."""
    from triton.testing import do_bench_cudagraph

    try:
        med, p20, p80 = do_bench_cudagraph(runner.step, rep=20, quantiles=[0.5, 0.2, 0.8])
    except TypeError as e:  # an older Triton without quantiles here: the median alone
        if "quantiles" not in str(e):
            raise
        return float(do_bench_cudagraph(runner.step, rep=20, return_mode="median")), None, None
    return float(med), float(p20), float(p80)


_SDPA_IN_CODE = re.compile(r"(_scaled_dot_product_\w+|scaled_dot_product_attention|_flash_attention_\w+|"
                           r"_efficient_attention_\w+|_cudnn_attention_\w+)")


def sdpa_in_code(codes: list[str]) -> str:
    """Whether Inductor's generated code calls an SDPA op: "yes (<op>)", "no", or "unknown (<why>)"."""
    if not codes:
        return "unknown (no code was generated on the inspected call)"
    m = _SDPA_IN_CODE.search("\n".join(codes))
    return f"yes ({m.group(1)})" if m else "no"


def inspect_compiled(runner: Runner) -> str:
    """Run one (first, compiling) step of a torch.compile'd runner and read Inductor's code for an SDPA rewrite."""
    try:
        from torch._inductor.utils import run_and_get_code
    except ImportError:
        runner.step()
        return "unknown (torch._inductor.utils.run_and_get_code is not available in this torch)"
    _, codes = run_and_get_code(runner.step)
    return sdpa_in_code(codes)


_SDPA_UNAVAILABLE = re.compile(r"No available kernel|No viable backend")


def sdpa_unavailable(provider: str, e: BaseException) -> bool:
    """An SDPA backend PyTorch has no kernel for here (shape, dtype, GPU): not measured, not a failure."""
    return provider in SDPA_BACKENDS and bool(_SDPA_UNAVAILABLE.search(str(e)))


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------


class Bench:
    """Measures every (case, mode, provider) row; writes JSON/markdown after every row (a timeout keeps them)."""

    def __init__(self, cases: list[Case], *, cuda: bool, compiled: bool, compiled_batches, quick: bool,
                 budget: float | None, interpret_check: bool, env: dict, ceilings: dict,
                 json_path: str | None, md_path: str | None, log=print, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        """``cuda``: time as on a GPU (Triton provider, do_bench, launches, CUDA graphs). ``device``/``dtype``
        default to cuda/bf16 or cpu/fp32; the tests pass cpu with cuda=True to run the GPU logic on fakes."""
        self.cases, self.cuda, self.quick, self.budget = cases, cuda, quick, budget
        self.compiled, self.compiled_batches = compiled, compiled_batches
        self.interpret_check = interpret_check and not cuda
        # CPU timing: a few calls; one in a dry run (--interpret-check), where only the code paths matter
        self._cpu_reps = {"cpu_reps": 1, "cpu_max_s": 0.0} if self.interpret_check else {"cpu_reps": 5,
                                                                                          "cpu_max_s": 1.0}
        self.device = device or torch.device("cuda" if cuda else "cpu")
        self.dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
        self.amp = self.device.type == "cuda"  # autocast(bf16) around every provider, as a training step runs
        self.env, self.ceilings = env, ceilings
        self.json_path, self.md_path, self.log = json_path, md_path, log
        self.rows: dict[tuple, dict] = {}
        self._profiled: set[str] = set()
        self.start = time.monotonic()
        for case in cases:  # every row exists from the start: what is never reached stays "not measured"
            for mode in MODES:
                for provider in PROVIDERS_OF[case.op]:
                    self.rows[(case, mode, provider)] = self._row(case, mode, provider,
                                                                  self._skip_reason(case, provider))

    # -- rows --------------------------------------------------------------------------------------------------

    def _skip_reason(self, case: Case, provider: str) -> str:
        if provider == "triton" and not self.cuda:
            return NO_CUDA
        if provider in SDPA_BACKENDS and not self.cuda:
            return NO_CUDA_SDPA
        if provider == "compiled":
            if not self.compiled:
                return ("torch.compile on the CPU is slow; pass --compiled to time it" if not self.cuda
                        else "torch.compile(reference) not requested (--no-compiled)")
            if self.compiled_batches is not None and case.batch not in self.compiled_batches:
                sizes = ",".join(map(str, sorted(self.compiled_batches)))
                return (f"torch.compile(reference) timed at B={sizes} only (each shape compiles once, the expensive "
                        "part of a GPU run; --compiled-batch all times every batch)")
        return "not reached"

    def _row(self, case: Case, mode: str, provider: str, note: str | None) -> dict:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return {
            "op": case.op, "case": case.name, "batch": case.batch, "shape": case.shape,
            "dtype": case.dtype_name(self.dtype), "mode": mode, "provider": provider,
            "device": self.device.type, "ms": None, "ms_p20": None, "ms_p80": None, "gbps": None,
            "bytes": case.traffic_bytes(mode, itemsize),
            "traffic": case.traffic_text(mode, itemsize),
            "timer": None, "launches_fwd": None, "launches_bwd": None, "kernels_fwd": None, "kernels_bwd": None,
            "ms_graph": None, "ms_graph_p20": None, "ms_graph_p80": None,
            "note": None if note is None else f"not measured: {note}",
        } | ({"ms_bwd": None, "ms_bwd_p20": None, "ms_bwd_p80": None} if case.op in RAA_OPS and mode == "fwd+bwd"
             else {}) | ({"inductor_sdpa": None} if case.op == "raa_block" and provider == "compiled" else {}) \
            | ({"layout": case.layout} if case.op in LAYOUT_OPS else {}) \
            | ({"pairs": list(case.pairs), "inputs": case.inputs_text()} if case.inputs is not None else {})

    def doc(self) -> dict:
        """{"env", "ceilings", "kernels"}: the rows with their ratios (tables.derive)."""
        from patfast.bench.tables import derive

        rows = derive([dict(r) for r in self.rows.values()], self.ceilings or {})
        return {"env": self.env, "ceilings": self.ceilings, "kernels": rows}

    def save(self) -> None:
        from patfast.bench.tables import render

        doc = self.doc()
        if self.json_path:
            write_json(doc, self.json_path)
        if self.md_path:
            with open(self.md_path, "w") as f:
                f.write(render(doc["kernels"]) + "\n")

    # -- measuring ---------------------------------------------------------------------------------------------

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _free(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def measure(self, case: Case, mode: str, provider: str, fn: Callable | None = None) -> None:
        row = self.rows[(case, mode, provider)]
        label = f"{case.op:<16} {case.name:<10} B={case.batch:<4} {mode:<8} {provider:<8}"
        t0 = time.monotonic()
        runner = None
        try:
            args, grad_inputs = make_inputs(case, mode, self.device, self.dtype)
            runner = Runner(fn or op_function(case, provider, amp=self.amp), args, grad_inputs, mode)
            warm = 3 if provider == "compiled" else 1
            if provider == "compiled" and case.op == "raa_block":  # the first (compiling) call, its code read
                row["inductor_sdpa"] = inspect_compiled(runner)
                warm -= 1
            for _ in range(warm):  # compile (fwd and bwd graphs), JIT, warm up
                runner.step()
            self._sync()
            warmup, rep = (10, 30) if self.quick else (25, 60)
            med, p20, p80, timer = bench_ms(runner.step, self.cuda, warmup_ms=warmup, rep_ms=rep,
                                            **self._cpu_reps)
            row.update(ms=med, ms_p20=p20, ms_p80=p80, gbps=row["bytes"] / (med * 1e-3) / 1e9, timer=timer,
                       note=None)
            if mode == "fwd+bwd" and case.op in RAA_OPS:
                self._backward_alone(row, runner, warmup, rep)
            if mode == "fwd+bwd":
                self._launches(row, runner)
            if self.cuda and case.op in LOGIT_OPS and provider != "compiled":
                try:
                    row["ms_graph"], row["ms_graph_p20"], row["ms_graph_p80"] = graph_ms(runner)
                except Exception as e:  # noqa: BLE001 (recorded as FAILED, never fatal)
                    row["graph_error"] = error_text(e)
            self.log(f"  {label} {row['ms']:9.4f} ms  {num(row['gbps']):>8} GB/s  ({time.monotonic() - t0:.1f} s)"
                     + "".join(f"  {FAILED}: {f}" for f in row_failures(row)))
        except Exception as e:  # noqa: BLE001 (one failing row must not stop the others)
            if sdpa_unavailable(provider, e):
                row["note"] = f"not measured: {error_text(e)}"
                self.log(f"  {label} not measured: {error_text(e)}")
            else:
                mark_failed(row, e)
                self.log(f"  {label} {row['note']}")
        finally:
            del runner
            self._free()
        self.save()

    def _backward_alone(self, row: dict, runner: Runner, warmup: float, rep: float) -> None:
        """ms_bwd: the backward alone, autograd.grad(retain_graph=True) of one saved forward, timed the same way."""
        try:
            outs = runner.forward()
            grad_outputs = [torch.ones_like(o) for o in outs]

            def backward():
                return torch.autograd.grad(outs, runner.grad_inputs, grad_outputs, retain_graph=True)

            backward()
            self._sync()
            med, p20, p80, _ = bench_ms(backward, self.cuda, warmup_ms=warmup, rep_ms=rep, **self._cpu_reps)
            row.update(ms_bwd=med, ms_bwd_p20=p20, ms_bwd_p80=p80)
        except Exception as e:  # noqa: BLE001 (recorded as FAILED, never fatal)
            row["bwd_error"] = error_text(e)

    def _launches(self, row: dict, runner: Runner) -> None:
        if not self.cuda:  # nothing to count; the dry run still runs the profiler code once per op
            if not self.interpret_check or row["op"] in self._profiled:
                return
            self._profiled.add(row["op"])
        try:
            fwd, bwd = count_launches(runner, self.cuda)
        except Exception as e:  # noqa: BLE001 (recorded as FAILED, never fatal)
            row["launches_error"] = error_text(e)
            return
        if self.cuda:
            row.update(launches_fwd=len(fwd), launches_bwd=len(bwd), kernels_fwd=fwd, kernels_bwd=bwd)

    def interpret(self, case: Case, mode: str) -> None:
        """No CUDA: run the Triton provider once through the interpreter and compare with the reference (untimed).
        A raise, or an output further from the reference than interpret_tolerance(its dtype), is FAILED in the
        Triton row. The reference runs on the same values in float32 (16-bit inputs as in the step upcast)."""
        row = self.rows[(case, mode, "triton")]
        label = f"  {case.op} {case.name} B={case.batch} {mode} triton (interpreter)"
        try:
            args, grad_inputs = make_inputs(case, mode, self.device, self.dtype)
            got = Runner(op_function(case, "triton", amp=False), args, grad_inputs, mode).step()
            args, grad_inputs = _float32_copies(*make_inputs(case, mode, self.device, self.dtype))
            want = Runner(op_function(case, "eager", amp=False), args, grad_inputs, mode).step()
            errs = [(float((g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-30)),
                     interpret_tolerance(g.dtype)) for g, w in zip(got, want)]
            err = max(e for e, _ in errs)
            row["interpreter_rel_err"] = err  # a check of the harness, not a figure of the kernel's speed
            off = [(e, tol) for e, tol in errs if not e <= tol]
            if off:
                e, tol = max(off)
                raise AssertionError(f"interpreter outputs differ from the reference: rel. error {e:.2e} > "
                                     f"{tol:.0e}")
            self.log(f"{label} ran, rel. error {err:.1e}")
        except Exception as e:  # noqa: BLE001 (recorded as FAILED; the other cases still run)
            mark_failed(row, e, "interpreter check")
            self.log(f"{label} {row['note']}")
        self.save()

    def _compiled_wanted(self, case: Case) -> bool:
        return (self.compiled and "compiled" in PROVIDERS_OF[case.op]
                and (self.compiled_batches is None or case.batch in self.compiled_batches))

    def _compiled_first(self, case: Case) -> bool:
        """Target cases whose compiled reference is a target's baseline: compiled right after their phase 1."""
        return is_target(case) and case.op in ("hcl_loss_stages", "raa_block") and self._compiled_wanted(case)

    def _measure_compiled(self, case: Case) -> None:
        for mode in ("fwd+bwd", "fwd"):
            if self.budget is not None and time.monotonic() - self.start > self.budget:
                self.rows[(case, mode, "compiled")]["note"] = (
                    f"not measured: the time budget of this step ({self.budget:.0f} s) ran out before this "
                    "shape was compiled")
                continue
            self.measure(case, mode, "compiled", fn=op_function(case, "compiled", amp=self.amp))
        torch._dynamo.reset()  # this shape's graphs are done with; free them

    def run(self) -> dict:
        self.save()
        _raise_compile_limits()
        # Phase 1: eager and Triton everywhere (cheap), the target cases (benchmarks/targets.json) first, and the
        # target HCL case's compiled reference right after it (its ratio is a target). Phase 2: the other compiled
        # shapes (each one compiles: the expensive part), most useful first, while the time budget lasts.
        for case in target_first(self.cases):
            for mode in MODES:
                self.measure(case, mode, "eager")
                if self.cuda:
                    self.measure(case, mode, "triton")
                    for provider in PROVIDERS_OF[case.op]:
                        if provider in SDPA_BACKENDS:
                            self.measure(case, mode, provider)
                elif self.interpret_check:
                    self.interpret(case, mode)
            if self._compiled_first(case):
                self._measure_compiled(case)
        rest = [c for c in self.cases if self._compiled_wanted(c) and not self._compiled_first(c)]
        priority = {"swin_t": 0, "swin_t->resnet18" + STEP: 0.5, "K=1000": 1, "K=100": 2}
        rest.sort(key=lambda c: (priority.get(c.name, 3), OPS.index(c.op) if c.name.startswith("K") else 0))
        for case in rest:
            self._measure_compiled(case)
        self.save()
        return self.doc()


def is_target(case: Case) -> bool:
    """The cases benchmarks/targets.json judges (HCL Swin-T at B=128, the KD pair at B=256, RAA block and core at
    B=128; the same-layout cases): run first, so that a GPU run cut short still has them."""
    if case.inputs is not None:
        return False
    return (case.op, case.name, case.batch) == ("hcl_loss_stages", "swin_t", 128) or \
        (case.op == "kd_loss_pair" and case.batch == 256) or (case.op in RAA_OPS and case.batch == 128)


def is_target_in_the_step(case: Case) -> bool:
    """A target's counterpart as in the step (HCL of swin_t->resnet18 at B=128, the KD pair at B=256): run right
    after the targets, so that a GPU run cut short still compares the step's layouts with the same-layout case."""
    if case.inputs is None:
        return False
    return (case.op == "hcl_loss_stages" and case.batch == 128 and case.name.startswith("swin_t->")) or \
        (case.op == "kd_loss_pair" and case.batch == 256)


def target_first(cases: list[Case]) -> list[Case]:
    rank = [0 if is_target(c) else 1 if is_target_in_the_step(c) else 2 for c in cases]
    return [c for r in (0, 1, 2) for c, rc in zip(cases, rank) if rc == r]


def _raise_compile_limits() -> None:
    """Every shape is a new graph of the same function: keep dynamo from falling back to eager after 8."""
    import torch._dynamo.config as dynamo_config

    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
    for name in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 1024))


# ----------------------------------------------------------------------------------------------------------------
# `patfast bench kernels`
# ----------------------------------------------------------------------------------------------------------------


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"bench: {what} must be comma-separated positive integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UserError(f"bench: {what} must be comma-separated positive integers, got {text!r}")
    return values


def _names(text: str | None, allowed, what: str) -> list[str]:
    if text is None:
        return list(allowed)
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        raise UserError(f"bench: unknown {what} {', '.join(bad) or repr(text)}; choose from {', '.join(allowed)}")
    return names


def main(args) -> int:
    cuda = torch.cuda.is_available()
    if args.interpret_check and not cuda:
        use_triton_interpreter("bench: --interpret-check")
    if args.batch is not None:
        batches = _int_list(args.batch, "--batch")
    elif cuda:
        batches = [128] if args.quick else list(CUDA_BATCHES)
    else:
        batches = [1]
    teachers = _names(args.teacher, teacher_names(), "teacher")
    classes = _int_list(args.classes, "--classes") if args.classes else list(KD_CLASSES)
    if args.quick:
        teachers, classes = (teachers[:1], classes[-1:]) if cuda else (teachers[:1], classes[:1])
    compiled = cuda if args.compiled is None else args.compiled
    compiled_batches = None if args.compiled_batch == "all" else set(_int_list(args.compiled_batch,
                                                                              "--compiled-batch"))
    if compiled_batches is not None and not cuda and args.compiled:
        compiled_batches |= set(batches)  # on the CPU --compiled means the (tiny) batches of this run

    from patfast.bench.ceilings import describe
    from patfast.bench.ceilings import measure as measure_ceilings
    from patfast.bench.measure import environment
    from patfast.bench.tables import render, render_text

    env = environment()
    print(f"patfast bench kernels | {env.get('gpu') or 'CPU (no CUDA GPU)'} | torch {env['torch']} | "
          f"triton {env['triton']} | cuda {env['cuda']}", flush=True)
    if not cuda:
        if args.op in ("raa", "all"):
            print(f"RAA: {NO_CUDA_SDPA}.", flush=True)
        print(f"{NO_CUDA}. CPU sizes: batch {','.join(map(str, batches))}, float32"
              + ("" if compiled else "; torch.compile(reference) off (slow on the CPU; --compiled turns it on)")
              + ".", flush=True)
    ceilings = None
    if args.ceilings:
        try:
            with open(args.ceilings) as f:
                ceilings = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"bench: cannot read ceilings from {args.ceilings}: {e}") from None
        ceilings = ceilings.get("ceilings", ceilings)  # a ceilings JSON or a whole results.json
        if ceilings.get("copy_gbps") is None:
            print(f"no measured ceilings in {args.ceilings}: measuring them here", flush=True)
            ceilings = None
    if ceilings is None:
        try:
            ceilings = measure_ceilings()
        except Exception as e:  # noqa: BLE001 (the kernels are still worth timing; fractions become not measured)
            ceilings = {"copy_gbps": None, "bf16_tflops": None, "error": error_text(e),
                        "note": f"{FAILED}: {error_text(e)}"}
    print(describe(ceilings), flush=True)

    cases = build_cases(args.op, teachers, classes, batches)
    if args.op in ("hcl", "kd", "all"):
        steps = [c for c in cases if c.inputs is not None]
        error = step_records_error()
        names = sorted({c.name for c in steps})
        if error or names:
            print(f"cases as in the step: none ({error})" if error else
                  f"cases as in the step: {', '.join(names)}; their inputs in the recorded dtypes and layouts "
                  "(patfast/bench/step_layouts.json), the same-layout cases contiguous in the bench dtype",
                  flush=True)
    bench = Bench(cases, cuda=cuda, compiled=compiled, compiled_batches=compiled_batches, quick=args.quick,
                  budget=args.budget, interpret_check=args.interpret_check, env=env, ceilings=ceilings,
                  json_path=args.json, md_path=args.md, log=lambda line: print(line, flush=True))
    doc = bench.run()
    from patfast.bench import kernel_model

    print("performance model" + (": compile-only builds for the registers ..." if args.model_registers else " ..."),
          flush=True)
    # without CUDA the model is of GPU-sized cases (B = 128 unless --batch, bf16), not of the CPU's tiny ones
    model_cases = cases if cuda else build_cases(args.op, teachers, classes,
                                                 _int_list(args.batch, "--batch") if args.batch is not None
                                                 else [128])
    doc["model"] = kernel_model.model(model_cases, MODES, bench.dtype if cuda else torch.bfloat16, ceilings, cuda,
                                      rows=doc["kernels"], registers=args.model_registers)
    if args.json:
        write_json(doc, args.json)
    if args.md:
        with open(args.md, "a") as f:
            f.write("\n## Performance model\n\n```text\n" + kernel_model.render_text(doc["model"]) + "\n```\n")
    model_text = kernel_model.render_text(doc["model"], detail=bool(args.md))
    print()
    # --md: the markdown tables (also written to the file); else a compact plain-text table
    print(render(doc["kernels"]) if args.md else render_text(doc["kernels"]), flush=True)
    print("\n" + model_text, flush=True)
    failed = [(r, f) for r in doc["kernels"] for f in row_failures(r)]
    for r, f in failed:
        print(f"bench kernels: {FAILED}: {r['op']} {r['case']} B={r['batch']} {r['mode']} {r['provider']}: {f}",
              flush=True)
    return 1 if failed else 0


__all__ = ["Case", "Bench", "Runner", "TEACHERS", "KD_CLASSES", "PROVIDERS", "PROVIDERS_OF", "RAA_OPS", "MODES",
           "KD_OPS", "BASELINE_OPS", "LOGIT_OPS", "DKD_ARGS", "DIST_ARGS", "OFA_ARGS",
           "NO_CUDA", "NO_CUDA_SDPA", "build_cases", "hcl_case", "kd_case", "raa_case", "sdpa_in_code",
           "inspect_compiled", "make_inputs", "op_function", "count_launches", "is_target", "target_first", "main"]
