"""`patfast bench train`: images/s of a PAT training step, the fast path against the reference path, one process.

Paths (patfast/train/step.py):
  fast       torch.compile of the distiller, bf16 autocast (on a CPU only with native bf16), channels_last on CUDA,
             Triton ops "auto",
             the aligners' upsample-last rewrite, fused SGD on CUDA
  reference  eager, fp16 autocast + grad scaler on CUDA (fp32 on the CPU: fp16 autocast is not how anyone runs on a
             CPU), reference ops, plain aligners: how the authors' code runs
  floor      the teacher and student passes alone, compiled and bf16 like the fast path: a clean teacher forward,
             a teacher forward + activation backward (the prompted pass without prompts), student forward +
             backward + SGD on a cross-entropy; no RAA, aligners, prompts or PAT losses
Random-initialised timm models, synthetic images and labels already on the device (`--loader DATA` also times the
real loader's batch delivery). Each path: `--warmup` untimed steps (compilation, and the recompile when the
feedback first exists), then `--steps` timed steps (CUDA events; host clock on the CPU); peak memory on CUDA.

`--json` is written before the first path (every path "not measured: not reached") and rewritten after each path:
a run killed midway keeps the paths it measured. A path (or its split, or the loader) that raises is FAILED in the
row, with the exception; the next path still runs, and the exit status is 1. `--dry-run` runs the fast path's ops
with backend "triton" on CPU tensors, through the Triton interpreter (TRITON_INTERPRET=1).

The time split comes from torch.profiler (torch's CPU-only profiler on a machine without CUDA: measure.Profiled)
over a few eager steps of each path's settings (compiled code has no
module boundaries): forward time of each region (clean teacher, prompted teacher, student, RAA + aligners, losses =
the rest of the forward), backward time attributed to the region whose forward op created each autograd node
(matched by sequence number), optimizer (+ EMA-free update) and, with --loader, the data wait.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

from patfast.bench.measure import Profiled, num, use_triton_interpreter
from patfast.bench.record import FAILED, NOT_REACHED, error_text, mark_failed, write_json
from patfast.errors import UserError
from patfast.train.config import COMPILE_MODES

PATHS = ("fast", "reference", "floor")
REGIONS = ("teacher_clean", "teacher_prompted", "student", "raa_aligners", "losses", "optimizer", "data_wait")


def add_options(parser) -> None:
    parser.add_argument("--teacher", default="swin_tiny_patch4_window7_224", help="teacher timm model")
    parser.add_argument("--student", default="resnet18", help="student timm model")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--pat-dim", type=int, default=512, help="PAT's RAA / aligner width (default 512)")
    parser.add_argument("--pat-heads", type=int, default=8, help="PAT's RAA heads (default 8)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path (default 20)")
    parser.add_argument("--warmup", type=int, default=4,
                        help="untimed steps first (compilation; default 4): at least 2 when compiling, 1 with "
                             "--no-compile")
    parser.add_argument("--paths", default="fast,reference,floor", help="comma list of fast, reference, floor")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    parser.add_argument("--split", action=argparse.BooleanOptionalAction, default=True,
                        help="profile the time split (default on)")
    parser.add_argument("--loader", default=None, metavar="DATA",
                        help="also time the real loader (e.g. digits) with --data-backend: the data wait")
    parser.add_argument("--data-backend", default="auto", choices=("auto", "torch", "gpu", "dali"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--fast-ops", default="auto", choices=("auto", "triton"),
                        help="backend of the fast path's ops: auto (Triton on CUDA; default) or triton (also on CPU "
                             "tensors, through the Triton interpreter: what --dry-run uses)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="compile the fast path and the floor (default on; --dry-run turns it off)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny models and sizes on the CPU, nothing compiled, the fast path's Triton ops through "
                             "the interpreter (the harness's code paths only)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the row (a one-row list) as JSON here, rewritten after every path")
    parser.add_argument("--md", default=None, metavar="PATH")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(args, device, path: str):
    """(TrainStep-like callable, distiller or None) for `path`, from `patfast bench train`'s options."""
    return build_step(path, args.teacher, args.student, args.classes, args.img_size, device,
                      compile=args.compile, compile_mode=args.compile_mode, fast_ops=args.fast_ops,
                      pat_dim=args.pat_dim, pat_heads=args.pat_heads)


