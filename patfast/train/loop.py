"""The training run: data, models, distiller, optimiser; epochs of training and evaluation; the output files.

One function serves `patfast train` (a student, distilled or alone) and `patfast teacher` (a model alone).
"""

from __future__ import annotations

import os
import random
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import yaml
from tqdm import tqdm

from patfast.data import load_data, make_loader
from patfast.data.mixup import make_mixup
from patfast.distill.base import Vanilla
from patfast.distill.build import DistillSettings, build_distiller
from patfast.errors import TrainingStopped, UserError
from patfast.models.create import create_model
from patfast.models.weights import load_weights, save_weights
from patfast.train import checkpoint as ckpt
from patfast.train import distributed as dist_
from patfast.train import faults
from patfast.train.distributed import World
from patfast.train.nonfinite import READ_EVERY, NonFiniteTally
from patfast.train.optim import WarmupCosine, make_optimizer
from patfast.train.report import EpochTable, Log, SummaryCsv, header, plot_curves
from patfast.train.signals import StopSignals
from patfast.train.step import TrainStep, amp_dtype, resolve_speed
from patfast.train.threads import set_cpu_threads

TERMS = {"none": ["loss_gt"], "kd": ["loss_gt", "loss_kd"], "pat": ["loss_gt", "loss_kd", "loss_fd", "loss_reg"]}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device '{name}' (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device: unsupported device type '{device.type}' (auto, cpu, cuda or cuda:N)")
    return device


def _aligner_order(cfg: dict, world: World) -> str:
    """--pat-aligner-order "auto" -> upsample-last, but plain under --sync-bn with several processes: the
    upsample-last aligners form their BatchNorm statistics themselves, from this process alone."""
    order = cfg.get("pat_aligner_order", "auto")
    if cfg.get("sync_bn") and world.distributed:
        if order == "upsample-last":
            raise UserError("--pat-aligner-order upsample-last computes its BatchNorm statistics per process: with "
                            "--sync-bn use plain (or auto)")
        return "plain"
    return "upsample-last" if order == "auto" else order


def projection(epoch_s: float, remaining: int, compiled: bool, now: float | None = None) -> str:
    """The line after a run's first epoch: how long the remaining epochs will take at that epoch's pace."""
    left = epoch_s * remaining
    done = time.strftime("%H:%M", time.localtime((now if now is not None else time.time()) + left))
    took = f"{left / 60:.1f} min" if left < 5400 else f"{left / 3600:.1f} h"
    note = " (an upper bound: the first epoch compiled the step)" if compiled else ""
    return f"projected: {took} more for the remaining {remaining} epoch(s), done at about {done}{note}"


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def resume_dir(cfg: dict) -> str | None:
    """The run directory to continue (--resume DIR, or --resume auto with an --out holding last.pth), or None."""
    resume = cfg.get("resume")
    if not resume:
        return None
    if resume == "auto":
        out = cfg.get("out")
        return out if out and os.path.isfile(os.path.join(out, "last.pth")) else None
    if not os.path.isdir(resume):
        raise UserError(f"--resume {resume}: no such run directory")
    if not os.path.isfile(os.path.join(resume, "last.pth")):
        raise UserError(f"--resume {resume}: the directory holds no last.pth (not a patfast run, or it never "
                        "finished a checkpoint)")
    if cfg.get("out") and os.path.abspath(cfg["out"]) != os.path.abspath(resume):
        raise UserError(f"--resume {resume} continues that directory; --out {cfg['out']} names another")
    return resume


def _holds_a_run(out: str) -> bool:
    """A checkpoint, or a summary.csv with at least one finished epoch (a header alone is a run that never got
    anywhere: fix the mistake and run again into the same directory)."""
    if os.path.exists(os.path.join(out, "last.pth")):
        return True
    try:
        with open(os.path.join(out, "summary.csv")) as f:
            return sum(1 for line in f if line.strip()) > 1
    except OSError:
        return False


def prepare_out(out: str | None, command: str, resuming: bool = False) -> str:
    out = out or os.path.join("runs", f"{command}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not resuming and os.path.isdir(out) and _holds_a_run(out):
        raise UserError(f"output directory {out} already holds a run; choose another --out, or --resume {out}")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to output directory {out}: {e.strerror or e}") from None
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, dtype: torch.dtype | None,
             progress: bool = False, desc: str = "eval", world: World | None = None) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) of `model` over the loader (summed over the ranks' shards under torchrun)."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    k = min(5, loader.num_classes)
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
            logits = model(x)
        top = logits.float().topk(k, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        total += y.numel()
    model.train(was_training)
    if world is not None and world.distributed:
        counts = dist_.all_sum(torch.tensor([correct1, correct5, total], dtype=torch.float64, device=device), world)
        correct1, correct5, total = counts.tolist()
    return 100.0 * correct1 / total, 100.0 * correct5 / total


def _teacher_stats(cfg: dict, meta: dict, dataset) -> tuple[list[float], list[float]]:
    def pick(key):
        if cfg.get(f"teacher_{key}") is not None:
            return cfg[f"teacher_{key}"]
        if key in meta:
            return [float(v) for v in yaml.safe_load(meta[key])]
        return list(getattr(dataset, key))
    return pick("mean"), pick("std")


def run(cfg: dict, command: str, log: Log | None = None) -> dict:
    """Train according to the resolved config; returns the final figures. command: "train" or "teacher"."""
    world = dist_.from_env()
    faults.arm()
    device = resolve_device(cfg["device"])
    if world.distributed:
        if device.type == "cuda":
            device = torch.device("cuda", world.local_rank)
            torch.cuda.set_device(device)
        if not cfg.get("out"):
            raise UserError("under torchrun, give --out (every process must write to the same run directory)")
        if (command == "train" and cfg.get("distiller") != "none" and not cfg.get("teacher_checkpoint")
                and not cfg.get("teacher_pretrained")):
            raise UserError("under torchrun, give --teacher-checkpoint (train the teacher first with "
                            "`patfast teacher`, or with a one-process `patfast train`) or --teacher-pretrained")
    seed_everything(cfg["seed"], cfg["deterministic"])
    dtype = amp_dtype(cfg["amp"], device)
    resume = resume_dir(cfg)
    state = None
    if resume:
        state = ckpt.read_state(os.path.join(resume, "last.pth"))
        saved = state["config"]
        if saved.get("command", command) != command:
            raise UserError(f"--resume {resume}: that run is a `patfast {saved.get('command')}` run")
        ckpt.check_compatible({k: v for k, v in saved.items() if k != "command"}, cfg,
                              os.path.join(resume, "last.pth"), cfg.get("allow_config_change", False))
    world = dist_.setup(device) if world.distributed else world
    try:
        out = resume or cfg.get("out")
        if world.main:  # rank 0 owns the run directory; the others wait for it
            out = prepare_out(out, command, resuming=resume is not None)
        dist_.barrier(world)
        own_log = log is None
        log = log or Log(os.path.join(out, "log.txt") if world.main else None, quiet=not world.main)
        try:
            return _run(cfg, command, device, dtype, out, log, state, world)
        finally:
            if own_log:
                log.close()
    finally:
        if world.distributed:
            dist_.teardown()


def _run(cfg, command, device, dtype, out, log, state=None, world: World | None = None) -> dict:
    world = world or World()
    before = torch.get_num_threads()
    set_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world.size)), log)  # before the header reports them
    try:
        return _train(cfg, command, device, dtype, out, log, state, world)
    finally:
        torch.set_num_threads(before)  # a caller in the same process (tests, `train` after its teacher) keeps its own


