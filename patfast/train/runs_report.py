"""`patfast report RUN_DIR... [--out DIR]`: the runs' results over seeds, as a markdown table, a CSV table, one PNG.

Each run directory is read from its args.yaml (the resolved config) and summary.csv (one row per epoch). Runs whose
configs are equal once the keys in IGNORED_KEYS are left out are one group: the same experiment, different seeds.
A group is named by the config keys whose values differ between the groups. Per group: n, the seeds, and mean ±
sample std (n - 1; "–" when n = 1) of

    final top-1        eval_top1 of the last epoch (the raw student)
    final EMA top-1    ema_top1 of the last epoch ("–" when a run has no EMA: model_ema off)
    best raw top-1     the best eval_top1 over the epochs
    best top-1         the paper's metric: the best over the epochs of max(eval_top1, ema_top1) (best raw top-1
                       for a run with model_ema off; "–" for one with EMA on but no ema_top1 figures), computed
                       from those two columns (a best_top1 column is not read)
    epochs             summary rows
    img/s              the median over the epochs of img_per_s (training images per second)
    total time         the sum of the epochs' epoch_s (training + evaluation; setup and teacher evaluation not in)

A figure a run does not have (an empty cell, a missing column) makes the group's cell "–": nothing is averaged over
a subset of the group or invented. Runs that did not finish (fewer summary rows than the config's epochs, or a
last.pth without the final student.safetensors / teacher.safetensors) are listed apart and never averaged in.
Accuracies are in %.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field

import yaml

from patfast.errors import UserError

# Keys that do not name the experiment: the seed (what a group varies over), where the run writes and how it was
# resumed, what it shows, and how it executes (device, data loader, op backend, compiler, memory format, determinism:
# the same computation, only the execution or the rounding differ; the loaders' augmentations do not depend on the
# number of workers). `config` is the file or recipe the values came from: the values themselves are in args.yaml.
IGNORED_KEYS = ("seed", "out", "resume", "allow_config_change", "checkpoint_every", "nonfinite_patience", "progress",
                "device", "workers", "data_backend", "backend", "compile", "compile_mode", "channels_last",
                "deterministic", "config")

# (name, heading): the per-run figures the table averages over seeds.
METRICS = (("final_top1", "final top-1"), ("final_ema_top1", "final EMA top-1"), ("best_raw_top1", "best raw top-1"),
           ("best_top1", "best top-1 (max raw/EMA)"), ("img_per_s", "img/s"), ("total_s", "total time"))
# config keys shown once above the table when every group shares them
HEADLINE_KEYS = ("command", "data", "student", "teacher", "distiller", "pat_variant", "epochs", "img_size",
                 "batch_size")
DASH = "–"


@dataclass
class Run:
    """One run directory: its config, its summary rows (numbers, None where a cell is empty) and its figures."""

    path: str
    config: dict
    rows: list[dict]
    finished: bool
    reason: str = ""  # why it is not finished
    metrics: dict = field(default_factory=dict)

    @property
    def seed(self):
        return self.config.get("seed")


@dataclass
class Group:
    """Finished runs with the same config but for IGNORED_KEYS; `config` is that shared config."""

    config: dict
    runs: list[Run]


@dataclass
class Report:
    groups: list[Group]
    unfinished: list[Run]
    keys: list[str]  # the config keys that name the groups
    ignored: tuple[str, ...] = IGNORED_KEYS


# ---------------------------------------------------------------------------------------------------- reading runs

def _is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "args.yaml")) or os.path.isfile(os.path.join(path, "summary.csv"))


def expand_paths(paths: list[str]) -> list[str]:
    """The run directories named by `paths`: a run directory stands for itself, a folder that is no run but holds
    runs one level down (e.g. benchmarks/results/demo_cpu) for those; duplicates dropped, order kept."""
    if not paths:
        raise UserError("report: give one or more run directories (each holding args.yaml and summary.csv)")
    found, seen = [], set()
    for p in paths:
        if not os.path.exists(p):
            raise UserError(f"report: {p}: no such directory")
        if not os.path.isdir(p):
            raise UserError(f"report: {p} is a file, not a run directory")
        if _is_run_dir(p):
            dirs = [p]
        else:
            dirs = sorted(os.path.join(p, d) for d in os.listdir(p) if _is_run_dir(os.path.join(p, d)))
            if not dirs:
                raise UserError(f"report: {p} is not a patfast run (no args.yaml or summary.csv), nor a folder of "
                                "runs")
        for d in dirs:
            key = os.path.realpath(d)
            if key not in seen:
                seen.add(key)
                found.append(d)
    return found


def _number(text: str, path: str, column: str, line: int):
    if text is None or text.strip() == "":
        return None
    try:
        v = float(text)
    except ValueError:
        raise UserError(f"report: {path} line {line}: {column} is {text!r}, not a number") from None
    return v


def read_summary(path: str) -> list[dict]:
    """summary.csv as a list of {column: float or None}, `epoch` an int."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"report: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not columns:
        return []
    if "epoch" not in columns or "eval_top1" not in columns:
        raise UserError(f"report: {path} is not a patfast summary.csv (no epoch / eval_top1 column)")
    out = []
    for i, row in enumerate(rows, start=2):
        values = {c: _number(v, path, c, i) for c, v in row.items() if c is not None}
        if values.get("epoch") is None or not math.isfinite(values["epoch"]):
            raise UserError(f"report: {path} line {i}: no epoch number")
        values["epoch"] = int(values["epoch"])
        out.append(values)
    return out


