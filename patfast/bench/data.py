"""`patfast bench data`: loader-only images/s of each data backend, beside the rate a PAT step consumes.

For every backend asked for, the loader is built (timed as setup: the gpu backend copies or decodes the split
there), `warmup` batches are drawn untimed (pipeline builds, worker start-up), then `batches` batches are timed
(CUDA: events around the loop, the device synchronised at both ends; CPU: host clock). A backend that cannot run
here (DALI not installed) gets a row saying so, with no figure. On CUDA, the PAT step rate of --pair at the same
batch and size is measured too (bench/train.py's step builder: the fast path's settings,
uncompiled), and each loader is reported as a multiple of it.

`--json` is written before the first backend (every row "not measured: not reached") and rewritten after each
backend and after the step rate: a run killed midway keeps what it measured. A backend (or the step rate) that
raises is FAILED in its row, with the exception; the rest still runs, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from patfast.bench.measure import num
from patfast.bench.record import FAILED, NOT_REACHED, mark_failed, write_json
from patfast.errors import UserError

BACKENDS = ("torch", "dali", "gpu")


def add_options(parser) -> None:
    parser.add_argument("--data", default="digits", help="digits (default) | cifar10:DIR | cifar100:DIR | "
                        "imagefolder:DIR")
    parser.add_argument("--data-backend", default="all", choices=("all", "auto", *BACKENDS),
                        help="loader backend(s) to time (default: all)")
    parser.add_argument("--split", default="train", choices=("train", "test"),
                        help="train: training augmentation, shuffled (default); test: eval transform, in order")
    parser.add_argument("--img-size", type=int, default=224, help="output size (default 224)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per backend (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (default 3)")
    parser.add_argument("--workers", type=int, default=None,
                        help="torch: DataLoader processes, dali: threads (default: the CPU count)")
    parser.add_argument("--auto-augment", default="", help="RandAugment policy, e.g. rand-m9-mstd0.5-inc1")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--pair", default="swin_tiny_patch4_window7_224,resnet18", metavar="TEACHER,STUDENT",
                        help="on CUDA, also time a PAT step of this pair at the same batch and size")
    parser.add_argument("--step-steps", type=int, default=10, help="timed PAT steps (default 10)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on the CPU, to check the code paths (gpu_check.sh --dry-run)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON here")
    parser.add_argument("--md", default=None, metavar="PATH", help="write the markdown table here")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bars (on a TTY)")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loader(loader, batches: int, warmup: int, device, progress: bool) -> tuple[float, str]:
    """Images/s over `batches` batches after `warmup` untimed ones (cycling epochs when needed) -> (img/s, timer)."""
    import torch
    from tqdm import tqdm

    def forever():
        while True:
            yield from loader

    it = forever()
    for _ in range(warmup):
        next(it)
    _sync(device)
    seen = 0
    bar = tqdm(range(batches), desc=f"{loader.backend} loader", leave=False, dynamic_ncols=True,
               disable=not (progress and sys.stderr.isatty()))
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in bar:
            seen += len(next(it)[1])
        end.record()
        end.synchronize()
        return seen * 1e3 / start.elapsed_time(end), "CUDA events around the loop (device synchronised)"
    t0 = time.perf_counter()
    for _ in bar:
        seen += len(next(it)[1])
    return seen / (time.perf_counter() - t0), "host clock (CPU)"


def new_row(args, backend: str, device) -> dict:
    """A backend's row before it ran: no figures, "not measured: not reached"."""
    return {"data": args.data, "backend": backend, "device": str(device), "split": args.split,
            "img_size": args.img_size, "batch": args.batch_size, "workers": args.workers,
            "auto_augment": args.auto_augment or None, "batches": args.batches, "setup_s": None, "img_s": None,
            "timer": None, "note": NOT_REACHED}


def bench_backend(args, backend: str, device, dataset) -> dict:
    from patfast.data import make_loader
    from patfast.data.dali import dali_available

    row = new_row(args, backend, device)
    if backend == "dali" and not dali_available():
        row["note"] = "not measured: NVIDIA DALI is not installed here (pip install 'patfast[dali]')"
        return row
    row["note"] = {"torch": f"{args.workers} DataLoader worker processes, PIL + timm transforms",
                   "dali": f"{args.workers} DALI threads" + (", GPU pipeline" if device.type == "cuda"
                                                             else ", CPU-only pipeline"),
                   "gpu": "resident uint8 split, batched ops" + ("" if device.type == "cuda" else " on CPU tensors"),
                   "auto": None}[backend]
    t0 = time.perf_counter()
    loader = make_loader(dataset, args.split, backend=backend, batch_size=args.batch_size, img_size=args.img_size,
                         train=args.split == "train", device=device, workers=args.workers,
                         auto_augment=args.auto_augment or None, progress=args.progress)
    _sync(device)
    row["setup_s"] = time.perf_counter() - t0
    row["img_s"], row["timer"] = time_loader(loader, args.batches, args.warmup, device, args.progress)
    row["backend"] = loader.backend
    return row