def build_step(path: str, teacher: str, student: str, classes: int, img_size: int, device, *, compile: bool = True,
               compile_mode: str = "default", fast_ops: str = "auto", pat_dim: int = 512, pat_heads: int = 8):
    """The benchmarks' one PAT-step builder -> (step, distiller or None); ``step(x, y, step=i)`` does one training
    step. Random-initialised timm models; ``path`` is "fast", "reference" or "floor" (module docstring)."""
    import torch

    from patfast.data.datasets import CIFAR100_MEAN, CIFAR100_STD
    from patfast.distill.build import DistillSettings, build_distiller
    from patfast.models.create import create_model
    from patfast.train.optim import make_optimizer
    from patfast.train.step import Speed, TrainStep

    cuda = device.type == "cuda"
    torch.manual_seed(0)
    t_model = create_model(teacher, classes, img_size)
    s_model = create_model(student, classes, img_size)
    if path == "floor":
        return FloorStep(t_model, s_model, device, compile_mode if compile else None), None
    backend = fast_ops if path == "fast" else "reference"
    settings = DistillSettings(pat_dim=pat_dim, pat_heads=pat_heads, backend=backend,
                               pat_aligner_order="upsample-last" if path == "fast" else "plain")
    distiller = build_distiller("pat", s_model, t_model, settings, img_size=img_size, data_mean=CIFAR100_MEAN,
                                data_std=CIFAR100_STD).to(device)
    distiller.train()
    params = distiller.trainable_parameters()
    optimizer = make_optimizer(params, "sgd", 0.01, 1e-4, fused=cuda and path == "fast")
    if path == "fast":
        speed = Speed(compile=compile, compile_mode=compile_mode,
                      amp=torch.bfloat16 if fast_bf16(device) else None, channels_last=cuda)
    else:
        speed = Speed(compile=False, compile_mode="default", amp=torch.float16 if cuda else None, channels_last=False)
    return TrainStep(distiller, optimizer, params, speed, device), distiller


def pat_step_rate(teacher: str, student: str, batch: int, img_size: int, device, *, steps: int = 10,
                  warmup: int = 3, classes: int = 100) -> dict:
    """Images/s a PAT step of (teacher -> student) consumes at (batch, img_size), the fast path's settings run
    eagerly (what `patfast bench data` sets a loader against) -> {"img_s", "step_ms", "timer", "amp", "how"}."""
    import torch

    step, _ = build_step("fast", teacher, student, classes, img_size, device, compile=False)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size, device=device, generator=g)
    y = torch.randint(0, classes, (batch,), device=device, generator=g)
    ms, _, _ = time_steps(step, x, y, steps, warmup, device)
    timer = "CUDA events" if device.type == "cuda" else "host clock (CPU)"
    return {"img_s": batch * 1e3 / ms, "step_ms": ms, "timer": timer,
            "amp": "bf16" if step.speed.amp is not None else "fp32", "how": step.speed.describe()}


def fast_bf16(device) -> bool:
    """bf16 on the fast path: always on CUDA; on a CPU only where it has native bf16 (AVX512-BF16 / AMX)."""
    import torch

    if device.type == "cuda":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class FloorStep:
    """The teacher and student passes alone (compiled, bf16 on CUDA): see the module docstring."""

    def __init__(self, teacher, student, device, compile_mode: str | None):
        import torch

        self.device = device
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.student = student.to(device).train()
        if device.type == "cuda":
            self.teacher.to(memory_format=torch.channels_last)
            self.student.to(memory_format=torch.channels_last)
        self.amp = torch.bfloat16 if fast_bf16(device) else None
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=0.01, momentum=0.9,
                                         **({"fused": True} if device.type == "cuda" else {}))
        self.forward = self._forward
        if compile_mode is not None:  # None: eager (dry runs)
            self.forward = torch.compile(self._forward, mode=None if compile_mode == "default" else compile_mode)

    def _forward(self, x, y):
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            clean = self.teacher(x)
        prompted = self.teacher(x.detach().requires_grad_())
        logits = self.student(x)
        return F.cross_entropy(logits.float(), y) + prompted.float().mean() + 0 * clean.float().mean()

    def __call__(self, x, y, step: int = 0):
        import torch

        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext():
            loss = self.forward(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}


def time_steps(step, x, y, steps: int, warmup: int, device) -> tuple[float, float, float | None]:
    """-> (ms per step, warm-up seconds, peak GiB on CUDA or None)."""
    import torch

    t0 = time.perf_counter()
    for i in range(warmup):
        step(x, y, step=i)
    _sync(device)
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(steps):
            step(x, y, step=warmup + i)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / steps, warm_s, torch.cuda.max_memory_allocated(device) / 2**30
    t0 = time.perf_counter()
    for i in range(steps):
        step(x, y, step=warmup + i)
    return (time.perf_counter() - t0) * 1e3 / steps, warm_s, None


