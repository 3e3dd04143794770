"""The training run: the device, the output directory, resuming; data, models and distiller built; the training
(patfast/train/training.py); the final weights and table.

One function serves `patfast train` (a student, distilled or alone) and `patfast teacher` (a model alone).
"""

from __future__ import annotations

import os
import random
import sys
import time

import numpy as np
import torch
import yaml

from patfast.data import load_data, make_loader
from patfast.data.datasets import eval_split_name
from patfast.distill.base import Vanilla
from patfast.distill.build import DistillSettings, build_distiller
from patfast.errors import TrainingStopped, UserError
from patfast.models.create import create_model, random_init_note
from patfast.models.weights import load_weights, save_weights
from patfast.train import checkpoint as ckpt
from patfast.train import distributed as dist_
from patfast.train import faults
from patfast.train.distributed import World
from patfast.train.evaluate import evaluate
from patfast.train.report import Log, header
from patfast.train.step import amp_dtype
from patfast.train.threads import set_cpu_threads
from patfast.train.training import Built, Training


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


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def resume_dir(cfg: dict) -> str | None:
    """The run directory to continue (--resume DIR, or --resume auto with an --out holding last.pth), or None (a
    fresh run; also --resume DIR of a run stopped before its first checkpoint: it starts again in DIR)."""
    resume = cfg.get("resume")
    if not resume:
        return None
    if resume == "auto":
        out = cfg.get("out")
        if not out:
            raise UserError("--resume auto continues the run in --out DIR if there is one: give --out")
        return out if os.path.isfile(os.path.join(out, "last.pth")) else None
    if not os.path.isdir(resume):
        raise UserError(f"--resume {resume}: no such run directory")
    if cfg.get("out") and os.path.abspath(cfg["out"]) != os.path.abspath(resume):
        raise UserError(f"--resume {resume} continues that directory; --out {cfg['out']} names another")
    if not os.path.isfile(os.path.join(resume, "last.pth")):
        if os.path.isfile(os.path.join(resume, "args.yaml")):
            return None  # stopped before its first checkpoint (e.g. in the demo's teacher phase): run it again
        raise UserError(f"--resume {resume}: the directory holds no last.pth (not a patfast run, or it never "
                        "finished a checkpoint)")
    return resume


def saved_config(cfg: dict, command: str) -> dict | None:
    """The config of the run that --resume continues (its last.pth's; the args.yaml of a run stopped before its
    first checkpoint), for the command line to override; None for a fresh run."""
    resume = cfg.get("resume")
    where = resume_dir(cfg)
    if where:
        saved = ckpt.read_config(os.path.join(where, "last.pth"))
    elif resume and resume != "auto":
        path = os.path.join(resume, "args.yaml")
        try:
            with open(path) as f:
                saved = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"--resume {resume}: cannot read {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(saved, dict):
            raise UserError(f"--resume {resume}: {path} is not a patfast args.yaml")
        saved["out"] = resume
    else:
        return None
    _check_command(saved, command, where or resume)
    return {k: v for k, v in saved.items() if k != "command"}


def _check_command(saved: dict, command: str, where: str) -> None:
    """A UserError unless the run in `where` (its saved config) was made by `command` (train or teacher)."""
    if saved.get("command", command) != command:
        raise UserError(f"--resume {where}: that run is a `patfast {saved['command']}` run (continue it with "
                        f"`patfast {saved['command']} --resume {where}`)")


def _check_epochs(state: dict, cfg: dict, resume: str) -> None:
    if cfg["epochs"] < state["epoch"]:
        raise UserError(f"--resume {resume}: the run has reached epoch {state['epoch']}; --epochs {cfg['epochs']} "
                        "would end it before that (give more to extend it)")


