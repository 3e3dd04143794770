"""Record the HCL and KD inputs of a real PAT step per benchmark pair into patfast/bench/step_layouts.json.

    python benchmarks/record_step_layouts.py                 # every pair of patfast.bench.step_layouts.PAIRS
    python benchmarks/record_step_layouts.py --check         # record afresh, compare with the file, write nothing

One PAT training forward per pair as the CUDA fast path runs it, on an emulated GPU (no GPU needed: fake CUDA
tensors, CUDA autocast; see patfast/bench/step_layouts.py), with patfast.ops.hcl_loss_stages and kd_loss_pair
wrapped to record the shape, dtype, strides and storage offset of every input. About 20 s on 2 CPU cores. The file
records the command, commit, date and versions; `patfast bench kernels` builds its cases "as in the step" from it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# this checkout's patfast, wherever the script is started from
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from patfast.bench import step_layouts  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default=None,
                        help=f"comma-separated names (default all: {', '.join(step_layouts.PAIRS)})")
    parser.add_argument("--out", default=step_layouts.DATA_FILE, help="where to write (default %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare a fresh recording with --out; write nothing")
    args = parser.parse_args(argv)
    names = args.pairs.split(",") if args.pairs else list(step_layouts.PAIRS)
    unknown = [n for n in names if n not in step_layouts.PAIRS]
    if unknown:
        parser.error(f"unknown pair {', '.join(unknown)}; choose from {', '.join(step_layouts.PAIRS)}")
    t0 = time.monotonic()
    command = "python benchmarks/record_step_layouts.py" + (f" --pairs {args.pairs}" if args.pairs else "")
    doc = step_layouts.record(names, command=command)
    if args.check:
        old = step_layouts.load(args.out)
        fresh = {n: step_layouts.StepLayouts.from_json(n, d) for n, d in doc["pairs"].items()}
        stale = [n for n in names if old.get(n) != fresh[n]]
        print(f"{len(names) - len(stale)} of {len(names)} pairs as recorded in {args.out}"
              + (f"; differ: {', '.join(stale)}" if stale else ""))
        return 1 if stale else 0
    step_layouts.write(doc, args.out)
    print(f"wrote {args.out} ({len(names)} pairs, {time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
