"""The bundled-digits comparison: teacher, student alone (none), logit KD and PAT, over several seeds.

Usage: python benchmarks/digits_table.py OUT_DIR [--seeds 0 1 2] [--teacher-checkpoint PATH]
Runs `patfast train` for each (distiller, seed) with one shared teacher and writes OUT_DIR/table.md from the
summary.csv files (final-epoch raw and EMA top-1, best over epochs, mean and spread over seeds, img/s).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys


def run(out: str, distiller: str, seed: int, teacher_ckpt: str | None, extra: list[str]) -> str:
    folder = os.path.join(out, f"{distiller}-seed{seed}")
    if not os.path.isfile(os.path.join(folder, "student.safetensors")):
        cmd = [sys.executable, "-m", "patfast", "train", "--distiller", distiller, "--seed", str(seed),
               "--out", folder, "--no-progress", *extra]
        if teacher_ckpt:
            cmd += ["--teacher-checkpoint", teacher_ckpt]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return folder


def rows(folder: str) -> list[dict]:
    with open(os.path.join(folder, "summary.csv")) as f:
        return list(csv.DictReader(f))


def teacher_top1(folder: str) -> float | None:
    with open(os.path.join(folder, "log.txt")) as f:
        for line in f:
            if line.startswith("teacher test accuracy: top-1 "):
                return float(line.split("top-1 ")[1].split("%")[0])
    return None


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--distillers", nargs="+", default=["none", "kd", "pat"])
    ap.add_argument("--teacher-checkpoint", default=None)
    args, extra = ap.parse_known_args()
    results = {}
    for d in args.distillers:
        for s in args.seeds:
            results[d, s] = run(args.out, d, s, args.teacher_checkpoint, extra)
    lines = ["| distiller | final top-1 (raw) | final top-1 (EMA) | best over epochs (max raw/EMA) | img/s (train) |"
             " epoch s |", "|---|---|---|---|---|---|"]
    t1 = None
    for d in args.distillers:
        finals, emas, bests, speed, secs = [], [], [], [], []
        for s in args.seeds:
            r = rows(results[d, s])
            finals.append(float(r[-1]["eval_top1"]))
            emas.append(float(r[-1]["ema_top1"]))
            bests.append(max(max(float(x["eval_top1"]), float(x["ema_top1"])) for x in r))
            speed.append(statistics.median(float(x["img_per_s"]) for x in r))
            secs.append(statistics.median(float(x["epoch_s"]) for x in r))
            t1 = t1 if t1 is not None else (teacher_top1(results[d, s]) if d != "none" else None)
        lines.append(f"| {d} | {fmt(finals)} | {fmt(emas)} | {fmt(bests)} | {statistics.median(speed):.0f} |"
                     f" {statistics.median(secs):.1f} |")
    seeds = ", ".join(map(str, args.seeds))
    text = "\n".join([f"Seeds: {seeds} (mean ± sample std over seeds). Teacher test top-1: "
                      f"{t1 if t1 is not None else 'n/a'} %.", "", *lines, ""])
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
