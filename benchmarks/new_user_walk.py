"""The new user's walk (issue 16's done-means), in a fresh clone: the demo stopped by Ctrl-C and resumed with
`--resume D` alone, extended with `--epochs`, its args.yaml reused, Ctrl-C during the demo's teacher phase, and two
demos started together on one teacher cache. Prints what each command printed (its last lines) and its exit status.

    python benchmarks/new_user_walk.py OUT [1,2,3]   (the parts to walk; short runs: --teacher-epochs 2 --epochs 2;
                                                      about 8 minutes on 2 cores)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

SHORT = ["--teacher-epochs", "2", "--no-progress"]


def start(argv, cwd, cache):
    env = dict(os.environ, PATFAST_CACHE=cache)
    print(f"\n$ patfast {' '.join(argv)}", flush=True)
    # a session of its own, as a shell job is: Ctrl-C is SIGINT to the whole process group
    return subprocess.Popen([sys.executable, "-m", "patfast", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc, lines=6):
    out, _ = proc.communicate(timeout=1800)
    for line in out.strip().splitlines()[-lines:]:
        print(f"  | {line}")
    print(f"  exit status {proc.returncode}", flush=True)
    return out


def ctrl_c_when(proc, path, text, timeout=900):
    deadline = time.time() + timeout
    while not (os.path.isfile(path) and text in open(path).read()):
        if proc.poll() is not None or time.time() > deadline:
            return
        time.sleep(0.5)
    time.sleep(3)
    print(f"  (Ctrl-C: SIGINT to the process group, after '{text}' appeared in {os.path.basename(path)})")
    os.killpg(proc.pid, signal.SIGINT)


def _partial(teachers: str) -> str | None:
    """The teacher being trained in the cache (its .partial folder), if there is one yet."""
    names = os.listdir(teachers) if os.path.isdir(teachers) else []
    return next((os.path.join(teachers, n) for n in names if n.endswith(".partial")), None)


def main(out: str, steps: set[int]) -> None:
    os.makedirs(out, exist_ok=True)
    out = os.path.abspath(out)
    cache = os.path.join(out, "cache")
    d = os.path.join(out, "D")
    if 1 in steps:  # the demo, stopped in its student phase; --resume D alone; --epochs extends it; its args.yaml
        _resume_walk(out, cache, d)
    if 2 in steps:
        _teacher_phase_walk(out)
    if 3 in steps:
        _two_demos_walk(out)


def _resume_walk(out, cache, d):
    p = start(["train", "--epochs", "2", "--out", d, *SHORT], out, cache)
    ctrl_c_when(p, os.path.join(d, "log.txt"), "step: ")
    finish(p, 3)
    finish(start(["train", "--resume", d], out, cache))
    finish(start(["train", "--resume", d, "--epochs", "3"], out, cache), 12)
    finish(start(["train", "--config", os.path.join(d, "args.yaml"), "--out", os.path.join(out, "D2"), "--epochs",
                  "1"], out, cache), 3)


def _teacher_phase_walk(out):
    """Ctrl-C while the demo trains its teacher (a new cache: no teacher yet); then --resume."""
    cache2, e = os.path.join(out, "cache2"), os.path.join(out, "E")
    p = start(["train", "--epochs", "1", "--out", e, *SHORT], out, cache2)
    deadline = time.time() + 300
    while not (partial := _partial(os.path.join(cache2, "teachers"))) and time.time() < deadline:
        time.sleep(0.5)
    ctrl_c_when(p, os.path.join(partial, "log.txt"), "step: ")
    finish(p, 3)
    finish(start(["train", "--resume", e], out, cache2), 4)


def _two_demos_walk(out):
    """Two demos started together on one (empty) teacher cache."""
    cache3 = os.path.join(out, "cache3")
    a = start(["train", "--epochs", "1", "--out", os.path.join(out, "A"), *SHORT], out, cache3)
    time.sleep(3)
    b = start(["train", "--epochs", "1", "--out", os.path.join(out, "B"), *SHORT], out, cache3)
    text_a, text_b = finish(a, 2), finish(b, 2)
    for name, text in (("A", text_a), ("B", text_b)):
        said = [line for line in text.splitlines() if line.startswith("teacher:")]
        print(f"  {name}'s teacher lines: {said}")
    print(f"\nteacher cache after both: {sorted(os.listdir(os.path.join(cache3, 'teachers')))}")


if __name__ == "__main__":
    main(sys.argv[1], {int(n) for n in (sys.argv[2] if len(sys.argv) > 2 else "1,2,3").split(",")})