def _resume_notes(state: dict, cfg: dict, resume: str) -> list[str]:
    """What the log says about a resumed run's length: extended, or nothing left to train."""
    before = state["config"].get("epochs")
    if before != cfg["epochs"]:
        return [f"resume: --epochs {before} -> {cfg['epochs']}: the cosine schedule now ends at epoch {cfg['epochs']} "
                "(the steps done followed the old one)"]
    if len(state["rows"]) >= cfg["epochs"]:
        return [f"resume: the run had finished its {cfg['epochs']} epochs; nothing left to train (extend it with "
                f"--resume {resume} --epochs N)"]
    return []


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
        _check_command(saved, command, resume)
        ckpt.check_compatible({k: v for k, v in saved.items() if k != "command"}, cfg,
                              os.path.join(resume, "last.pth"), cfg.get("allow_config_change", False))
        _check_epochs(state, cfg, resume)
    world = dist_.setup(device) if world.distributed else world
    try:
        out = resume or cfg.get("out")
        if world.main:  # rank 0 owns the run directory; the others wait for it
            out = prepare_out(out, command, resuming=resume is not None)
        dist_.barrier(world)
        own_log = log is None
        log = log or Log(os.path.join(out, "log.txt") if world.main else None, quiet=not world.main)
        if cfg.get("resume") not in (None, "auto") and resume is None:
            log(f"--resume {cfg['resume']}: no checkpoint there yet (stopped before its first one): the run starts "
                "again from its args.yaml")
        try:
            return _run(cfg, command, device, dtype, out, log, state, world)
        except BaseException as e:
            log.record(_ending(e))  # log.txt says how the run ended, as the terminal did
            raise
        finally:
            if own_log:
                log.close()
    finally:
        if world.distributed:
            dist_.teardown()


def _ending(e: BaseException) -> str:
    """The line that ends the log of a run that did not finish (the CLI prints the same on stderr)."""
    if isinstance(e, UserError):
        return f"patfast: error: {e}"
    if isinstance(e, TrainingStopped):
        return f"patfast: {e}"
    if isinstance(e, KeyboardInterrupt):
        return "patfast: interrupted: the last checkpoint written, if any, is kept"
    return f"patfast: crashed: {type(e).__name__}: {e} (traceback on stderr)"


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
    for note in _resume_notes(state, cfg, out) if state is not None else []:
        log(note)
    if world.distributed:
        log(f"torchrun: {world.size} processes (rank 0 writes the outputs), batch {cfg['batch_size']} per process")
    if state is None and world.main:  # a resumed run keeps the args.yaml it was started with
        with open(os.path.join(out, "args.yaml"), "w") as f:
            yaml.safe_dump({"command": command, **cfg}, f, sort_keys=False)
    built, dataset, teacher_top = _build(cfg, command, device, dtype, out, log, world)
    training = Training(built, state)
    training.run()
    return _finish(built, training, dataset, teacher_top)


def _build(cfg, command, device, dtype, out, log, world: World) -> tuple[Built, object, tuple | None]:
    """The data, the models and the distiller of a run (the teacher trained first when it has to be); the teacher's
    test accuracy when there is one."""
    dataset = load_data(cfg["data"])
    for note in dataset.notes:  # e.g. the files an ImageFolder skipped
        log(note)
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

    if command == "teacher":
        role, name, distiller_name = "teacher", cfg["teacher"], "none"
        model = create_model(name, k, cfg["img_size"])
        if cfg.get("init_checkpoint"):
            load_weights(model, cfg["init_checkpoint"], what="initial")
        elif note := random_init_note(name, "pass --init-checkpoint FILE to start from weights"):
            log(note)
        distiller = Vanilla(model, smoothing=cfg["smoothing"])
    else:
        role, name, distiller_name = "student", cfg["student"], cfg["distiller"]
        student = create_model(name, k, cfg["img_size"])
        if note := random_init_note(name):
            log(note)
        teacher_model, meta = None, {}
        if distiller_name != "none":
            from patfast.models.legacy_checkpoint import teacher_from_config
            from patfast.train.teacher_cache import teacher_checkpoint

            path = cfg.get("teacher_checkpoint") or (None if cfg.get("teacher_pretrained") else
                                                     teacher_checkpoint(cfg, log, train=run, out=out))
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
    n_student = sum(p.numel() for p in distiller.student.parameters())
    n_extra = sum(p.numel() for p in distiller.trainable_parameters()) - n_student
    what = f"{distiller_name}" + (f" ({cfg['pat_variant']} variant)" if distiller_name == "pat" else "")
    per_step = f"{cfg['batch_size']}" + (f" x {accum} accumulated" if accum > 1 else "")
    log(f"data: {cfg['data']} ({len(train_loader)} train steps of {per_step}, {k} classes, "
        f"{train_loader.backend} loader, "
        f"{cfg['img_size']}px) | "
        f"{role}: {name} ({n_student / 1e6:.2f}M params) | distiller: {what}"
        + (f" (+{n_extra / 1e6:.2f}M trainable params)" if n_extra else ""))
    teacher_top = None
    frozen = distiller.frozen_teacher()
    if frozen is not None:
        teacher_top = evaluate(frozen.model, test_loader, device, dtype, show_bars, "teacher eval", world)
        log(f"teacher test accuracy: top-1 {teacher_top[0]:.2f}%  top-5 {teacher_top[1]:.2f}%")
    built = Built(cfg, command, distiller, train_loader, test_loader, k, device, dtype, out, log, world,
                  distiller_name, what, role, name, show_bars, teacher_top[0] if teacher_top else None)
    return built, dataset, teacher_top


