"""What a run shows and writes: the header (versions, device), the per-epoch table, summary.csv, the curves PNG."""

from __future__ import annotations

import csv
import os
import platform
import sys

import torch


class Log:
    """Print to stdout and append to <out>/log.txt, flushed line by line (nothing lost on a crash)."""

    def __init__(self, path: str | None, quiet: bool = False):
        """quiet: print nothing (the other processes of a torchrun run; rank 0 speaks)."""
        self.file = open(path, "a", buffering=1) if path else None  # noqa: SIM115 (kept open for the run)
        self.quiet = quiet

    def __call__(self, line: str = "") -> None:
        if not self.quiet:
            print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")

    def record(self, line: str) -> None:
        """Into log.txt alone (a line the CLI prints itself: a run's error or stop)."""
        if self.file:
            self.file.write(line + "\n")

    def close(self) -> None:
        if self.file:
            self.file.close()


def environment() -> dict:
    """Versions and hardware, for the log header and results."""
    import timm

    env = {"patfast": _version(), "python": platform.python_version(), "torch": torch.__version__,
           "timm": timm.__version__, "cuda": torch.version.cuda or "none", "cpu_threads": torch.get_num_threads()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _version() -> str:
    from patfast import __version__

    return __version__


def header(log: Log, device: torch.device, cfg: dict) -> None:
    env = environment()
    log(f"patfast {env['patfast']} | python {env['python']} | torch {env['torch']} | timm {env['timm']} | "
        f"triton {env['triton']} | cuda {env['cuda']}")
    where = env.get("gpu", f"CPU, {env['cpu_threads']} threads") if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}), {env['cpu_threads']} threads"
    log(f"device: {device} ({where}) | command: {' '.join(sys.argv[1:]) or '(defaults)'}")


class EpochTable:
    """A fixed-width table, one row per epoch."""

    def __init__(self, log: Log, terms: list[str]):
        self.log, self.terms = log, terms
        cols = ["epoch", "lr", "loss"] + [t.removeprefix("loss_") for t in terms] + \
            ["top1", "top5", "ema_top1", "img/s", "time"]
        self.widths = [5, 9, 8] + [8] * len(terms) + [6, 6, 8, 7, 6]
        self.log(" ".join(c.rjust(w) for c, w in zip(cols, self.widths)))

    def row(self, r: dict) -> None:
        vals = [str(r["epoch"]), f"{r['lr']:.2e}", f"{r['train_loss']:.4f}"] + \
            [_loss(r[t]) for t in self.terms] + \
            [f"{r['eval_top1']:.2f}", f"{r['eval_top5']:.2f}", _pct(r.get("ema_top1")), f"{r['img_per_s']:.0f}",
             f"{r['epoch_s']:.1f}s"]
        self.log(" ".join(v.rjust(w) for v, w in zip(vals, self.widths)))


def _loss(v: float) -> str:
    """Four decimals, or three significant digits for a small term (1e-5 is not 0.0000)."""
    return f"{v:.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.2e}"


def _pct(v) -> str:
    return "-" if v is None or v == "" else f"{v:.2f}"


class SummaryCsv:
    """summary.csv: one row per epoch, written and flushed as each epoch ends."""

    def __init__(self, path: str, columns: list[str], rows: list[dict] = ()):
        """Start the file with its header and `rows` (a resumed run's finished epochs), written atomically."""
        self.path, self.columns = path, columns
        tmp = f"{path}.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for row in rows:
                writer.writerow(self._cells(row))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _cells(self, row: dict) -> list[str]:
        return ["" if row.get(c) is None else _fmt(row[c]) for c in self.columns]

    def append(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(self._cells(row))
            f.flush()
            os.fsync(f.fileno())


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def plot_curves(rows: list[dict], terms: list[str], path: str, title: str, role: str = "student",
                teacher_top1: float | None = None) -> None:
    """Loss terms (log scale) and accuracies against epochs, one PNG; the teacher's accuracy as a line when the
    model trained is a student of one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for t in ["train_loss"] + terms:
        ys = [r[t] for r in rows]
        if all(y > 0 for y in ys):
            ax1.plot(epochs, ys, marker=".", label=t)
    ax1.set_yscale("log")
    ax1.set_xlabel("epoch")
    ax1.set_title("training loss (per term)")
    ax1.legend(fontsize=8)
    for key, label in (("eval_top1", f"{role} top-1"), ("ema_top1", f"EMA {role} top-1"), ("eval_top5",
                                                                                         f"{role} top-5")):
        ys = [r.get(key) for r in rows]
        if all(y is not None for y in ys):
            ax2.plot(epochs, ys, marker=".", label=label)
    if teacher_top1 is not None:
        ax2.axhline(teacher_top1, color="black", linestyle="--", linewidth=1,
                    label=f"teacher top-1 ({teacher_top1:.2f})")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy (%)")
    ax2.set_title("test accuracy")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
