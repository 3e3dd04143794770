"""Datasets (bundled digits, CIFAR pickles, ImageFolder), their transforms, batch mixup, and `make_loader`."""

from patfast.data.datasets import (
    ArrayImages,
    DataSpec,
    FolderImages,
    ImageData,
    load_data,
    parse_data_spec,
)
from patfast.data.loader import BACKENDS, make_loader
from patfast.data.mixup import BatchMixup, make_mixup
from patfast.data.torch_loader import TorchLoader
from patfast.data.transforms import build_transform

__all__ = [
    "BACKENDS",
    "ArrayImages",
    "BatchMixup",
    "DataSpec",
    "FolderImages",
    "ImageData",
    "TorchLoader",
    "build_transform",
    "load_data",
    "make_loader",
    "make_mixup",
    "parse_data_spec",
]
