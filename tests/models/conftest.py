"""Shared setup for the model tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread(_small_threads):
    # Small models at 32-64 px gain nothing from a second intra-op thread, and on a busy 2-core machine waking it
    # costs more than it saves. Runs after the top-level conftest's fixture and restores its setting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(before)
