"""Step time of every distiller against kd's, in one run on this machine: the training step the bundled demo runs.

Usage: python benchmarks/distiller_step_times.py OUT_DIR [--teacher resnet10t] [--student deit_tiny_patch16_224]
           [--img-size 32] [--batch-size 64] [--steps 10] [--rounds 3] [--distillers none kd dkd dist fitnet ofa pat]
Each distiller is built as `patfast train` builds it (random-initialised timm models, default settings), with the
demo's optimiser (AdamW for token students, SGD for CNNs) and its step (eager fp32 on a CPU: TrainStep), on one
synthetic batch. Rounds interleave the distillers (round r times every distiller once, `--steps` steps after 2
untimed ones) so that a change in the machine's speed lands on all of them; the figure is the median over rounds of
ms per step, and its ratio to kd's. Writes OUT_DIR/step_times.json and step_times.md with the commit that made them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import made_by  # noqa: E402


def build(name: str, teacher: str, student: str, img: int, classes: int):
    import torch

    from patfast.distill.build import DistillSettings, build_distiller
    from patfast.models.create import create_model
    from patfast.models.stages import works_on_tokens
    from patfast.train.optim import make_optimizer
    from patfast.train.step import Speed, TrainStep

    torch.manual_seed(0)
    s_model = create_model(student, classes, img)
    t_model = create_model(teacher, classes, img) if name != "none" else None
    d = build_distiller(name, s_model, t_model, DistillSettings(), img_size=img, data_mean=(0.5,) * 3,
                        data_std=(0.25,) * 3).train()
    tokens = works_on_tokens(s_model)
    params = d.trainable_parameters()
    opt = make_optimizer(params, "adamw", 5e-4, 0.05) if tokens else make_optimizer(params, "sgd", 0.05, 2e-3)
    d.start_epoch(1)
    return TrainStep(d, opt, params, Speed(compile=False, compile_mode="default", amp=None, channels_last=False),
                     torch.device("cpu"))


def main(argv: list[str] | None = None) -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--teacher", default="resnet10t")
    ap.add_argument("--student", default="deit_tiny_patch16_224")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--distillers", nargs="+", default=["none", "kd", "dkd", "dist", "fitnet", "ofa", "pat"])
    args = ap.parse_args(argv)
    if "kd" not in args.distillers:
        sys.exit("distiller_step_times: error: --distillers must include kd (the figures are relative to it)")
    os.makedirs(args.out, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g)
    y = torch.randint(0, args.classes, (args.batch_size,), generator=g)
    steps = {n: build(n, args.teacher, args.student, args.img_size, args.classes) for n in args.distillers}
    times = {n: [] for n in args.distillers}
    for r in range(args.rounds):
        for n, step in steps.items():
            for i in range(2):
                step(x, y, step=i)
            t0 = time.perf_counter()
            for i in range(args.steps):
                step(x, y, step=2 + i)
            times[n].append((time.perf_counter() - t0) * 1e3 / args.steps)
            print(f"round {r + 1}/{args.rounds} {n:<7} {times[n][-1]:8.1f} ms/step", flush=True)
    median = {n: statistics.median(v) for n, v in times.items()}
    rows = [{"distiller": n, "ms_per_step": round(median[n], 2), "relative_to_kd": round(median[n] / median["kd"], 3),
             "img_per_s": round(args.batch_size * 1e3 / median[n], 1), "rounds_ms": [round(t, 2) for t in times[n]]}
            for n in args.distillers]
    setting = (f"{args.teacher} -> {args.student}, {args.img_size} px, batch {args.batch_size}, {args.classes} "
               f"classes, eager fp32 on the CPU ({torch.get_num_threads()} threads), median of {args.rounds} "
               f"interleaved rounds of {args.steps} steps")
    with open(os.path.join(args.out, "step_times.json"), "w") as f:
        json.dump({"made_by": made_by(), "setting": setting, "rows": rows}, f, indent=1)
    lines = [f"Step time per distiller: {setting}. {made_by()[0].upper()}{made_by()[1:]}.", "",
             "| distiller | ms / step | relative to kd | img/s |", "|---|---|---|---|"]
    lines += [f"| {r['distiller']} | {r['ms_per_step']:.1f} | {r['relative_to_kd']:.2f}x | {r['img_per_s']:.0f} |"
              for r in rows]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "step_times.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
