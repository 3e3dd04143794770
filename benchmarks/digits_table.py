"""The bundled-digits comparison: teacher, student alone (none), KD, the baselines (DKD, DIST, FitNet, OFA) and PAT,
over several seeds.

Usage: python benchmarks/digits_table.py OUT_DIR [--seeds 0 1 2] [--distillers none kd dkd dist fitnet ofa pat]
                                         [--teacher-checkpoint PATH] [other `patfast train` options]
Runs `patfast train` for each (distiller, seed) into OUT_DIR/<distiller>-seed<seed> with one shared teacher (a run
whose student.safetensors exists is not run again), then writes the table of `patfast report` over those runs:
OUT_DIR/table.md (also printed), table.csv and table.png (final raw and EMA top-1, best over epochs, mean ± sample
std over seeds, img/s, time; see patfast/train/runs_report.py), with the seeds and the teacher's test top-1 on top.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from patfast.errors import UserError
from patfast.train import runs_report

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import made_by  # noqa: E402


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


def teacher_top1(folder: str) -> float | None:
    """The teacher's test top-1 that a distilling run logs (None without a log.txt or that line)."""
    try:
        with open(os.path.join(folder, "log.txt")) as f:
            for line in f:
                if line.startswith("teacher test accuracy: top-1 "):
                    return float(line.split("top-1 ")[1].split("%")[0])
    except OSError:
        pass
    return None


def table(out: str, folders: list[str], seeds: list[int]) -> str:
    """Write OUT/table.md, table.csv, table.png over the run folders; returns the markdown."""
    report = runs_report.build_report(folders)
    by_seed = {}  # each seed's teacher (the cache trains one per seed), as the distilling runs logged it
    for folder in folders:
        t1 = teacher_top1(folder)
        if t1 is not None:
            by_seed.setdefault(folder.rstrip("/").rsplit("-seed", 1)[-1], t1)
    tops = [by_seed[k] for k in sorted(by_seed)]
    if len(tops) > 1:
        mean = sum(tops) / len(tops)
        std = (sum((t - mean) ** 2 for t in tops) / (len(tops) - 1)) ** 0.5
        each = " / ".join(f"{t:.2f}" for t in tops)
        teacher = f"{mean:.2f} ± {std:.2f} % (seeds {', '.join(sorted(by_seed))}: {each})"
    else:
        teacher = f"{tops[0]:.2f} %" if tops else "n/a"
    note = (f"Seeds: {', '.join(map(str, seeds))} (mean ± sample std over seeds). Teacher test top-1: {teacher}. "
            f"{made_by()[0].upper()}{made_by()[1:]}.")
    title = "Bundled digits: student alone, KD, the baselines, PAT"
    text = runs_report.markdown(report, title, note)
    runs_report.write_markdown(os.path.join(out, "table.md"), text)
    runs_report.write_csv(os.path.join(out, "table.csv"), report)
    runs_report.plot(report, os.path.join(out, "table.png"), title)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--distillers", nargs="+", default=["none", "kd", "dkd", "dist", "fitnet", "ofa", "pat"])
    ap.add_argument("--teacher-checkpoint", default=None)
    args, extra = ap.parse_known_args(argv)
    folders = [run(args.out, d, s, args.teacher_checkpoint, extra) for d in args.distillers for s in args.seeds]
    try:
        print(table(args.out, folders, args.seeds))
    except UserError as e:
        sys.exit(f"digits_table: error: {e}")


if __name__ == "__main__":
    main()