def read_config(path: str) -> dict:
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except OSError as e:
        raise UserError(f"report: cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"report: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict) or "epochs" not in cfg:
        raise UserError(f"report: {path} is not a patfast args.yaml (no epochs key)")
    return cfg


def _with_defaults(cfg: dict) -> dict:
    """Keys an older args.yaml lacks (options added since) take the option's built-in default, so that an older run
    and a newer one with that default still group together."""
    from patfast.train.config import OPTIONS

    command = cfg.get("command", "train")
    return {**{o.name: o.default for o in OPTIONS if command in o.commands and o.name not in cfg}, **cfg}


def run_metrics(rows: list[dict], model_ema: bool = True) -> dict:
    """The per-run figures of METRICS from the summary rows; None where the rows lack what one needs.
    model_ema: whether the run kept an EMA (without one, the best of max(raw, EMA) is the best raw)."""
    if not rows:
        return {name: None for name, _ in METRICS} | {"epochs": 0}

    def col(name):
        values = [r.get(name) for r in rows]
        return None if any(v is None for v in values) else values

    raw, ema, speed, secs = col("eval_top1"), col("ema_top1"), col("img_per_s"), col("epoch_s")
    best_any = None
    if raw is not None:
        if ema is not None:
            best_any = max(max(a, e) for a, e in zip(raw, ema))
        elif not model_ema:
            best_any = max(raw)
    return {"final_top1": rows[-1].get("eval_top1"), "final_ema_top1": rows[-1].get("ema_top1"),
            "best_raw_top1": max(raw) if raw is not None else None, "best_top1": best_any,
            "img_per_s": statistics.median(speed) if speed is not None else None,
            "total_s": math.fsum(secs) if secs is not None else None, "epochs": len(rows)}


def read_run(path: str) -> Run:
    """One run directory. Not finished: fewer summary rows than the config's epochs, or a last.pth without the
    final weights (a finished run leaves student.safetensors, or teacher.safetensors for `patfast teacher`)."""
    if not os.path.isdir(path):
        raise UserError(f"report: {path}: no such directory")
    if not os.path.isfile(os.path.join(path, "args.yaml")):
        raise UserError(f"report: {path} is not a patfast run (no args.yaml)")
    cfg = _with_defaults(read_config(os.path.join(path, "args.yaml")))
    summary = os.path.join(path, "summary.csv")
    rows = read_summary(summary) if os.path.isfile(summary) else []
    try:
        epochs = int(cfg["epochs"])
    except (TypeError, ValueError):
        raise UserError(f"report: {path}/args.yaml: epochs is {cfg['epochs']!r}, not a number") from None
    weights = "teacher.safetensors" if cfg.get("command") == "teacher" else "student.safetensors"
    reason = ""
    if len(rows) < epochs:
        reason = f"{len(rows)} of {epochs} epochs in summary.csv"
    elif os.path.isfile(os.path.join(path, "last.pth")) and not os.path.isfile(os.path.join(path, weights)):
        reason = f"last.pth but no {weights} (stopped before the end)"
    return Run(path, cfg, rows, not reason, reason, run_metrics(rows, bool(cfg.get("model_ema", True))))


# --------------------------------------------------------------------------------------------------------- groups