def _train(cfg, command, device, dtype, out, log, state, world: World) -> dict:
    header(log, device, cfg)
    if world.distributed:
        log(f"torchrun: {world.size} processes (rank 0 writes the outputs), batch {cfg['batch_size']} per process")
    if state is None and world.main:  # a resumed run keeps the args.yaml it was started with
        with open(os.path.join(out, "args.yaml"), "w") as f:
            yaml.safe_dump({"command": command, **cfg}, f, sort_keys=False)
    dataset = load_data(cfg["data"])
    loader_args = {"batch_size": cfg["batch_size"], "img_size": cfg["img_size"], "device": device,
                   "backend": cfg["data_backend"], "seed": cfg["seed"], "workers": cfg["workers"],
                   "crop_pct": cfg["crop_pct"], "progress": cfg["progress"], "rank": world.rank,
                   "world_size": world.size}
    accum = cfg.get("grad_accum", 1)  # the train loader yields accum micro-batches at once; TrainStep splits them
    train_loader = make_loader(dataset, "train", train=True, crop_scale=tuple(cfg["crop_scale"]),
                               hflip=cfg["hflip"], auto_augment=cfg["auto_augment"] or None, re_prob=cfg["reprob"],
                               **{**loader_args, "batch_size": cfg["batch_size"] * accum})
    test_loader = make_loader(dataset, "test", train=False, **loader_args)
    k = dataset.num_classes

    teacher_top = None
    if command == "teacher":
        role, name, distiller_name = "teacher", cfg["teacher"], "none"
        model = create_model(name, k, cfg["img_size"])
        if cfg.get("init_checkpoint"):
            load_weights(model, cfg["init_checkpoint"], what="initial")
        distiller = Vanilla(model, smoothing=cfg["smoothing"])
    else:
        role, name, distiller_name = "student", cfg["student"], cfg["distiller"]
        student = create_model(name, k, cfg["img_size"])
        teacher_model, meta = None, {}
        if distiller_name != "none":
            from patfast.models.legacy_checkpoint import teacher_from_config
            from patfast.train.teacher_cache import teacher_checkpoint

            path = cfg.get("teacher_checkpoint") or (None if cfg.get("teacher_pretrained") else
                                                     teacher_checkpoint(cfg, log, train=run))
            teacher_model, meta, source = teacher_from_config(cfg, k, path)  # timm 0.6.5 files, EMA, pretrained
            log(f"teacher: {cfg['teacher']} from {source}")
        t_mean, t_std = _teacher_stats(cfg, meta, dataset)
        settings = DistillSettings.from_config(cfg, pat_aligner_order=_aligner_order(cfg, world))
        distiller = build_distiller(distiller_name, student, teacher_model, settings, img_size=cfg["img_size"],
                                    data_mean=dataset.mean, data_std=dataset.std, teacher_mean=t_mean,
                                    teacher_std=t_std)
    if cfg.get("sync_bn"):
        dist_.sync_batchnorm(distiller, world, device, log)
    distiller.to(device)
    dist_.broadcast_module(distiller, world)
    show_bars = cfg["progress"] and sys.stderr.isatty()  # bars only where a person watches; the table is the log
    model = distiller.student
    params = distiller.trainable_parameters()
    n_student = sum(p.numel() for p in model.parameters())
    n_extra = sum(p.numel() for p in params) - n_student
    what = f"{distiller_name}" + (f" ({cfg['pat_variant']} variant)" if distiller_name == "pat" else "")
    per_step = f"{cfg['batch_size']}" + (f" x {accum} accumulated" if accum > 1 else "")
    log(f"data: {cfg['data']} ({len(train_loader)} train steps of {per_step}, {k} classes, "
        f"{train_loader.backend} loader, "
        f"{cfg['img_size']}px) | "
        f"{role}: {name} ({n_student / 1e6:.2f}M params) | distiller: {what}"
        + (f" (+{n_extra / 1e6:.2f}M trainable params)" if n_extra else ""))
    frozen = distiller.frozen_teacher()
    if frozen is not None:
        teacher_top = evaluate(frozen.model, test_loader, device, dtype, show_bars, "teacher eval", world)
        log(f"teacher test accuracy: top-1 {teacher_top[0]:.2f}%  top-5 {teacher_top[1]:.2f}%")

    speed = resolve_speed(cfg, device)
    optimizer = make_optimizer(params, cfg["opt"], cfg["lr"], cfg["weight_decay"], cfg["momentum"], fused=True)
    steps_per_epoch = len(train_loader)
    schedule = WarmupCosine(optimizer, cfg["lr"], cfg["min_lr"], round(cfg["warmup_epochs"] * steps_per_epoch),
                            cfg["epochs"] * steps_per_epoch)
    train_step = TrainStep(distiller, optimizer, params, speed, device, clip=cfg["clip_grad"], world=world,
                           accum=accum)
    ema = None
    if cfg["model_ema"]:  # after TrainStep: the copy takes the student's memory format
        from timm.utils import ModelEmaV3

        ema = train_step.ema = ModelEmaV3(model, decay=cfg["model_ema_decay"])
        distiller.without_hooks(ema.module)  # the copy must not write into the distiller's stage taps
    log(f"step: {speed.describe()}" + (f" | ops backend: {cfg['backend']}" if distiller_name != "none" else ""))
    mixup = make_mixup(cfg["mixup"], cfg["cutmix"], cfg["smoothing"], k, seed=cfg["seed"])
    terms = TERMS[distiller_name]
    # best_top1: the paper's metric so far, the best over epochs of max(raw, EMA) top-1
    columns = ["epoch", "lr", "train_loss", *terms, "eval_top1", "eval_top5", "ema_top1", "ema_top5", "best_top1",
               "img_per_s", "epoch_s"]
    rows, best, step = [], {"top1": -1.0, "epoch": 0, "which": ""}, 0
    start_epoch, start_batch, partial = 1, 0, None
    if state is not None:
        mine = ckpt.restore(state, distiller, optimizer, train_step.scaler, ema, mixup, world.rank, world.size)
        rows, best, step = state["rows"], state["best"], state["step"]
        start_epoch, start_batch = state["epoch"], state["batch"]
        if start_batch >= steps_per_epoch:  # saved at the end of an epoch
            start_epoch, start_batch = start_epoch + 1, 0
        else:
            partial = mine
        log(f"resumed from {os.path.join(out, 'last.pth')}: epoch {start_epoch}, after {start_batch} of "
            f"{steps_per_epoch} batches (step {step})")
    summary = SummaryCsv(os.path.join(out, "summary.csv"), columns, rows) if world.main else None
    table = EpochTable(log, terms)
    run_info = {"command": command, **cfg}
    stop = StopSignals()
    distiller.train()

    def save(epoch, batch, sums, seen, counted, skipped, *, best_too=False):
        # every process comes here at the same step (the gather is collective); the weights are the same on all
        if not all(bool(torch.isfinite(p).all()) for p in params):  # never replace a good checkpoint by a bad one
            log(f"warning: non-finite weights at epoch {epoch}, step {step}: checkpoint not written")
            return
        for module in (model, ema.module if ema is not None else None):
            if module is not None:
                dist_.broadcast_buffers(module, world)
        local = ckpt.per_process_state(distiller, {t: float(v) for t, v in sums.items()}, seen, counted, skipped)
        processes = ckpt.gather_processes(local, world)
        if not world.main:
            return
        state = ckpt.training_state(distiller, optimizer, train_step.scaler, ema, epoch=epoch, batch=batch,
                                    step=step, best=best, rows=rows, processes=processes, mixup=mixup,
                                    config=run_info)
        ckpt.atomic_save(state, os.path.join(out, "last.pth"))
        if best_too:
            ckpt.atomic_save(state, os.path.join(out, "best.pth"))

    tally = NonFiniteTally(terms, cfg["nonfinite_patience"], device)

    def read_tally(epoch: int):
        """The skipped-step tally (one host read); stops the run once `patience` consecutive steps were skipped."""
        seen_so_far = tally.read()
        if seen_so_far.stop_step >= 0:
            raise TrainingStopped(
                f"{cfg['nonfinite_patience']} consecutive steps with a non-finite loss "
                f"({', '.join(seen_so_far.terms) or 'total'}) at epoch {epoch}, step {seen_so_far.stop_step}; each "
                f"was skipped; the last good checkpoint {os.path.join(out, 'last.pth')} is intact (lower --lr, or "
                "check the data)", 3)
        return seen_so_far

    with stop:
        for epoch in range(start_epoch, cfg["epochs"] + 1):
            first = start_batch if epoch == start_epoch else 0
            train_loader.set_epoch(epoch, skip_batches=first)
            t0 = time.perf_counter()
            sums = {t: torch.zeros((), device=device) for t in terms}
            seen = 0
            tally.reset_epoch()
            if first and partial is not None:
                sums = {t: torch.tensor(partial["sums"][t], device=device) for t in terms}
                seen = partial["seen"]
                tally.reset_epoch(partial["skipped"])
            bar = tqdm(train_loader, desc=f"epoch {epoch}/{cfg['epochs']}", leave=False, disable=not show_bars,
                       dynamic_ncols=True, initial=first, total=steps_per_epoch)
            for i, (x, y) in enumerate(bar, start=first):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                lr = schedule.step(step)
                if mixup is not None:
                    x, y = mixup(x, y)
                losses = train_step(x, y, step=step, first_batch=i == 0)
                step += 1
                tally.record(train_step.bad, losses, step)  # no host read: the tally is read every READ_EVERY steps
                for t in terms:
                    sums[t] += torch.where(train_step.bad, 0.0, losses[t].float())
                seen += x.shape[0]
                cadence = step % READ_EVERY == 0 or i == steps_per_epoch - 1  # the same steps on every process
                if cadence:
                    read_tally(epoch)
                    if show_bars:
                        loss = float(sum(losses.values()))
                        bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
                faults.reached("step")  # tests only: the fault-injection seam (train/faults.py)
                # a signal to any process stops them all after the same step: under torchrun a signal counts only once
                # the processes have compared notes (at the cadence), so all of them checkpoint and stop together
                stopping = stop.signum
                if world.distributed:
                    stopping = None
                    if cadence:
                        stop.signum = stopping = dist_.any_signal(stop.signum, device, world)
                due = stopping or (cfg["checkpoint_every"] and step % cfg["checkpoint_every"] == 0)
                if i + 1 < steps_per_epoch and due:
                    now = read_tally(epoch)
                    # no checkpoint inside a run of non-finite steps: their forwards may have put NaN into BatchNorm
                    # statistics, and the last good checkpoint must stay the last one written
                    if now.run == 0:
                        save(epoch, i + 1, sums, seen, i + 1 - now.skipped, now.skipped)
                if stopping:
                    bar.close()
                    raise stop.stopped(os.path.join(out, "last.pth"), out, i + 1 < steps_per_epoch)
            bar.close()
            train_s = time.perf_counter() - t0
            skipped = read_tally(epoch).skipped
            counted = steps_per_epoch - skipped
            if world.distributed:  # the epoch's figures over all processes
                totals = dist_.all_sum(torch.stack([*(sums[t].float() for t in terms),
                                                    torch.tensor(float(counted), device=device),
                                                    torch.tensor(float(seen), device=device)]), world)
                sums = dict(zip(terms, totals[:len(terms)]))
                counted, seen = int(totals[-2]), int(totals[-1])
            means = {t: float(sums[t]) / max(1, counted) for t in terms}
            if skipped:
                log(f"warning: {skipped} step(s) of epoch {epoch} had a non-finite loss and were skipped")
            for module in (model, ema.module if ema is not None else None):
                if module is not None:
                    dist_.broadcast_buffers(module, world)  # every process evaluates rank 0's model
            top1, top5 = evaluate(model, test_loader, device, dtype, world=world)
            ema_top = evaluate(ema.module, test_loader, device, dtype, world=world) if ema is not None else (None, None)
            improved = False
            for which, acc in (("raw", top1), ("ema", ema_top[0])):
                if acc is not None and acc > best["top1"]:
                    best, improved = {"top1": acc, "epoch": epoch, "which": which}, True
            row = {"epoch": epoch, "lr": lr, "train_loss": sum(means.values()), **means, "eval_top1": top1,
                   "eval_top5": top5, "ema_top1": ema_top[0], "ema_top5": ema_top[1], "best_top1": best["top1"],
                   "img_per_s": seen / train_s, "epoch_s": time.perf_counter() - t0}
            rows.append(row)
            table.row(row)
            if epoch == start_epoch and epoch < cfg["epochs"]:  # (a resumed partial epoch: scaled to a whole one)
                pace = row["epoch_s"] * steps_per_epoch / max(1, steps_per_epoch - first)
                log(projection(pace, cfg["epochs"] - epoch, speed.compile))
            save(epoch, steps_per_epoch, {}, 0, 0, 0, best_too=improved)
            if world.main:
                summary.append(row)  # after the checkpoint: a resume rewrites summary.csv from the checkpoint's rows
                plot_curves(rows, terms, os.path.join(out, "curves.png"),
                            f"{role} {name} | {what} | {cfg['data']}")
            if world.distributed:  # a signal during the evaluation: every process stops here, or none does
                stop.signum = dist_.any_signal(stop.signum, device, world)
            if stop.signum:
                raise stop.stopped(os.path.join(out, "last.pth"), out, False)

    meta = {"model": name, "num_classes": k, "img_size": cfg["img_size"], "mean": list(dataset.mean),
            "std": list(dataset.std), "data": cfg["data"], "top1": rows[-1]["eval_top1"]}
    weights = os.path.join(out, f"{role}.safetensors")
    if world.main:
        save_weights(model, weights, meta)
    if ema is not None and world.main:
        save_weights(ema.module, os.path.join(out, f"{role}_ema.safetensors"), {**meta, "top1": rows[-1]["ema_top1"]})
    result = {"out": out, "weights": weights, "role": role, "model": name, "distiller": what, "last": rows[-1],
              "best": best, "teacher_top1": teacher_top[0] if teacher_top else None,
              "teacher_top5": teacher_top[1] if teacher_top else None}
    final_table(log, cfg, result, len(test_loader.dataset) if hasattr(test_loader, "dataset") else None)
    return result


