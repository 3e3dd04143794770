"""How the benchmarks measure and show figures: the timing loop, quantiles, the number format, the environment
record, the profiler, and the switch to Triton's interpreter on a CPU."""

from __future__ import annotations

import os
import sys
import time

QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80


def bench_ms(fn, cuda: bool, *, warmup_ms: float = 25, rep_ms: float = 60, cpu_reps: int = 5,
             cpu_max_s: float = 2.0) -> tuple[float, float, float, str]:
    """Time ``fn()`` -> (median ms, p20 ms, p80 ms, how it was timed).

    CUDA: triton.testing.do_bench (events, L2 cleared before each call). CPU: perf_counter around each call after
    one warm-up call, ``cpu_reps`` calls, fewer (at least one) once ``cpu_max_s`` has passed: the CPU figures
    only ever come from the dry-run sizes, where the point is to run the code.
    """
    if cuda:
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
        return float(med), float(p20), float(p80), "triton.testing.do_bench (CUDA events, L2 flushed)"
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + cpu_max_s
    while len(times) < cpu_reps and (not times or time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    med, p20, p80 = quantiles(times, QUANTILES)
    return med, p20, p80, "host clock around each call, 1 to 5 calls (CPU)"


def environment() -> dict:
    """patfast.train.report.environment() plus the GPU's details, the packaging tools' versions (the GPU image's
    setuptools / wheel decide whether the editable install works) and the date."""
    import datetime
    from importlib import metadata

    import torch

    from patfast.train.report import environment as base

    env = base()
    env.setdefault("gpu", None)
    for name in ("pip", "setuptools", "wheel"):
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = "not installed"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_capability=f"{props.major}.{props.minor}", gpu_sms=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
    env["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return env


class Profiled:
    """``with Profiled(cuda) as p: ...`` then ``p.events()``: the ops run inside, as torch's FunctionEvents (name,
    cpu_parent / cpu_children, sequence_nr, thread, fwd_thread, device_type, cpu_time_total, device time).

    On a machine with CUDA: torch.profiler (Kineto), with CPU activity when ``cpu``, CUDA activity when ``cuda``.
    On a machine without CUDA, torch's CPU-only profiler instead, which does not go through Kineto: Kineto probes
    for GPUs as a trace ends and writes to stderr from C++ (``gpuGetDeviceCount failed with code 35``,
    ``profiler_start`` / ``profiler_stop``) on every CPU run of the split or the launch count. The CPU-only
    profiler records the same CPU events (torch marks it deprecated, so far without a warning); a torch without it
    falls back to torch.profiler.
    """

    def __init__(self, cuda: bool, cpu: bool = True):
        import torch

        self._legacy = False
        if not torch.cuda.is_available():
            try:
                from torch.autograd.profiler_legacy import profile as legacy
            except ImportError:  # a torch without it: torch.profiler below
                legacy = None
            if legacy is not None:
                import warnings

                with warnings.catch_warnings():  # its deprecation, should a torch emit one: not the user's concern
                    warnings.filterwarnings("ignore", message=".*profiler_legacy.*")
                    self._prof = legacy()
                self._legacy = True
        if not self._legacy:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU] * cpu + [ProfilerActivity.CUDA] * cuda)

    def __enter__(self) -> Profiled:
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)

    def events(self) -> list:
        return list(self._prof.function_events if self._legacy else self._prof.events())


def use_triton_interpreter(what: str) -> None:
    """Make Triton run through its interpreter (no CUDA): set TRITON_INTERPRET=1, which only works before triton
    (or patfast.ops) is first imported; a UserError if that is too late."""
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        from patfast.errors import UserError

        raise UserError(f"{what} needs TRITON_INTERPRET=1 in the environment before start")
    os.environ["TRITON_INTERPRET"] = "1"


def num(x: float | None) -> str:
    """A measured figure with 3-4 significant digits (GB/s, TFLOP/s); None -> "not measured"."""
    if x is None:
        return "not measured"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"


def quantiles(values: list[float], qs) -> list[float]:
    """Linear-interpolated quantiles (numpy's default method) of ``values``."""
    xs = sorted(values)
    out = []
    for q in qs:
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return out