def _finish(b: Built, training: Training, dataset, teacher_top: tuple | None) -> dict:
    """The final weights (raw and EMA) and the final table; the run's figures."""
    rows, cfg = training.rows, b.cfg
    meta = {"model": b.name, "num_classes": b.num_classes, "img_size": cfg["img_size"], "mean": list(dataset.mean),
            "std": list(dataset.std), "data": cfg["data"], "top1": rows[-1]["eval_top1"]}
    weights = os.path.join(b.out, f"{b.role}.safetensors")
    if b.world.main:
        save_weights(training.model, weights, meta)
        if training.ema is not None:
            save_weights(training.ema.module, os.path.join(b.out, f"{b.role}_ema.safetensors"),
                         {**meta, "top1": rows[-1]["ema_top1"]})
    result = {"out": b.out, "weights": weights, "role": b.role, "model": b.name, "distiller": b.what,
              "last": rows[-1], "best": training.best, "teacher_top1": teacher_top[0] if teacher_top else None,
              "teacher_top5": teacher_top[1] if teacher_top else None}
    final_table(b.log, cfg, result, len(b.test_loader.dataset) if hasattr(b.test_loader, "dataset") else None)
    return result


def final_table(log: Log, cfg: dict, r: dict, n_test: int | None) -> None:
    last, b = r["last"], r["best"]
    label = f"{r['role']} {r['model']}" + (f" [{r['distiller']}]" if r["role"] == "student" else "")
    rows = []
    if r["teacher_top1"] is not None:
        rows.append((f"teacher {cfg['teacher']}", f"{r['teacher_top1']:>7.2f} {r['teacher_top5']:>7.2f}"))
    rows.append((f"{label}, last epoch", f"{last['eval_top1']:>7.2f} {last['eval_top5']:>7.2f}"))
    if last.get("ema_top1") is not None:
        rows.append((f"{label}, EMA, last epoch", f"{last['ema_top1']:>7.2f} {last['ema_top5']:>7.2f}"))
    rows.append(("best over epochs of max(raw, EMA): the paper metric",
                 f"{b['top1']:>7.2f}   (epoch {b['epoch']}, {b['which']})"))
    width = max(len(name) for name, _ in rows)
    log("")
    log(f"== result on the {cfg['data']} {eval_split_name(cfg['data'])} split"
        + (f" ({n_test} images)" if n_test else "") + " ==")
    log(f"{'model':<{width}} {'top-1':>7} {'top-5':>7}")
    for name, figures in rows:
        log(f"{name:<{width}} {figures}")
    weights = [f"{r['role']}.safetensors"] + ([f"{r['role']}_ema.safetensors"] if last.get("ema_top1") is not None
                                              else [])
    states = "last.pth, best.pth" if os.path.isfile(os.path.join(r["out"], "best.pth")) else "last.pth"
    log(f"outputs in {r['out']}: {', '.join(weights)} (weights), {states} (training states), summary.csv, "
        "curves.png, log.txt, args.yaml")
