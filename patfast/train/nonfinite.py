"""The loop's count of skipped (non-finite) steps, kept on the device and read every few steps.

TrainStep decides a skip on the device (its `bad` flag); reading that flag after every step would make the host wait
for the GPU each step. The tally lives in device tensors instead, and `read()` — one small copy — runs at the
progress-bar cadence, before a checkpoint and at the end of an epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

READ_EVERY = 10  # steps between two reads of the tally (the progress bar's cadence)


@dataclass(frozen=True)
class Tally:
    skipped: int  # skipped steps since the epoch began
    run: int  # consecutive skipped steps up to now (0 after a good step)
    stop_step: int  # the step at which a run first reached the patience, or -1
    terms: tuple[str, ...]  # the non-finite terms of the last skipped step


class NonFiniteTally:
    """Device tensors: skipped steps, the current run of them, the step where a run reached `patience`, and which
    loss terms were non-finite at the last skipped step. `record` never reads the device; `read` does, once."""

    def __init__(self, terms: list[str], patience: int, device: torch.device):
        self.terms, self.patience = list(terms), patience
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.run = torch.zeros((), dtype=torch.int64, device=device)
        self.stop_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_terms = torch.zeros(len(terms), dtype=torch.bool, device=device)

    def reset_epoch(self, skipped: int = 0) -> None:
        self.skipped.fill_(skipped)

    def record(self, bad: torch.Tensor, losses: dict[str, torch.Tensor], step: int) -> None:
        """One step: `bad` its 0-d bool skip flag, `losses` its terms, `step` its 1-based global number."""
        self.skipped += bad
        self.run = torch.where(bad, self.run + 1, 0)
        reached = (self.run >= self.patience) & (self.stop_step < 0)
        self.stop_step = torch.where(reached, step, self.stop_step)
        finite = torch.stack([torch.isfinite(losses[t].detach()).all() for t in self.terms])
        self.bad_terms = torch.where(bad, ~finite, self.bad_terms)

    def read(self) -> Tally:
        values = torch.cat([torch.stack([self.skipped, self.run, self.stop_step]), self.bad_terms.long()]).tolist()
        terms = tuple(t for t, flag in zip(self.terms, values[3:]) if flag)
        return Tally(skipped=values[0], run=values[1], stop_step=values[2], terms=terms)