def final_table(log: Log, cfg: dict, r: dict, n_test: int | None) -> None:
    last = r["last"]
    log("")
    log(f"== result on the {cfg['data']} test split" + (f" ({n_test} images)" if n_test else "") + " ==")
    log(f"{'model':<60} {'top-1':>7} {'top-5':>7}")
    if r["teacher_top1"] is not None:
        log(f"{'teacher ' + cfg['teacher']:<60} {r['teacher_top1']:>7.2f} {r['teacher_top5']:>7.2f}")
    label = f"{r['role']} {r['model']}" + (f" [{r['distiller']}]" if r["role"] == "student" else "")
    log(f"{label + ', last epoch':<60} {last['eval_top1']:>7.2f} {last['eval_top5']:>7.2f}")
    if last.get("ema_top1") is not None:
        log(f"{label + ', EMA, last epoch':<60} {last['ema_top1']:>7.2f} {last['ema_top5']:>7.2f}")
    b = r["best"]
    log(f"{'best over epochs of max(raw, EMA): the paper metric':<60} {b['top1']:>7.2f}   "
        f"(epoch {b['epoch']}, {b['which']})")
    log(f"outputs in {r['out']}: summary.csv, curves.png, log.txt, args.yaml, last.pth, {r['role']}.safetensors")
