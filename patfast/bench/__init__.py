"""Benchmarks: `patfast bench kernels`, `patfast bench data` and `patfast bench train`, each writing its rows (--json)
and its table (--md). benchmarks/ holds the developer side: gpu_check.sh (the one-shot GPU run) and its Python
(gpu_check.py, pytest_report.py), results.md's renderer (render_results.py) and the targets it judges against
(targets.json).

    kernels.py   the kernel benchmark cases (PAT shapes), providers (eager reference, torch.compile(reference),
                 Triton; for RAA also SDPA with the flash / cuDNN backend pinned), the timing loop and the traffic
                 model
    ceilings.py  the measured ceilings of the same run: device-to-device copy bandwidth, bf16 matmul rate
    tables.py    the kernel rows' ratios against their baselines (same run) and their markdown tables
    data.py      loader-only images/s of each data backend, beside the rate a PAT step consumes
    train.py     `patfast bench train`: fast path vs reference path vs floor, peak memory, the time split; the one
                 PAT-step builder of the benchmarks (also the step rate `bench data` sets loaders against)
    measure.py   the timing loop, quantiles, the number format, the environment record, the interpreter switch
    record.py    how rows are recorded as they are measured: measured / not measured (why) / FAILED (exception)

Timing: on CUDA ``triton.testing.do_bench`` (CUDA events around each call, L2 flushed before each, median with
p20/p80); on the CPU a host clock (the CPU is synchronous), which is only ever used for the tiny dry-run sizes.
Nothing that was not measured gets a number: it is written "not measured", with the reason; what raised is
"FAILED", with the exception (record.py).
"""

from __future__ import annotations

from patfast.bench.measure import QUANTILES, bench_ms, environment, num, quantiles, use_triton_interpreter

__all__ = ["add_options", "run", "bench_ms", "environment", "num", "quantiles", "use_triton_interpreter", "QUANTILES"]


def add_options(parser) -> None:
    """Sub-commands of `patfast bench` (cli.py builds the `bench` parser, this fills it)."""
    from patfast.bench import data, train

    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True, parser_class=type(parser))
    kernels = sub.add_parser("kernels", help="HCL, KD and RAA kernels against their references on PAT's shapes",
                             description="HCL, KD and RAA kernels against their references on PAT's shapes")
    add_kernel_options(kernels)
    p = sub.add_parser("data", help="loader-only images/s of the torch, dali and gpu data backends",
                       description=data.__doc__.split("\n\n")[0])
    data.add_options(p)
    p = sub.add_parser("train", help="images/s of a PAT step: fast path, reference path and floor, with the split",
                       description=train.__doc__.split("\n\n")[0])
    train.add_options(p)


def add_kernel_options(parser) -> None:
    """Options of `patfast bench kernels`."""
    parser.add_argument("--op", choices=["hcl", "kd", "raa", "all"], default="all",
                        help="hcl: HCL over 4 teacher stages; kd: kd_loss_pair and kd_loss; raa: region-aware "
                             "attention, whole block and core (N=64, D=512, 8 heads); all (default)")
    parser.add_argument("--batch", default=None, metavar="B[,B...]",
                        help="batch sizes (default 64,128,256 on CUDA, 128 with --quick; 1 on the CPU)")
    parser.add_argument("--teacher", default=None, metavar="NAME[,NAME...]",
                        help="HCL teachers: swin_t, convnext_t, resnet50, vit_s (default: all), each also as in its "
                             "recorded PAT step")
    parser.add_argument("--classes", default=None, metavar="K[,K...]", help="KD classes (default 100,1000)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: Swin-T stages only, one class count, one batch, fewer repeats")
    compiled = parser.add_mutually_exclusive_group()
    compiled.add_argument("--compiled", dest="compiled", action="store_true", default=None,
                          help="time torch.compile(reference) too (default on CUDA; slow to compile on the CPU)")
    compiled.add_argument("--no-compiled", dest="compiled", action="store_false",
                          help="skip torch.compile(reference)")
    parser.add_argument("--compiled-batch", default="128", metavar="B[,B...]|all",
                        help="batch sizes at which torch.compile(reference) is timed (default 128: each shape "
                             "compiles once, the expensive part of a GPU run); 'all' for every batch")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="seconds from the start of the benchmark after which compiled-reference shapes not "
                             "yet started are skipped (reported as not measured)")
    parser.add_argument("--ceilings", default=None, metavar="PATH",
                        help="read the ceilings from this JSON, a ceilings file or a results.json (benchmarks/"
                             "gpu_check.sh measures them in an earlier step of the same run) instead of measuring "
                             "them here; measured here after all if it holds none")
    parser.add_argument("--json", default=None, metavar="PATH", help="write results.json-style output here")
    parser.add_argument("--md", default=None, metavar="PATH", help="write the markdown tables here")
    parser.add_argument("--no-model-registers", dest="model_registers", action="store_false",
                        help="skip the compile-only builds that give the performance model its registers and "
                             "spills (a few seconds per kernel configuration); the model then counts threads only")
    parser.add_argument("--interpret-check", action="store_true",
                        help="no CUDA: also run each Triton case once through the Triton interpreter (untimed) "
                             "to check the harness; gpu_check.sh --dry-run uses it")


def run(args) -> int:
    """`patfast bench ...`"""
    if args.what == "kernels":
        if args.interpret_check:  # before kernels.py imports patfast.ops (and so triton); a no-op on CUDA
            use_triton_interpreter("bench kernels --interpret-check")
        from patfast.bench.kernels import main

        return main(args)
    if args.what == "data":
        from patfast.bench.data import main

        return main(args)
    if args.what == "train":
        from patfast.bench.train import main

        return main(args)
    raise AssertionError(args.what)  # argparse choices keep us from here
