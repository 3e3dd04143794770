"""The frozen teacher: input re-normalisation, a clean forward (no graph) and a prompted forward (with graph)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from patfast.models.stages import StageTaps


class Teacher(nn.Module):
    """A frozen timm model with stage taps.

    Inputs arrive normalised with the student's (data) mean/std; when the teacher was trained with another mean/std
    they are re-normalised first: x_t = (x * std_s + mean_s - mean_t) / std_t.
    The wrapped model stays in eval mode whatever `.train()` says (SPEC section 4); `model_mode(True)` exists only for
    the official variant's first-batch bug.
    """

    def __init__(self, model: nn.Module, taps: StageTaps, *, mean: Sequence[float], std: Sequence[float],
                 data_mean: Sequence[float], data_std: Sequence[float]):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.taps = taps
        cpu = torch.device("cpu")  # 3 numbers decided here, on the CPU even where the model is built elsewhere (meta)
        std_t, mean_t = torch.tensor(std, device=cpu), torch.tensor(mean, device=cpu)
        scale = torch.tensor(data_std, device=cpu) / std_t
        shift = (torch.tensor(data_mean, device=cpu) - mean_t) / std_t
        self.renormalise = not (torch.allclose(scale, torch.ones(3, device=cpu))
                                and torch.allclose(shift, torch.zeros(3, device=cpu)))
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        self.training = mode
        return self  # the teacher itself stays in eval mode

    def model_mode(self, train: bool) -> None:
        self.model.train(train)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift if self.renormalise else x

    @torch.no_grad()
    def clean(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) of the teacher without prompts; builds no graph."""
        self.taps.prompting = False
        logits = self.model(self._input(x))
        self.taps.clear()  # its stage features are not used: let them go now
        return logits

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (B, K) and the 4 canonical stage features of the clean forward (no prompts); builds no graph."""
        self.taps.prompting = False
        logits = self.model(self._input(x))
        return logits, self.taps.features()

    def prompted(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (B, K) and the 4 canonical stage features of the forward with the prompts inserted.

        Teacher weights are frozen, but the graph is kept so that gradients reach the prompt blocks.
        """
        self.taps.prompting = True
        try:
            logits = self.model(self._input(x))
        finally:
            self.taps.prompting = False
        return logits, self.taps.features()
