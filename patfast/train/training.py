"""The training of a built run (patfast/train/loop.py builds it): optimiser, schedule, step and EMA; then epoch by
epoch the batches (the skipped-step tally, signals, checkpoints within the epoch) and, after each epoch, the
evaluation, the table row, summary.csv, curves.png and last.pth / best.pth."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from patfast.data.mixup import make_mixup
from patfast.distill.base import Distiller
from patfast.errors import TrainingStopped
from patfast.train import checkpoint as ckpt
from patfast.train import distributed as dist_
from patfast.train import faults
from patfast.train.config import EMA_DECAY, SHORT_RUN_WARMUP, ema_decay, warmup_note
from patfast.train.distributed import World
from patfast.train.evaluate import evaluate
from patfast.train.nonfinite import READ_EVERY, NonFiniteTally
from patfast.train.optim import WarmupCosine, make_optimizer
from patfast.train.report import EpochTable, Log, SummaryCsv, plot_curves
from patfast.train.signals import StopSignals
from patfast.train.step import TrainStep, resolve_speed


@dataclass
class Built:
    """What loop.py builds for the training: the distiller and its data, where the run writes, and its labels."""

    cfg: dict
    command: str  # "train" | "teacher"
    distiller: Distiller
    train_loader: object
    test_loader: object
    num_classes: int
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None: fp32
    out: str
    log: Log
    world: World
    distiller_name: str  # pat | kd | none
    what: str  # the distiller as the logs name it, e.g. "pat (paper variant)"
    role: str  # "student" | "teacher"
    name: str  # the timm model trained
    show_bars: bool
    teacher_top1: float | None = None  # the frozen teacher's test accuracy (the plots' reference line)


def projection(epoch_s: float, remaining: int, compiled: bool, now: float | None = None) -> str:
    """The line after a run's first epoch: how long the remaining epochs will take at that epoch's pace."""
    left = epoch_s * remaining
    done = time.strftime("%H:%M", time.localtime((now if now is not None else time.time()) + left))
    took = f"{left / 60:.1f} min" if left < 5400 else f"{left / 3600:.1f} h"
    note = " (an upper bound: the first epoch compiled the step)" if compiled else ""
    return f"projected: {took} more for the remaining {remaining} epoch(s), done at about {done}{note}"


@dataclass
class EpochSums:
    """One epoch's training figures so far (this process): loss sums (device tensors), images, skipped steps."""

    sums: dict
    seen: int = 0
    skipped: int = 0


