"""Which code made a figure: the commit (and whether the tree had uncommitted changes), the date, the versions and
the CPU threads. Every results folder whose figures the README quotes records this line (`made_by()`)."""

from __future__ import annotations

import os
import subprocess
import time


def commit(repo: str | None = None) -> str:
    """The short commit of the patfast checkout in use, with '+changes' when its tree differs from it."""
    repo = repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return head + ("+changes" if dirty else "")


def made_by(repo: str | None = None) -> str:
    import torch

    import patfast

    return (f"made by patfast commit {commit(repo)} on {time.strftime('%Y-%m-%d')} (patfast {patfast.__version__}, "
            f"torch {torch.__version__}, {os.cpu_count()} CPU cores)")


if __name__ == "__main__":
    print(made_by())