def _canon(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def group_runs(runs: list[Run], ignored=IGNORED_KEYS) -> tuple[list[Group], list[Run], list[str]]:
    """(groups of finished runs, in the order their first run came; unfinished runs; the keys naming the groups).

    Two runs are in one group when their configs are equal on every key but `ignored`. The naming keys are those
    whose values differ between groups, in args.yaml order."""
    groups: dict[str, Group] = {}
    unfinished = []
    for run in runs:
        if not run.finished:
            unfinished.append(run)
            continue
        shared = {k: v for k, v in run.config.items() if k not in ignored}
        key = _canon(shared)
        groups.setdefault(key, Group(shared, [])).runs.append(run)
    out = list(groups.values())
    for g in out:
        g.runs.sort(key=lambda r: (r.seed is None, r.seed if isinstance(r.seed, int) else 0, r.path))
    order = []
    for g in out:
        order += [k for k in g.config if k not in order]
    keys = [k for k in order if len({_canon(g.config.get(k)) for g in out}) > 1]
    return out, unfinished, keys


def build_report(paths: list[str], ignore=()) -> Report:
    runs = [read_run(p) for p in expand_paths(paths)]
    ignored = tuple(IGNORED_KEYS) + tuple(k for k in ignore if k not in IGNORED_KEYS)
    groups, unfinished, keys = group_runs(runs, ignored)
    return Report(groups, unfinished, keys, ignored)


def _value(v) -> str:
    if v is None:
        return DASH
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def label(group: Group, keys: list[str]) -> str:
    return ", ".join(f"{k}={_value(group.config.get(k))}" for k in keys) or "all runs"


def mean_std(values: list) -> tuple[float | None, float | None]:
    """(mean, sample std); (None, None) when a value is missing, std None when n = 1."""
    if not values or any(v is None for v in values):
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def table_rows(report: Report) -> list[dict]:
    """One dict per group: the naming keys' values, n, seeds, <metric>_mean / <metric>_std, epochs, runs."""
    rows = []
    for g in report.groups:
        row = {k: _value(g.config.get(k)) for k in report.keys}
        row["n"] = len(g.runs)
        row["seeds"] = " ".join(_value(r.seed) for r in g.runs)
        for name, _ in METRICS:
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std([r.metrics[name] for r in g.runs])
        epochs = sorted({r.metrics["epochs"] for r in g.runs})
        row["epochs"] = epochs[0] if len(epochs) == 1 else "/".join(map(str, epochs))
        row["runs"] = ";".join(r.path for r in g.runs)
        rows.append(row)
    return rows


def csv_columns(report: Report) -> list[str]:
    return [*report.keys, "n", "seeds", *(f"{n}_{s}" for n, _ in METRICS for s in ("mean", "std")), "epochs", "runs"]


# -------------------------------------------------------------------------------------------------------- writing

def _fmt_time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _cell(row: dict, name: str) -> str:
    mean, std = row[f"{name}_mean"], row[f"{name}_std"]
    if mean is None:
        return DASH
    if name == "total_s":  # std in the mean's unit
        text = _fmt_time(mean)
        unit = 1 if mean < 120 else 60 if mean < 7200 else 3600
        digits = 1 if unit < 3600 else 2
        return f"{text} ± {DASH}" if std is None else f"{text} ± {std / unit:.{digits}f}"
    digits = 0 if name == "img_per_s" else 2
    return f"{mean:.{digits}f} ± " + (DASH if std is None else f"{std:.{digits}f}")


def markdown(report: Report, title: str | None = None, note: str = "") -> str:
    """The report as markdown: what was compared, the table, the groups' runs, the unfinished runs; `note`: a
    paragraph put under the title."""
    rows = table_rows(report)
    n_runs = sum(len(g.runs) for g in report.groups) + len(report.unfinished)
    lines = [f"# {title or 'patfast report'}", "", *([note, ""] if note else []),
             f"{n_runs} run(s): {len(report.groups)} group(s) of finished runs, {len(report.unfinished)} not finished. "
             "Mean ± sample std over the seeds of a group (– : n = 1, or a figure the runs do not have); "
             "accuracies in % on the test split.", ""]
    if report.groups:
        shared = [f"{k}={_value(report.groups[0].config.get(k))}" for k in HEADLINE_KEYS
                  if k in report.groups[0].config and k not in report.keys]
        if shared:
            lines += [f"Shared: {', '.join(shared)}.", ""]
        lines += [f"Groups: runs whose args.yaml agree on every key except {', '.join(report.ignored)}"
                  + (f"; they differ in {', '.join(report.keys)}." if report.keys else "."), ""]
        keys = report.keys or ["group"]
        head = [*keys, "n", "seeds", *(h for _, h in METRICS[:4]), "epochs", *(h for _, h in METRICS[4:])]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in rows:
            names = [row[k] for k in report.keys] or ["all runs"]
            cells = [*names, str(row["n"]), row["seeds"].replace(" ", ", "),
                     *(_cell(row, n) for n, _ in METRICS[:4]), str(row["epochs"]),
                     *(_cell(row, n) for n, _ in METRICS[4:])]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines += ["", "best top-1: the best over the epochs of max(raw, EMA) top-1 (the paper's metric); img/s: "
                  "median over the epochs of a run; total time: sum of the epochs' epoch_s.", "", "Runs:"]
        for g in report.groups:
            lines.append(f"- {label(g, report.keys)}: {', '.join(r.path for r in g.runs)}")
        dup = [label(g, report.keys) for g in report.groups if len({_value(r.seed) for r in g.runs}) < len(g.runs)]
        if dup:
            lines += ["", f"Note: the same seed appears twice in {'; '.join(dup)}."]
    else:
        lines.append("No finished run: nothing to average.")
    if report.unfinished:
        lines += ["", "## Not finished (not averaged in)", "", "| run | seed | epochs done | why |",
                  "|---|---|---|---|"]
        for r in report.unfinished:
            lines.append(f"| {r.path} | {_value(r.seed)} | {r.metrics['epochs']} of {r.config.get('epochs')} | "
                         f"{r.reason} |")
    return "\n".join(lines) + "\n"


def write_markdown(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def write_csv(path: str, report: Report) -> None:
    """One row per group (columns: csv_columns); empty cells where the markdown shows –; times in seconds."""
    columns = csv_columns(report)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for row in table_rows(report):
            writer.writerow({c: "" if row[c] is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c])
                             for c in columns})


