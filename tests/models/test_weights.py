"""Weights files written by save_weights: readable back, with the permissions a plain open() gives."""

import os
import stat

import pytest
import torch
from torch import nn

from patfast.models.weights import load_weights, save_weights


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_weights_get_the_mode_open_gives(tmp_path, umask):
    model = nn.Linear(3, 2)
    path = str(tmp_path / "w.safetensors")
    old = os.umask(umask)
    try:
        save_weights(model, path, {"model": "linear"})
        with open(tmp_path / "plain.txt", "w"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # 0644 under the usual umask 022
    assert stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode) == 0o666 & ~umask
    assert sorted(os.listdir(tmp_path)) == ["plain.txt", "w.safetensors"]  # no .tmp left behind
    other = nn.Linear(3, 2)
    assert load_weights(other, path) == {"model": "linear"}
    assert torch.equal(other.weight, model.weight)
