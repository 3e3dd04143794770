"""pytest-benchmark suite over the kernel cases of ``patfast bench kernels`` (patfast/bench/kernels.py).

    python -m pytest benchmarks/bench_kernels.py                  tiny CPU reference cases (run anywhere)
    python -m pytest benchmarks/bench_kernels.py -m gpu           CUDA: eager / compiled / Triton on PAT shapes
                                                                   (RAA also SDPA flash / cuDNN pinned)
    ... --benchmark-json bench.json                                keep the figures

On CUDA each test records the triton.testing.do_bench figures (CUDA events, L2 flushed; median, p20, p80) and the
traffic-model GB/s in ``benchmark.extra_info``, and pytest-benchmark's own timer runs a function that synchronises
the device after each call, so its numbers are wall time of complete calls too. ``patfast bench kernels`` (and
benchmarks/gpu_check.sh) is the one that writes results.json / results.md; this suite is for local comparisons.
"""

from __future__ import annotations

import pytest
import torch

from patfast.bench import bench_ms
from patfast.bench.kernels import (
    KD_CLASSES,
    LOGIT_OPS,
    MODES,
    PROVIDERS_OF,
    RAA_OPS,
    TEACHERS,
    Runner,
    hcl_case,
    kd_case,
    make_inputs,
    op_function,
    raa_case,
)

CUDA = torch.cuda.is_available()
GPU_CASES = [hcl_case(t, 128) for t in TEACHERS] + [kd_case(op, k, 256) for op in LOGIT_OPS for k in KD_CLASSES] + \
    [raa_case(op, 128) for op in RAA_OPS]
CPU_CASES = [hcl_case("swin_t", 1), kd_case("kd_loss_pair", 100, 8), kd_case("kd_loss", 100, 8),
             kd_case("dkd_loss", 100, 8), kd_case("dist_loss", 100, 8), kd_case("ofa_loss", 100, 8),
             raa_case("raa_block", 1), raa_case("raa_core", 1)]
GPU_PAIRS = [(case, provider) for case in GPU_CASES for provider in PROVIDERS_OF[case.op]]


def _id(case) -> str:
    return f"{case.op}-{case.name}-B{case.batch}"


def _runner(case, provider: str, mode: str, device: torch.device, dtype: torch.dtype) -> Runner:
    args, grad_inputs = make_inputs(case, mode, device, dtype)
    return Runner(op_function(case, provider, amp=device.type == "cuda"), args, grad_inputs, mode)


def _info(benchmark, case, mode: str, provider: str, dtype: torch.dtype) -> None:
    benchmark.extra_info.update(op=case.op, case=case.name, batch=case.batch, shape=case.shape, mode=mode,
                                provider=provider, dtype=str(dtype).removeprefix("torch."),
                                bytes=case.traffic_bytes(mode, torch.empty((), dtype=dtype).element_size()))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CPU_CASES, ids=_id)
def test_cpu_reference(benchmark, case, mode):
    """The eager reference at a tiny size on the CPU: checks the cases run; the figures mean little."""
    runner = _runner(case, "eager", mode, torch.device("cpu"), torch.float32)
    _info(benchmark, case, mode, "eager", torch.float32)
    benchmark.pedantic(runner.step, rounds=3, warmup_rounds=1)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case, provider", GPU_PAIRS, ids=[f"{_id(c)}-{p}" for c, p in GPU_PAIRS])
def test_gpu(benchmark, case, mode, provider):
    if provider == "compiled":
        torch._dynamo.reset()  # one shape per test: a fresh cache, no recompile limit reached
    runner = _runner(case, provider, mode, torch.device("cuda"), torch.bfloat16)
    for _ in range(3):  # compile / JIT / warm up
        runner.step()
    torch.cuda.synchronize()
    med, p20, p80, timer = bench_ms(runner.step, True)
    _info(benchmark, case, mode, provider, torch.bfloat16)
    benchmark.extra_info.update(do_bench_ms=med, do_bench_ms_p20=p20, do_bench_ms_p80=p80, timer=timer,
                                gbps=benchmark.extra_info["bytes"] / (med * 1e-3) / 1e9)

    def synchronised():
        runner.step()
        torch.cuda.synchronize()

    benchmark.pedantic(synchronised, rounds=20, warmup_rounds=2)