def time_split(step, distiller, x, y, device, steps: int = 3) -> dict[str, float]:
    """ms per step in each region (REGIONS), from torch.profiler over `steps` eager steps (see module docstring)."""
    from torch.autograd.profiler import record_function

    open_ranges = []

    def enter(label_of):
        def hook(module, args):
            rf = record_function(f"pf::{label_of()}")
            rf.__enter__()
            open_ranges.append(rf)
        return hook

    def leave(module, args, out):
        open_ranges.pop().__exit__(None, None, None)

    teacher_label = lambda: "teacher_prompted" if distiller.teacher.taps.prompting else "teacher_clean"  # noqa: E731
    handles = []
    for module, label in ((distiller.teacher.model, teacher_label), (distiller.student, lambda: "student"),
                          (distiller.raa, lambda: "raa_aligners"), (distiller.aligners, None)):
        if label is None:
            for a in module:
                handles += [a.register_forward_pre_hook(enter(lambda: "raa_aligners")),
                            a.register_forward_hook(leave)]
            continue
        handles += [module.register_forward_pre_hook(enter(label)), module.register_forward_hook(leave)]
    eager = step.forward
    step.forward = distiller  # eager: module boundaries exist
    try:
        step(x, y)  # warm
        _sync(device)
        with Profiled(cuda=device.type == "cuda") as prof:
            for _ in range(steps):
                with record_function("pf::step"):
                    step(x, y)
            _sync(device)
    finally:
        step.forward = eager
        for h in handles:
            h.remove()
    return _attribute(prof.events(), device.type == "cuda", steps)


def _attribute(events, cuda: bool, steps: int) -> dict[str, float]:
    """Region -> ms per step: forward by enclosing pf:: range; backward nodes by their forward op's region."""
    def t(e):  # microseconds of device (CUDA) or CPU time, children included
        return (getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)) if cuda else e.cpu_time_total

    def region(e):
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("pf::") and p.name != "pf::step":
                return p.name[4:]
            p = p.cpu_parent
        return None

    out = dict.fromkeys(REGIONS, 0.0)
    seq_region = {}
    forward_total = 0.0
    for e in events:
        if e.name.startswith("pf::") and e.name != "pf::step":
            if region(e) is None:  # outermost range only (the teacher may sit inside nothing else)
                out[e.name[4:]] += t(e)
        if e.sequence_nr is not None and e.sequence_nr >= 0 and not e.name.startswith("autograd::"):
            r = region(e)
            if r is not None:
                seq_region.setdefault((e.thread, e.sequence_nr), r)
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function"):
            r = seq_region.get(_node_of(e))
            if r is not None:
                out[r] += t(e)
        if e.name.startswith("Optimizer.step") or e.name.startswith("Optimizer.zero_grad"):
            out["optimizer"] += t(e)
        if e.name == "pf::step":
            forward_total += t(e)
    # losses: what the step spent outside every other region (the loss ops and their backward, glue)
    out["losses"] = max(0.0, forward_total - sum(out.values()))
    return {k: v / 1e3 / steps for k, v in out.items()}


def _node_of(e) -> tuple:
    """(forward thread, sequence number) of the autograd node an evaluate_function event runs: on the event itself
    (Kineto), else on its child, the node's own event (torch's CPU-only profiler leaves the parent's at -1)."""
    for x in (e, *e.cpu_children):
        if x.sequence_nr is not None and x.sequence_nr >= 0:
            return getattr(x, "fwd_thread", x.thread), x.sequence_nr
    return None, None


def parse_paths(text: str) -> list[str]:
    paths = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in paths if p not in PATHS]
    if bad or not paths:
        raise UserError(f"--paths takes a comma list of {', '.join(PATHS)}, got '{text}'")
    return paths


def check_warmup(warmup: int, compile: bool, paths: list[str]) -> None:
    """--warmup: >= 2 when something is compiled (the fast path or the floor with --compile: step 0 compiles, and
    the fast path's step 1 recompiles with the feedback); else >= 1 (PAT's step 0 runs without the feedback, unlike
    every later step, so it is never timed). The reference path is never compiled."""
    compiled = compile and any(p in ("fast", "floor") for p in paths)
    if compiled and warmup < 2:
        raise UserError(f"--warmup must be >= 2 when the fast path or the floor is compiled (step 0 compiles, and "
                        f"the fast path's step 1 again, with the feedback), got {warmup}; with --no-compile >= 1")
    if warmup < 1:
        raise UserError(f"--warmup must be >= 1 (PAT's first step runs without the feedback, unlike the steps that "
                        f"are timed), got {warmup}")


