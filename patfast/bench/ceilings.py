"""The ceilings of this run, measured: device-to-device copy bandwidth and the bf16 matmul rate.

Kernel bandwidth is reported as a fraction of the copy measured here, in the same run, not of a datasheet.
    copy_gbps    (bytes read + bytes written) / time of ``dst.copy_(src)``, src 1 GiB of bf16 on CUDA, 1e9 B/s
    bf16_tflops  2 n^3 / time of an n x n x n bf16 matmul on random data (n = 8192 on CUDA), 1e12 FLOP/s
On the CPU (the dry run) the sizes are tiny (8 MiB, n = 256): that exercises the code path and is labelled CPU;
it is not a ceiling of anything. `--json` is rewritten after each of the two; one that raises is FAILED
("copy_error" / "matmul_error": the exception), the other is still measured, and the exit status is 1.

    python -m patfast.bench.ceilings [--json PATH] [--dry-run]
"""

from __future__ import annotations

import argparse
import sys

import torch

from patfast.bench.measure import bench_ms, num
from patfast.bench.record import FAILED, error_text, write_json

CUDA_COPY_BYTES = 1 << 30
CUDA_MATMUL_N = 8192
CPU_COPY_BYTES = 8 << 20
CPU_MATMUL_N = 256


def measure(dry_run: bool = False, save=lambda ceilings: None) -> dict:
    """Measure both ceilings on the current CUDA device, or (no CUDA, or ``dry_run``) tiny ones on the CPU; calls
    ``save(ceilings)`` after each. A ceiling that raises gets "<copy|matmul>_error" and stays None."""
    cuda = torch.cuda.is_available() and not dry_run
    device = torch.device("cuda" if cuda else "cpu")
    copy_bytes, n = (CUDA_COPY_BYTES, CUDA_MATMUL_N) if cuda else (CPU_COPY_BYTES, CPU_MATMUL_N)
    gen = torch.Generator(device=device).manual_seed(0)
    out: dict = {
        "device": torch.cuda.get_device_name() if cuda else "CPU (tiny sizes: exercises the code, not a ceiling)",
        "copy_gbps": None,
        "bf16_tflops": None,
    }

    save(out)
    try:
        med, p20, p80, timer = _time_copy(copy_bytes, device, gen, cuda)
        moved = 2 * copy_bytes  # read + written
        out.update(copy_gbps=moved / (med * 1e-3) / 1e9, copy_bytes_moved=moved, copy_ms=med, copy_ms_p20=p20,
                   copy_ms_p80=p80, timer=timer)
    except Exception as e:  # noqa: BLE001 (recorded as FAILED; the matmul is still measured)
        out["copy_error"] = error_text(e)
    save(out)
    try:
        med, p20, p80, timer = _time_matmul(n, device, gen, cuda)
        out.update(bf16_tflops=2 * n**3 / (med * 1e-3) / 1e12, matmul_n=n, matmul_ms=med, matmul_ms_p20=p20,
                   matmul_ms_p80=p80, timer=timer)
    except Exception as e:  # noqa: BLE001
        out["matmul_error"] = error_text(e)
    if cuda:
        torch.cuda.empty_cache()
    save(out)
    return out


def _time_copy(nbytes: int, device: torch.device, gen: torch.Generator, cuda: bool):
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device, generator=gen)
    dst = torch.empty_like(src)
    return bench_ms(lambda: dst.copy_(src), cuda)


def _time_matmul(n: int, device: torch.device, gen: torch.Generator, cuda: bool):
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device, generator=gen)  # random data: zeros run faster
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device, generator=gen)
    c = torch.empty(n, n, dtype=torch.bfloat16, device=device)
    return bench_ms(lambda: torch.mm(a, b, out=c), cuda)


def describe(ceilings: dict) -> str:
    errors = [f"{what} {FAILED}: {ceilings[key]}" for what, key in (("copy", "copy_error"),
                                                                      ("matmul", "matmul_error"))
              if ceilings.get(key)]
    if errors:
        return "ceilings: " + "; ".join(errors)
    if ceilings.get("copy_gbps") is None or ceilings.get("bf16_tflops") is None:
        return f"ceilings: {ceilings.get('note') or 'not measured'}"
    return (f"ceilings ({ceilings['device']}): copy {num(ceilings['copy_gbps'])} GB/s (read + write, "
            f"{ceilings['copy_bytes_moved'] / 2**30:.3f} GiB moved in {ceilings['copy_ms']:.3f} ms); "
            f"bf16 matmul {num(ceilings['bf16_tflops'])} TFLOP/s (n = {ceilings['matmul_n']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m patfast.bench.ceilings", description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None, help="write the ceilings here")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, whatever the machine has")
    args = parser.parse_args(argv)
    ceilings = measure(dry_run=args.dry_run, save=lambda c: args.json and write_json(c, args.json))
    print(describe(ceilings), flush=True)
    return 1 if ceilings.get("copy_error") or ceilings.get("matmul_error") else 0


if __name__ == "__main__":
    sys.exit(main())
