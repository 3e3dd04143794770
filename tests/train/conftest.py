"""A small teacher checkpoint for the subprocess runs (resume, torchrun): random weights, no training needed."""

import pytest
import torch

from patfast.models.create import create_model, save_weights


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    torch.manual_seed(0)
    save_weights(create_model("convnext_atto", 10, 32), str(path), {"model": "convnext_atto", "num_classes": 10,
                                                                    "img_size": 32})
    return str(path)