def new_row(args, device, paths: list[str]) -> dict:
    """The pair's row before anything ran: every figure None, every asked path "not reached"."""
    missing = [p for p in PATHS if p not in paths]
    return {"pair": f"{args.teacher} -> {args.student}", "batch": args.batch_size, "img_size": args.img_size,
            "device": str(device), "fast_img_s": None, "reference_img_s": None, "floor_img_s": None,
            "fast_peak_gb": None, "reference_peak_gb": None, "split": {}, "compile": args.compile,
            "paths": {p: {"note": NOT_REACHED} for p in paths},
            "note": f"not measured: {', '.join(missing)} (not in --paths)" if missing else None}


def failures(row: dict) -> list[str]:
    """"<what>: <error>" for every part of the row that raised (a path, its split, the loader)."""
    out = [f"{path}: {p['error']}" for path, p in row.get("paths", {}).items() if p.get("error")]
    out += [f"{path} split: {s['error']}" for path, s in row.get("split", {}).items() if s.get("error")]
    if row.get("data_wait_error"):
        out.append(f"loader: {row['data_wait_error']}")
    return out


def run_pair(args, device, save=lambda row: None) -> dict:
    """Measure every path of --paths into one row, calling ``save(row)`` after each (and once before the first)."""
    import torch

    paths = parse_paths(args.paths)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device, generator=g)
    y = torch.randint(0, args.classes, (args.batch_size,), device=device, generator=g)
    row = new_row(args, device, paths)
    save(row)
    width = max(9, *(len(path_label(p, args.compile)) for p in paths))
    for path in paths:
        label = f"{path_label(path, args.compile):>{width}}"
        step = distiller = None
        try:
            step, distiller = _build(args, device, path)
            ms, warm_s, peak = time_steps(step, x, y, args.steps, args.warmup, device)
        except Exception as e:  # noqa: BLE001 (recorded as FAILED; the next path still runs)
            text = mark_failed(row["paths"][path], e)
            save(row)
            print(f"{label}: {FAILED}: {text}", flush=True)
            del step, distiller
            _free(device)
            continue
        row[f"{path}_img_s"] = args.batch_size * 1e3 / ms
        if path != "floor":
            row[f"{path}_peak_gb"] = peak
        row["paths"][path] = {"step_ms": ms, "warmup_s": warm_s, "peak_gb": peak,
                              "how": step.speed.describe() if hasattr(step, "speed")
                              else ("compiled" if args.compile else "eager") + " floor"}
        if path == "fast":
            row["paths"][path]["ops"] = args.fast_ops
        save(row)
        print(f"{label}: {num(row[f'{path}_img_s'])} img/s ({ms:.1f} ms/step, warm-up {warm_s:.1f} s"
              + (f", peak {peak:.2f} GiB" if peak is not None else "") + ")", flush=True)
        if args.split and distiller is not None and args.dry_run and path == "fast":
            row["split"][path] = {"note": "not measured: dry run (the split's code runs on the reference path; "
                                          "through the Triton interpreter the fast path's ops are slow)"}
        elif args.split and distiller is not None:
            try:
                row["split"][path] = time_split(step, distiller, x, y, device, steps=1 if args.dry_run else 3)
            except Exception as e:  # noqa: BLE001
                row["split"][path] = {"error": error_text(e)}
                print(f"{label}: split {FAILED}: {error_text(e)}", flush=True)
            save(row)
        del step, distiller
        _free(device)
    if args.loader:
        try:
            row["data_wait_ms"] = _loader_ms(args, device)
            for split in row["split"].values():
                if "error" not in split and "note" not in split:
                    split["data_wait"] = row["data_wait_ms"]
        except Exception as e:  # noqa: BLE001
            row["data_wait_error"] = error_text(e)
            print(f"   loader: {FAILED}: {row['data_wait_error']}", flush=True)
        save(row)
    return row