class Training:
    """The optimiser, the schedule, the step, the EMA and the figures of a run; `epoch(n)` trains and evaluates one
    epoch. `state`: a checkpoint to continue from (its epoch, batch and step)."""

    def __init__(self, b: Built, state: dict | None):
        self.b, cfg, log = b, b.cfg, b.log
        self.model = b.distiller.student
        self.params = b.distiller.trainable_parameters()
        self.speed = resolve_speed(cfg, b.device)
        self.optimizer = make_optimizer(self.params, cfg["opt"], cfg["lr"], cfg["weight_decay"], cfg["momentum"],
                                        fused=True)
        self.steps_per_epoch = len(b.train_loader)
        total = cfg["epochs"] * self.steps_per_epoch
        self.schedule = WarmupCosine(self.optimizer, cfg["lr"], cfg["min_lr"],
                                     round(cfg["warmup_epochs"] * self.steps_per_epoch), total)
        log(f"schedule: lr {cfg['lr']:g}, warm-up {cfg['warmup_epochs']:g} epoch(s) "
            f"({self.schedule.warmup} steps), then cosine to {cfg['min_lr']:g} at step {total} (epoch {cfg['epochs']})"
            + warmup_note(cfg))
        self.step_fn = TrainStep(b.distiller, self.optimizer, self.params, self.speed, b.device, clip=cfg["clip_grad"],
                                 world=b.world, accum=cfg.get("grad_accum", 1))
        self.ema = None
        if cfg["model_ema"]:  # after TrainStep: the copy takes the student's memory format
            from timm.utils import ModelEmaV3

            decay = ema_decay(cfg, total)
            self.ema = self.step_fn.ema = ModelEmaV3(self.model, decay=decay)
            log(f"EMA of the {b.role}: decay {decay:.6g} per step (it averages over ~{1 / (1 - decay):.0f} steps)"
                + ("" if cfg.get("model_ema_decay") is not None else
                   f"; auto: {EMA_DECAY} for long runs, lowered to a tenth of this run's {total} steps"
                   if decay < EMA_DECAY else ""))
            b.distiller.without_hooks(self.ema.module)  # the copy must not write into the distiller's stage taps
        if b.distiller_name == "dkd":
            w = cfg["dkd_warmup_epochs"]
            log(f"DKD: its term's weight grows linearly over {w:g} epoch(s) (epoch e: min(e / {w:g}, 1))"
                + (f" (mdistiller's 20, shortened to a fifth of this {cfg['epochs']}-epoch run; --dkd-warmup-epochs "
                   "sets it)" if w < 20 and w == round(SHORT_RUN_WARMUP * cfg["epochs"], 4) else ""))
        log(f"step: {self.speed.describe()}"
            + (f" | ops backend: {cfg['backend']}" if b.distiller_name != "none" else ""))
        self.mixup = make_mixup(cfg["mixup"], cfg["cutmix"], cfg["smoothing"], b.num_classes, seed=cfg["seed"])
        self.terms = list(b.distiller.terms)
        # best_top1: the paper's metric so far, the best over epochs of max(raw, EMA) top-1
        columns = ["epoch", "lr", "train_loss", *self.terms, "eval_top1", "eval_top5", "ema_top1", "ema_top5",
                   "best_top1", "img_per_s", "epoch_s"]
        self.rows, self.best, self.step = [], {"top1": -1.0, "epoch": 0, "which": ""}, 0
        self.start_epoch, self.start_batch, self.partial = 1, 0, None
        if state is not None:
            mine = ckpt.restore(state, b.distiller, self.optimizer, self.step_fn.scaler, self.ema, self.mixup,
                                b.world.rank, b.world.size)
            self.rows, self.best, self.step = state["rows"], state["best"], state["step"]
            self.start_epoch, self.start_batch = state["epoch"], state["batch"]
            if self.start_batch >= self.steps_per_epoch:  # saved at the end of an epoch
                self.start_epoch, self.start_batch = self.start_epoch + 1, 0
            else:
                self.partial = mine
            log(f"resumed from {os.path.join(b.out, 'last.pth')}: epoch {self.start_epoch}, after "
                f"{self.start_batch} of {self.steps_per_epoch} batches (step {self.step})")
        self.summary = SummaryCsv(os.path.join(b.out, "summary.csv"), columns, self.rows) if b.world.main else None
        self.table = EpochTable(log, self.terms)
        self.run_info = {"command": b.command, **cfg}
        self.stop = StopSignals()
        self.tally = NonFiniteTally(self.terms, cfg["nonfinite_patience"], b.device)
        b.distiller.train()

    def run(self) -> None:
        """Every epoch left (SIGINT / SIGTERM: checkpoint, then TrainingStopped)."""
        with self.stop:
            for epoch in range(self.start_epoch, self.b.cfg["epochs"] + 1):
                self.epoch(epoch)

    def epoch(self, epoch: int) -> dict:
        """Train epoch `epoch` (from the checkpoint's batch when it is the resumed one), evaluate, write; its row."""
        b = self.b
        first = self.start_batch if epoch == self.start_epoch else 0
        t0 = time.perf_counter()
        figures, lr = self._batches(epoch, first, t0)
        train_s = time.perf_counter() - t0
        row, improved = self._evaluate(epoch, figures, lr, train_s, t0)
        if epoch == self.start_epoch and epoch < b.cfg["epochs"]:  # (a resumed partial epoch: scaled to a whole one)
            pace = row["epoch_s"] * self.steps_per_epoch / max(1, self.steps_per_epoch - first)
            b.log(projection(pace, b.cfg["epochs"] - epoch, self.speed.compile))
        self.save(epoch, self.steps_per_epoch, None, best_too=improved)
        if b.world.main:
            self.summary.append(row)  # after the checkpoint: a resume rewrites summary.csv from the checkpoint's rows
            plot_curves(self.rows, self.terms, os.path.join(b.out, "curves.png"),
                        f"{b.role} {b.name} | {b.what} | {b.cfg['data']}", b.role, b.teacher_top1)
        if b.world.distributed:  # a signal during the evaluation: every process stops here, or none does
            self.stop.signum = dist_.any_signal(self.stop.signum, b.device, b.world)
        if self.stop.signum:
            raise self.stop.stopped(os.path.join(b.out, "last.pth"), b.out, False)
        return row

    def _batches(self, epoch: int, first: int, t0: float) -> tuple[EpochSums, float]:
        """The epoch's training steps from batch `first`; the figures and the last learning rate."""
        b, cfg, device = self.b, self.b.cfg, self.b.device
        b.train_loader.set_epoch(epoch, skip_batches=first)
        b.distiller.start_epoch(epoch)
        fig = EpochSums({t: torch.zeros((), device=device) for t in self.terms})
        self.tally.reset_epoch()
        if first and self.partial is not None:
            fig = EpochSums({t: torch.tensor(self.partial["sums"][t], device=device) for t in self.terms},
                            self.partial["seen"])
            self.tally.reset_epoch(self.partial["skipped"])
        bar = tqdm(b.train_loader, desc=f"epoch {epoch}/{cfg['epochs']}", leave=False, disable=not b.show_bars,
                   dynamic_ncols=True, initial=first, total=self.steps_per_epoch)
        lr = self.schedule.value(self.step)
        for i, (x, y) in enumerate(bar, start=first):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            lr = self.schedule.step(self.step)
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            losses = self.step_fn(x, y, step=self.step, first_batch=i == 0)
            self.step += 1
            self.tally.record(self.step_fn.bad, losses, self.step)  # no host read: read every READ_EVERY steps
            for t in self.terms:
                fig.sums[t] += torch.where(self.step_fn.bad, 0.0, losses[t].float())
            fig.seen += x.shape[0]
            cadence = self.step % READ_EVERY == 0 or i == self.steps_per_epoch - 1  # the same steps everywhere
            if cadence:
                self.read_tally(epoch)
                if b.show_bars:
                    loss = float(sum(losses.values()))
                    bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{fig.seen / (time.perf_counter() - t0):.0f}")
            faults.reached("step")  # tests only: the fault-injection seam (train/faults.py)
            # a signal to any process stops them all after the same step: under torchrun a signal counts only once
            # the processes have compared notes (at the cadence), so all of them checkpoint and stop together
            stopping = self.stop.signum
            if b.world.distributed:
                stopping = None
                if cadence:
                    self.stop.signum = stopping = dist_.any_signal(self.stop.signum, device, b.world)
            due = stopping or (cfg["checkpoint_every"] and self.step % cfg["checkpoint_every"] == 0)
            if i + 1 < self.steps_per_epoch and due:
                now = self.read_tally(epoch)
                # no checkpoint inside a run of non-finite steps: their forwards may have put NaN into BatchNorm
                # statistics, and the last good checkpoint must stay the last one written
                if now.run == 0:
                    fig.skipped = now.skipped
                    self.save(epoch, i + 1, fig)
            if stopping:
                bar.close()
                raise self.stop.stopped(os.path.join(b.out, "last.pth"), b.out, i + 1 < self.steps_per_epoch)
        bar.close()
        fig.skipped = self.read_tally(epoch).skipped
        return fig, lr

    def _evaluate(self, epoch: int, fig: EpochSums, lr: float, train_s: float, t0: float) -> tuple[dict, bool]:
        """The epoch's row (training figures over all processes, raw and EMA test accuracy); whether it is the best."""
        b, terms = self.b, self.terms
        sums, seen, counted = fig.sums, fig.seen, self.steps_per_epoch - fig.skipped
        if b.world.distributed:  # the epoch's figures over all processes
            totals = dist_.all_sum(torch.stack([*(sums[t].float() for t in terms),
                                                torch.tensor(float(counted), device=b.device),
                                                torch.tensor(float(seen), device=b.device)]), b.world)
            sums = dict(zip(terms, totals[:len(terms)]))
            counted, seen = int(totals[-2]), int(totals[-1])
        means = {t: float(sums[t]) / max(1, counted) for t in terms}
        if fig.skipped:
            b.log(f"warning: {fig.skipped} step(s) of epoch {epoch} had a non-finite loss and were skipped")
        ema_module = self.ema.module if self.ema is not None else None
        for module in (self.model, ema_module):
            if module is not None:
                dist_.broadcast_buffers(module, b.world)  # every process evaluates rank 0's model
        top1, top5 = evaluate(self.model, b.test_loader, b.device, b.dtype, world=b.world)
        ema_top = (evaluate(ema_module, b.test_loader, b.device, b.dtype, world=b.world) if ema_module is not None
                   else (None, None))
        improved = False
        for which, acc in (("raw", top1), ("ema", ema_top[0])):
            if acc is not None and acc > self.best["top1"]:
                self.best, improved = {"top1": acc, "epoch": epoch, "which": which}, True
        row = {"epoch": epoch, "lr": lr, "train_loss": sum(means.values()), **means, "eval_top1": top1,
               "eval_top5": top5, "ema_top1": ema_top[0], "ema_top5": ema_top[1], "best_top1": self.best["top1"],
               "img_per_s": seen / train_s, "epoch_s": time.perf_counter() - t0}
        self.rows.append(row)
        self.table.row(row)
        return row, improved

    def read_tally(self, epoch: int):
        """The skipped-step tally (one host read); stops the run once `patience` consecutive steps were skipped."""
        seen_so_far = self.tally.read()
        if seen_so_far.stop_step >= 0:
            cfg = self.b.cfg
            raise TrainingStopped(
                f"{cfg['nonfinite_patience']} consecutive steps with a non-finite loss "
                f"({', '.join(seen_so_far.terms) or 'total'}) at epoch {epoch}, step {seen_so_far.stop_step}; each "
                f"was skipped; the last good checkpoint {os.path.join(self.b.out, 'last.pth')} is intact (lower "
                "--lr, or check the data)", 3)
        return seen_so_far

    def save(self, epoch: int, batch: int, fig: EpochSums | None, *, best_too: bool = False) -> None:
        """last.pth (and best.pth) after `batch` batches of `epoch`; `fig`: the epoch's figures so far, None at its
        end (nothing of it to carry). Every process comes here at the same step (the gather is collective); the
        weights are the same on all."""
        b = self.b
        if not all(bool(torch.isfinite(p).all()) for p in self.params):  # never replace a good checkpoint by a bad
            b.log(f"warning: non-finite weights at epoch {epoch}, step {self.step}: checkpoint not written")
            return
        for module in (self.model, self.ema.module if self.ema is not None else None):
            if module is not None:
                dist_.broadcast_buffers(module, b.world)
        fig, counted = (fig, batch - fig.skipped) if fig is not None else (EpochSums({}), 0)
        local = ckpt.per_process_state(b.distiller, {t: float(v) for t, v in fig.sums.items()}, fig.seen, counted,
                                       fig.skipped)
        processes = ckpt.gather_processes(local, b.world)
        if not b.world.main:
            return
        state = ckpt.training_state(b.distiller, self.optimizer, self.step_fn.scaler, self.ema, epoch=epoch,
                                    batch=batch, step=self.step, best=self.best, rows=self.rows, processes=processes,
                                    mixup=self.mixup, config=self.run_info)
        ckpt.atomic_save(state, os.path.join(b.out, "last.pth"))
        if best_too:
            ckpt.atomic_save(state, os.path.join(b.out, "best.pth"))
