"""The bundled-data teacher: trained once by `patfast train` when no --teacher-checkpoint is given, then cached."""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import signal
from collections.abc import Callable
from contextlib import contextmanager

from patfast.errors import TrainingStopped, UserError
from patfast.train import checkpoint as ckpt
from patfast.train.config import data_kind, resolve
from patfast.train.report import Log

BUNDLED = ("digits",)
KEYS = ("data", "teacher", "img_size", "batch_size", "seed", "device", "amp", "data_backend", "workers",
        "deterministic", "progress")


def cache_root() -> str:
    root = os.environ.get("PATFAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "patfast")
    return os.path.join(root, "teachers")


def teacher_checkpoint(cfg: dict, log: Log, train: Callable[[dict, str], dict], out: str | None = None) -> str:
    """Path of a teacher for `cfg`: cached, or trained now with `patfast teacher` settings (bundled data only) by
    `train(teacher_cfg, "teacher")` (the loop's run: passed in, so that this module does not import the loop). A
    teacher stopped part-way (Ctrl-C) continues from its checkpoint next time. out: the student run's directory."""
    if data_kind(cfg["data"]) not in BUNDLED:
        raise UserError(f"--teacher-checkpoint is required with --data {cfg['data']} (train one with "
                        f"`patfast teacher --data {cfg['data']} --teacher {cfg['teacher']}`)")
    from patfast import __version__

    ident = {k: cfg[k] for k in ("data", "teacher", "img_size", "seed")}
    ident.update(epochs=cfg["teacher_epochs"], version=__version__)
    key = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    folder = os.path.join(cache_root(), f"{cfg['teacher']}-{cfg['data']}-{key}")
    path = os.path.join(folder, "teacher.safetensors")
    if os.path.isfile(path):
        log(f"teacher: using the cached {cfg['teacher']} trained on {cfg['data']} ({path})")
        return path
    with _only_writer(folder + ".lock", log):  # two runs started together: one trains, the other waits for it
        if os.path.isfile(path):
            log(f"teacher: using the {cfg['teacher']} another run has just trained and cached ({path})")
            return path
        log(f"no --teacher-checkpoint: training a {cfg['teacher']} teacher on {cfg['data']} for "
            f"{cfg['teacher_epochs']} epochs first (cached in {folder} for the next runs)")
        partial = folder + ".partial"
        ns = argparse.Namespace(**{k: cfg[k] for k in KEYS}, epochs=cfg["teacher_epochs"], out=partial)
        tcfg = resolve(ns, "teacher")
        if _can_continue(partial, tcfg, log):
            tcfg["resume"] = partial
        else:
            shutil.rmtree(partial, ignore_errors=True)
        rng = ckpt.rng_state()  # the student run goes on as if the teacher had been cached: same figures either way
        try:
            train(tcfg, "teacher")
        except TrainingStopped as e:
            if e.status < 128:
                raise
            again = f"run the same command again{f' (or --resume {out})' if out else ''}"
            raise TrainingStopped(f"stopped by {signal.Signals(e.status - 128).name} while training the teacher: its "
                                  f"checkpoint is {os.path.join(partial, 'last.pth')}; {again} and the teacher "
                                  "continues from it", e.status) from None
        finally:
            ckpt.set_rng_state(rng)
        os.replace(partial, folder)  # only a finished teacher is ever found in the cache
    log(f"teacher: trained and cached at {path}")
    log("")
    return path


def _can_continue(partial: str, tcfg: dict, log: Log) -> bool:
    """Whether a teacher stopped part-way in `partial` can be continued with `tcfg` (the same settings)."""
    last = os.path.join(partial, "last.pth")
    if not os.path.isfile(last):
        return False
    try:
        saved = ckpt.read_config(last)
        ckpt.check_compatible({k: v for k, v in saved.items() if k != "command"}, tcfg, last, False)
    except UserError as e:
        log(f"teacher: the stopped teacher in {partial} cannot be continued ({e}); training it again")
        return False
    log(f"teacher: continuing the teacher stopped in {partial}")
    return True


@contextmanager
def _only_writer(lock_path: str, log: Log):
    """An exclusive lock on `lock_path` (flock: released by the kernel when the holder dies, so a killed run never
    leaves the cache locked); says so when it has to wait."""
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"teacher: another run is training this teacher ({lock_path} is locked); waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