def render(rows: list[dict], step: dict | None) -> str:
    step_rate = step.get("img_s") if step else None
    lines = ["| backend | data | split | size | batch | workers | setup s | loader img/s | vs PAT step | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['img_s'] / step_rate:.2f}x" if r["img_s"] and step_rate else "not measured"
        rate = FAILED if r.get("error") else num(r["img_s"])
        setup = f"{r['setup_s']:.1f}" if r["setup_s"] is not None else "-"
        lines.append(f"| {r['backend']} | {r['data']} | {r['split']} | {r['img_size']} | {r['batch']} | "
                     f"{r['workers']} | {setup} | {rate} | {ratio} | {r['note'] or ''} |")
    if step:
        what = f"PAT step {step['pair']} at batch {step['batch']}, {step['img_size']} px"
        if step.get("img_s") is not None:
            what += (f", {step.get('amp') or 'fp32'}: {num(step['img_s'])} img/s"
                     + (f" ({step['step_ms']:.1f} ms/step, {step['timer']})" if step.get("step_ms") else "")
                     + (f" — {step['note']}" if step.get("note") else ""))
        else:
            what += f": {figure(step, None, 'img/s')}"
        lines += ["", what]
    return "\n".join(lines)


def figure(row: dict, value: float | None, unit: str) -> str:
    """"<value> <unit>" when measured; else "FAILED (<exception>)" or "not measured (<why>)", without the unit
    (the row's note holds the why: "not measured: <why>" / "FAILED: <exception>")."""
    if value is not None:
        return f"{num(value)} {unit}"
    if row.get("error"):
        return f"{FAILED} ({row['error']})"
    why = (row.get("note") or "").removeprefix("not measured").lstrip(": ")
    return "not measured" + (f" ({why})" if why else "")


def main(args) -> int:
    from patfast.data import load_data
    from patfast.train.loop import resolve_device
    from patfast.train.report import environment

    if args.dry_run:
        args.img_size, args.batch_size, args.batches, args.warmup, args.step_steps = 32, 8, 2, 1, 1
        args.device, args.pair = "cpu", "convnext_atto,resnet18"
    for name in ("img_size", "batch_size", "batches", "step_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    args.workers = (os.cpu_count() or 1) if args.workers is None else args.workers
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    pair = [p.strip() for p in args.pair.split(",")]
    if len(pair) != 2 or not all(pair):
        raise UserError(f"--pair takes TEACHER,STUDENT, got '{args.pair}'")
    device = resolve_device(args.device)
    dataset = load_data(args.data)
    backends = BACKENDS if args.data_backend == "all" else (args.data_backend,)
    rows = [new_row(args, backend, device) for backend in backends]
    step = {"pair": " -> ".join(pair), "batch": args.batch_size, "img_size": args.img_size, "device": str(device),
            "img_s": None, "amp": None, "note": NOT_REACHED}
    doc = {"env": environment(), "data": rows, "step": step}

    def save() -> None:
        if args.json:
            write_json(doc, args.json)

    save()
    for i, backend in enumerate(backends):
        try:
            rows[i] = row = bench_backend(args, backend, device, dataset)
        except Exception as e:  # noqa: BLE001 (recorded as FAILED; the other backends still run)
            row = rows[i]
            mark_failed(row, e)
        save()
        measured = row["img_s"] is not None
        print(f"{row['backend']:>6}: {figure(row, row['img_s'], 'img/s')}"
              + (f"  ({row['note']})" if measured and row["note"] else ""), flush=True)
    if device.type == "cuda" or args.dry_run:
        from patfast.bench import train as bench_train

        try:
            step.update(bench_train.pat_step_rate(pair[0], pair[1], args.batch_size, args.img_size, device,
                                                  steps=args.step_steps, warmup=1 if args.dry_run else 3))
            step["note"] = (f"the fast path's settings uncompiled ({step.pop('how', None) or 'eager'}); "
                            "`patfast bench train` times the compiled step")
        except Exception as e:  # noqa: BLE001
            mark_failed(step, e)
            print(f"PAT step rate: {step['note']}", flush=True)
    else:
        step.update(img_s=None, amp=None, note="not measured: no CUDA GPU here")
    save()
    text = render(rows, step)
    print()
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    failed = [r for r in [*rows, step] if r.get("error")]
    for r in failed:
        print(f"bench data: {r['note']}", flush=True)
    return 1 if failed else 0