def curves(group: Group, column: str) -> tuple[list[int], list[float], list[float]] | None:
    """(epochs, mean, std) of `column` over the group's runs, per epoch (the epochs every run has); None when a run
    lacks a value."""
    n = min(len(r.rows) for r in group.runs)
    epochs, means, stds = [], [], []
    for i in range(n):
        values = [r.rows[i].get(column) for r in group.runs]
        if any(v is None for v in values):
            return None
        epochs.append(group.runs[0].rows[i]["epoch"])
        means.append(statistics.mean(values))
        stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
    return (epochs, means, stds) if epochs else None


def plot(report: Report, path: str, title: str = "patfast report") -> None:
    """One PNG: per group the mean test top-1 per epoch with a ± std band over its seeds; raw student on the left,
    EMA on the right (the right panel only when some group has EMA figures)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("eval_top1", "student top-1")]
    if any(curves(g, "ema_top1") for g in report.groups):
        panels.append(("ema_top1", "EMA student top-1"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (column, heading) in zip(axes[0], panels):
        for i, g in enumerate(report.groups):
            c = curves(g, column)
            if c is None:
                continue
            epochs, mean, std = c
            color = colors[i % len(colors)]
            ax.plot(epochs, mean, color=color, label=f"{label(g, report.keys)} (n={len(g.runs)})")
            ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=color, alpha=0.2, linewidth=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{heading} (mean ± std over seeds)", fontsize=10)
        ax.grid(alpha=0.3)
        if report.groups:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no finished run", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_all(report: Report, out: str, stem: str = "report", title: str | None = None) -> dict:
    """<out>/<stem>.md, <stem>.csv, <stem>.png; returns {"md", "csv", "png": path, "text": the markdown}."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"report: cannot create --out {out}: {e.strerror or e}") from None
    if not os.path.isdir(out):
        raise UserError(f"report: --out {out} is not a directory")
    paths = {ext: os.path.join(out, f"{stem}.{ext}") for ext in ("md", "csv", "png")}
    text = markdown(report, title)
    try:
        write_markdown(paths["md"], text)
        write_csv(paths["csv"], report)
        plot(report, paths["png"], title or "patfast report")
    except OSError as e:
        raise UserError(f"report: cannot write to --out {out}: {e.strerror or e}") from None
    return {**paths, "text": text}


# ------------------------------------------------------------------------------------------------------------ CLI

def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR",
                        help="run directories (args.yaml + summary.csv), or folders whose subfolders are runs")
    parser.add_argument("--out", default="report", metavar="DIR",
                        help="where report.md, report.csv and report.png go (default: ./report)")
    parser.add_argument("--ignore", action="append", default=[], metavar="KEY",
                        help="also ignore this config key when grouping (repeatable; always ignored: "
                        + ", ".join(IGNORED_KEYS) + ")")


def run(args: argparse.Namespace) -> int:
    ignore = [k.strip() for item in args.ignore for k in item.split(",") if k.strip()]
    report = build_report(args.runs, ignore)
    written = write_all(report, args.out)
    print(written["text"], end="")
    print(f"wrote {written['md']}, {written['csv']}, {written['png']}", file=sys.stderr)
    return 0