def _free(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()


def _loader_ms(args, device) -> float:
    from patfast.data import make_loader

    loader = make_loader(args.loader, "train", backend=args.data_backend, batch_size=args.batch_size,
                         img_size=args.img_size, train=True, device=device)
    it = iter(loader)
    next(it)
    _sync(device)
    t0, n = time.perf_counter(), min(5, len(loader) - 1)
    for _ in range(n):
        next(it)
    _sync(device)
    return (time.perf_counter() - t0) * 1e3 / max(n, 1)


def _img_s(r: dict, path: str) -> str:
    if r.get(f"{path}_img_s") is not None:
        return num(r[f"{path}_img_s"])
    return FAILED if (r.get("paths") or {}).get(path, {}).get("error") else "not measured"


NO_COMPILE = "no torch.compile"


def path_label(path: str, compile: bool) -> str:
    """A path's name as printed: the fast path and the floor say when they ran without torch.compile."""
    return f"{path} ({NO_COMPILE})" if not compile and path in ("fast", "floor") else path


def compiled(r: dict) -> bool:
    """Whether the row's fast path and floor were compiled: its "compile" (--compile / --no-compile; --dry-run
    compiles nothing), else, in rows written before it existed, the fast path's "how"."""
    if r.get("compile") is not None:
        return bool(r["compile"])
    return not str(((r.get("paths") or {}).get("fast") or {}).get("how") or "").startswith("eager")


def render(rows: list[dict]) -> str:
    """The markdown table of `bench train` rows, with the notes: a path not measured (why), the splits, and, for
    rows run with --no-compile, that their fast path and floor are not the compiled ones."""
    uncompiled = [r for r in rows if not compiled(r)]
    every = bool(rows) and len(uncompiled) == len(rows)  # else the note names the pairs
    fast, floor = (path_label(p, not every) for p in ("fast", "floor"))
    lines = [f"| pair | batch | size | {fast} img/s | reference img/s | fast / reference | {floor} img/s | "
             "fast / floor | peak GiB fast / ref |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_ref = f"{r['fast_img_s'] / r['reference_img_s']:.2f}x" if r["fast_img_s"] and r["reference_img_s"] \
            else "not measured"
        vs_floor = f"{r['fast_img_s'] / r['floor_img_s']:.0%}" if r["fast_img_s"] and r["floor_img_s"] \
            else "not measured"
        peaks = f"{num(r['fast_peak_gb'])} / {num(r['reference_peak_gb'])}"
        lines.append(f"| {r['pair']} | {r['batch']} | {r['img_size']} | {_img_s(r, 'fast')} | "
                     f"{_img_s(r, 'reference')} | {vs_ref} | {_img_s(r, 'floor')} | {vs_floor} | {peaks} |")
    for r in uncompiled:
        fast_how = ((r.get("paths") or {}).get("fast") or {}).get("how")
        ops = ((r.get("paths") or {}).get("fast") or {}).get("ops")
        what = f" (here {fast_how}" + (f", ops {ops}" if ops else "") + ")" if fast_how else ""
        lines.append(f"\n{f'fast ({NO_COMPILE})' if every else r['pair'] + ': fast'} is the fast path without "
                     f"torch.compile{what}, not the compiled fast path `patfast train` runs on CUDA (bench train "
                     "times that without --no-compile); the floor likewise without torch.compile.")
    for r in rows:
        for path, p in (r.get("paths") or {}).items():
            if r.get(f"{path}_img_s") is None and p.get("note"):
                lines.append(f"\n{r['pair']}, {path}: {p['note']}")
        for path, split in r.get("split", {}).items():
            if split.get("error") or split.get("note"):
                lines.append(f"\nSplit, {r['pair']}, {path}: "
                             + (f"{FAILED}: {split['error']}" if split.get("error") else split["note"]))
                continue
            parts = ", ".join(f"{k} {v:.1f}" for k, v in split.items() if v)
            lines.append(f"\nSplit, {r['pair']}, {path} settings run eagerly (ms per step, torch.profiler): {parts}")
    return "\n".join(lines)


def main(args) -> int:
    for name in ("batch_size", "img_size", "steps", "classes"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    paths = parse_paths(args.paths)
    if args.dry_run:  # tiny and eager: step 0 runs without the feedback, the timed step 1 with it
        args.teacher, args.student, args.img_size, args.batch_size = "convnext_atto", "resnet10t", 32, 2
        args.steps, args.warmup, args.device, args.classes, args.compile = 1, 1, "cpu", 10, False
        args.fast_ops, args.pat_dim, args.pat_heads = "triton", 64, 4
    check_warmup(args.warmup, args.compile, paths)
    if args.fast_ops == "triton":  # before patfast.ops is imported (no-op on CUDA)
        use_triton_interpreter("bench train --fast-ops triton on the CPU")
    from patfast.train.loop import resolve_device

    device = resolve_device(args.device)

    def save(row: dict) -> None:
        if args.json:
            write_json([row], args.json)

    row = run_pair(args, device, save)
    text = render([row])
    print()
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    failed = failures(row)
    for line in failed:
        print(f"bench train: {FAILED}: {line}", flush=True)
    return 1 if failed else 0
