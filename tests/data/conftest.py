"""Tiny fake datasets on disk, in the real formats: CIFAR python pickles and an ImageFolder tree of PNGs."""

import os
import pickle

import numpy as np
import pytest
from PIL import Image


def cifar_rows(n: int, start: int) -> np.ndarray:
    """(n, 3072) uint8 rows in CIFAR layout (R plane, G plane, B plane); image k has R=k, G=100+k, B=200+k."""
    rows = np.empty((n, 3, 1024), np.uint8)
    for k in range(n):
        rows[k] = np.array([start + k, 100 + start + k, 200 + start + k], np.uint8)[:, None]
    return rows.reshape(n, 3072)


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the released files are Python 2 pickles (protocol 2)


def write_cifar10(folder, per_batch=3, n_test=4):
    """cifar-10-batches-py layout: data_batch_1..5, test_batch, batches.meta."""
    os.makedirs(folder, exist_ok=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump(os.path.join(folder, "batches.meta"),
          {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072})
    for b in range(5):
        start = b * per_batch
        _dump(os.path.join(folder, f"data_batch_{b + 1}"),
              {b"batch_label": b"training batch", b"labels": [(start + k) % 10 for k in range(per_batch)],
               b"data": cifar_rows(per_batch, start), b"filenames": [b"x.png"] * per_batch})
    _dump(os.path.join(folder, "test_batch"),
          {b"batch_label": b"testing batch", b"labels": [9 - k for k in range(n_test)],
           b"data": cifar_rows(n_test, 50), b"filenames": [b"x.png"] * n_test})
    return folder


def write_cifar100(folder, n_train=6, n_test=4):
    """cifar-100-python layout: train, test, meta (fine and coarse labels)."""
    os.makedirs(folder, exist_ok=True)
    fine = [f"class{i:02d}".encode() for i in range(100)]
    _dump(os.path.join(folder, "meta"),
          {b"fine_label_names": fine, b"coarse_label_names": [f"super{i}".encode() for i in range(20)]})
    for name, n, start, labels in (("train", n_train, 0, [99 - k for k in range(n_train)]),
                                   ("test", n_test, 50, [k * 7 for k in range(n_test)])):
        _dump(os.path.join(folder, name),
              {b"filenames": [b"x.png"] * n, b"batch_label": name.encode(), b"fine_labels": labels,
               b"coarse_labels": [k % 20 for k in range(n)], b"data": cifar_rows(n, start)})
    return folder


def write_imagefolder(root, classes=("cat", "dog", "emu"), n_train=3, n_val=2, size=(12, 10)):
    """root/train/<class>/*.png and root/val/<class>/*.png; class c images are filled with value 40 * (c + 1)."""
    for sub, n in (("train", n_train), ("val", n_val)):
        for c, cls in enumerate(classes):
            os.makedirs(os.path.join(root, sub, cls), exist_ok=True)
            for k in range(n):
                Image.new("RGB", size, (40 * (c + 1), k, 0)).save(os.path.join(root, sub, cls, f"{k}.png"))
    return root


@pytest.fixture
def cifar10_dir(tmp_path):
    return write_cifar10(tmp_path / "cifar-10-batches-py")


@pytest.fixture
def cifar100_dir(tmp_path):
    return write_cifar100(tmp_path / "cifar-100-python")


@pytest.fixture
def folder_dir(tmp_path):
    return write_imagefolder(tmp_path / "images")
