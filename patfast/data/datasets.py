"""Data specs and the image datasets they name: bundled digits, CIFAR-10/100 python pickles, an ImageFolder tree.

A spec string (`digits`, `cifar10:DIR`, `cifar100:DIR`, `imagefolder:DIR`) is parsed by `parse_data_spec` and
loaded once by `load_data` into an `ImageData`: its `train` and `test` splits plus what they share (classes,
per-channel mean/std on the 0-1 scale, native image size). A split holds its images either in memory as uint8
(N, H, W, 3) arrays (`ArrayImages`: digits, CIFAR) or as file paths decoded lazily (`FolderImages`); either way
`split.get(i)` gives sample i as (PIL RGB image, int label). Loader backends and transforms live elsewhere.

ImageFolder files: only the IMAGE_EXTENSIONS are read; other files (.gif, .txt, ...) and files outside the class
folders are skipped, and `ImageData.notes` says how many and which kinds (one line each, for the training log).
Images with an alpha channel or a transparent colour (RGBA, LA, P or RGB with transparency) are composited on a white
background (BACKGROUND) before becoming RGB, so transparent pixels are white whatever colour they store. A warning
PIL gives while decoding a file is re-issued with that file's path in front.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from patfast.errors import UserError

SPEC_FORMS = "digits, cifar10:DIR, cifar100:DIR, imagefolder:DIR"
KINDS = ("digits", "cifar10", "cifar100", "imagefolder")
SPLITS = ("train", "test")
SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test"}

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BACKGROUND = (255, 255, 255)  # what transparent pixels of ImageFolder images become (white)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

Stats = tuple[float, float, float]


def eval_split_name(spec: str) -> str:
    """What the user calls the split a run evaluates on: an ImageFolder's val/, the others' test split."""
    return "val" if str(spec).split(":", 1)[0] == "imagefolder" else "test"


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec: `kind` in KINDS, `root` the directory (None for digits)."""

    kind: str
    root: str | None = None

    def __str__(self) -> str:
        return self.kind if self.root is None else f"{self.kind}:{self.root}"


def parse_data_spec(spec: str | DataSpec) -> DataSpec:
    """`digits` | `cifar10:DIR` | `cifar100:DIR` | `imagefolder:DIR` -> DataSpec; checks that DIR is readable."""
    if isinstance(spec, DataSpec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"expected a data spec string, DataSpec or ImageData, got {type(spec).__name__}")
    if not spec.strip():
        raise UserError(f"empty data spec; expected one of: {SPEC_FORMS}")
    kind, sep, root = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind == "digits" and not sep:
        return DataSpec("digits")
    if kind not in KINDS and os.path.isdir(os.path.expanduser(spec.strip())):
        raise UserError(_bare_directory_hint(spec.strip()))
    if kind in KINDS and kind != "digits" and not root.strip():
        raise UserError(f"data spec '{spec}' needs a directory: {kind}:DIR")
    if kind not in KINDS or kind == "digits":
        raise UserError(f"unknown data spec '{spec}'; expected one of: {SPEC_FORMS}")
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise UserError(f"data spec '{spec}': directory not found: {root}")
    if not os.access(root, os.R_OK | os.X_OK):
        raise UserError(f"data spec '{spec}': directory not readable: {root}")
    return DataSpec(kind, root)


def _bare_directory_hint(path: str) -> str:
    """The one-line error for a data spec that is a bare directory: the spec to type instead."""
    root = os.path.expanduser(path)
    for kind, (sub, train_files, _, _, meta_file, *_) in _CIFAR.items():
        for folder in (root, os.path.join(root, sub)):
            if all(os.path.isfile(os.path.join(folder, f)) for f in (train_files[0], meta_file)):
                return (f"data spec '{path}' is a bare directory, not a spec; it holds "
                        f"{kind.upper().replace('CIFAR', 'CIFAR-')} python batches, so use {kind}:{path}")
    return (f"data spec '{path}' is a bare directory, not a spec; for a tree of images (train/<class>/ and "
            f"val/<class>/ in it) use imagefolder:{path}, for CIFAR python batches cifar10:{path} or "
            f"cifar100:{path}")


class ArrayImages:
    """One split held in memory: `images` uint8 (N, H, W, 3), `labels` int64 (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, classes: list[str], mean: Stats, std: Stats,
                 native_size: int, name: str):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = np.ascontiguousarray(images)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.mean, self.std = tuple(mean), tuple(std)
        self.native_size = native_size
        self.name = name

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, i: int) -> tuple[Image.Image, int]:
        """Sample i as (PIL RGB image, label)."""
        return Image.fromarray(self.images[i]), int(self.labels[i])

    __getitem__ = get

    def __repr__(self) -> str:
        return f"ArrayImages({self.name}, n={len(self)}, classes={self.num_classes}, size={self.native_size})"


class FolderImages:
    """One split as image files decoded on access: `samples` [(path, label)], `labels` int64 (N,)."""

    def __init__(self, samples: list[tuple[str, int]], *, classes: list[str], mean: Stats, std: Stats, name: str):
        self.samples = samples
        self.labels = np.asarray([label for _, label in samples], dtype=np.int64)
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.mean, self.std = tuple(mean), tuple(std)
        self.native_size = None
        self.name = name

    def __len__(self) -> int:
        return len(self.samples)

    def get(self, i: int) -> tuple[Image.Image, int]:
        """Sample i as (PIL RGB image, label), decoded from its file now."""
        path, label = self.samples[i]
        return decode_image(path), label

    __getitem__ = get

    def __repr__(self) -> str:
        return f"FolderImages({self.name}, n={len(self)}, classes={self.num_classes})"


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as an RGB image; one with an alpha channel or a transparent colour is composited on BACKGROUND (white)
    first, instead of keeping whatever colour its transparent pixels store."""
    if img.mode not in _ALPHA_MODES and "transparency" not in img.info:
        return img.convert("RGB")
    rgba = img.convert("RGBA")  # P with per-entry alphas too (PIL warns only when asked for RGB directly)
    return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba).convert("RGB")


def decode_image(path: str) -> Image.Image:
    """The image file at `path` as PIL RGB (see to_rgb); a UserError naming the file when it cannot be decoded, and
    PIL's warnings about it re-issued with its path in front."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with Image.open(path) as img:
                rgb = to_rgb(img)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"cannot decode image {path}: {e}") from None
    for w in caught:
        warnings.warn(f"{path}: {w.message}", w.category, stacklevel=2)
    return rgb


Split = ArrayImages | FolderImages


@dataclass
class ImageData:
    """A loaded data spec: both splits plus what they share."""

    spec: DataSpec
    train: Split
    test: Split
    notes: list[str] = field(default_factory=list)  # one-line remarks for the log, e.g. the files skipped

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def mean(self) -> Stats:
        return self.train.mean

    @property
    def std(self) -> Stats:
        return self.train.std

    @property
    def native_size(self) -> int | None:
        return self.train.native_size

    def split(self, name: str) -> Split:
        """The split called `name`: "train", "test" or "val" (an alias of "test")."""
        key = SPLIT_ALIASES.get(str(name).lower())
        if key is None:
            raise UserError(f"unknown split '{name}' of {self.spec}; expected train, test or val")
        return self.train if key == "train" else self.test


def load_data(spec: str | DataSpec | ImageData) -> ImageData:
    """Load a data spec (string or DataSpec) into an ImageData; an ImageData is returned as is."""
    if isinstance(spec, ImageData):
        return spec
    spec = parse_data_spec(spec)
    if spec.kind == "digits":
        return load_digits()
    if spec.kind in ("cifar10", "cifar100"):
        return load_cifar(spec)
    return load_imagefolder(spec)


# ---------------------------------------------------------------------------------------------------------- digits


def load_digits() -> ImageData:
    """scikit-learn's 1,797 8x8 digits as uint8 RGB, fixed stratified split 1,437 train / 360 test."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    gray = np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
    images = np.repeat(gray[..., None], 3, axis=-1)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    train_px = images[train_idx].reshape(-1, 3).astype(np.float64) / 255.0
    mean = tuple(float(v) for v in train_px.mean(0))
    std = tuple(float(v) for v in train_px.std(0))
    classes = [str(c) for c in bunch.target_names]
    spec = DataSpec("digits")
    common = dict(classes=classes, mean=mean, std=std, native_size=8)
    return ImageData(spec, ArrayImages(images[train_idx], labels[train_idx], name="digits/train", **common),
                     ArrayImages(images[test_idx], labels[test_idx], name="digits/test", **common))


# ----------------------------------------------------------------------------------------------------------- CIFAR

_CIFAR = {
    # kind: (sub-folder, train files, test files, label key, meta file, names key, mean, std)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels",
                "batches.meta", b"label_names", CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", "meta", b"fine_label_names",
                 CIFAR100_MEAN, CIFAR100_STD),
}

# What a CIFAR pickle may reference: numpy arrays and nothing else (no arbitrary code runs on load).
_SAFE_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.startswith("numpy.core."):  # files written by numpy 1.x
            module = "numpy._core." + module[len("numpy.core."):]
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")
        return super().find_class(module, name)


def _read_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # truncated or corrupt files raise EOFError, UnpicklingError, ValueError...
        raise UserError(f"corrupt or truncated CIFAR pickle {path}: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"corrupt CIFAR pickle {path}: expected a dict, got {type(obj).__name__}")
    return obj


def _cifar_folder(spec: DataSpec) -> str:
    sub, train_files, test_files = _CIFAR[spec.kind][:3]
    for folder in (spec.root, os.path.join(spec.root, sub)):
        if os.path.isfile(os.path.join(folder, train_files[0])):
            missing = [f for f in train_files + test_files + [_CIFAR[spec.kind][4]]
                       if not os.path.isfile(os.path.join(folder, f))]
            if missing:
                raise UserError(f"{spec}: {folder} lacks {', '.join(missing)}")
            return folder
    expected = ", ".join(train_files[:1] + test_files)
    raise UserError(f"{spec}: no {spec.kind.upper().replace('CIFAR', 'CIFAR-')} python batches in {spec.root} "
                    f"(expected {expected} ... there or in a {sub} sub-folder)")


def _cifar_batch(path: str, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_pickle(path)
    if b"data" not in batch or label_key not in batch:
        raise UserError(f"corrupt CIFAR pickle {path}: missing key {b'data' if b'data' not in batch else label_key}")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise UserError(f"corrupt CIFAR pickle {path}: data {data.shape} for {len(labels)} labels, "
                        "expected (N, 3072)")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"corrupt CIFAR pickle {path}: labels outside 0..{num_classes - 1}")
    images = data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # -> (N, 32, 32, 3)
    return images, labels


def load_cifar(spec: DataSpec) -> ImageData:
    """CIFAR-10/100 from the python pickle folder (or its parent): (N, 32, 32, 3) uint8 splits."""
    _, train_files, test_files, label_key, meta_file, names_key, mean, std = _CIFAR[spec.kind]
    folder = _cifar_folder(spec)
    meta_path = os.path.join(folder, meta_file)
    meta = _read_pickle(meta_path)
    if names_key not in meta:
        raise UserError(f"corrupt CIFAR meta file {meta_path}: missing key {names_key!r}")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    splits = []
    for name, files in (("train", train_files), ("test", test_files)):
        parts = [_cifar_batch(os.path.join(folder, f), label_key, len(classes)) for f in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        splits.append(ArrayImages(images, labels, classes=classes, mean=mean, std=std, native_size=32,
                                  name=f"{spec.kind}/{name}"))
    return ImageData(spec, *splits)


# ----------------------------------------------------------------------------------------------------- ImageFolder


def _class_dirs(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: str, skipped: list[str]) -> list[str]:
    """The image files under `folder` (sorted, sub-folders included); the other files are appended to `skipped`."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for f in sorted(filenames):
            (found if f.lower().endswith(IMAGE_EXTENSIONS) else skipped).append(os.path.join(dirpath, f))
    return found


def _loose_files(folder: str) -> list[str]:
    """Files directly in train/ or val/, outside any class folder."""
    return sorted(e.path for e in os.scandir(folder) if not e.is_dir())


def _skipped_notes(root: str, skipped: list[str], loose: list[str]) -> list[str]:
    notes = []
    if skipped:
        kinds = Counter(os.path.splitext(p)[1].lower() or "no extension" for p in skipped)
        shown = sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))
        detail = ", ".join(f"{ext}: {n}" for ext, n in shown[:6]) + (", ..." if len(shown) > 6 else "")
        notes.append(f"imagefolder: skipped {len(skipped)} file{'s' if len(skipped) > 1 else ''} that "
                     f"{'are' if len(skipped) > 1 else 'is'} not images ({detail}; e.g. "
                     f"{os.path.relpath(skipped[0], root)}); only {', '.join(IMAGE_EXTENSIONS)} files are read")
    if loose:
        notes.append(f"imagefolder: skipped {len(loose)} file{'s' if len(loose) > 1 else ''} outside the class "
                     f"folders (e.g. {os.path.relpath(loose[0], root)}); images go in train/<class>/ and "
                     "val/<class>/")
    return notes


def load_imagefolder(spec: DataSpec) -> ImageData:
    """DIR/train/<class>/*.png and DIR/val/<class>/*.png (classes from train/); images decoded lazily.

    Files of other extensions and files outside the class folders are skipped, and counted in the `notes`."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    dirs = {s: os.path.join(spec.root, s) for s in ("train", "val")}
    for sub, folder in dirs.items():
        if not os.path.isdir(folder):
            raise UserError(f"{spec}: missing {sub}/ folder {folder} (expected {sub}/<class>/<image files>)")
    classes = _class_dirs(dirs["train"])
    if not classes:
        raise UserError(f"{spec}: no class sub-folders in {dirs['train']}")
    val_classes = _class_dirs(dirs["val"])
    if val_classes != classes:
        extra, lacking = sorted(set(val_classes) - set(classes)), sorted(set(classes) - set(val_classes))
        detail = "; ".join(s for s in (f"not in train/: {', '.join(extra[:5])}" if extra else "",
                                       f"missing from val/: {', '.join(lacking[:5])}" if lacking else "") if s)
        raise UserError(f"{spec}: val/ classes differ from train/ classes ({detail})")
    splits, skipped = [], []
    for sub, name in (("train", "train"), ("val", "test")):
        samples, empty = [], []
        for label, cls in enumerate(classes):
            files = _image_files(os.path.join(dirs[sub], cls), skipped)
            if not files and sub == "train":
                empty.append(cls)
            samples += [(path, label) for path in files]
        if empty:
            raise UserError(f"{spec}: no images ({', '.join(IMAGE_EXTENSIONS)}) in train/ classes "
                            f"{', '.join(empty[:5])}")
        if not samples:
            raise UserError(f"{spec}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {dirs[sub]}")
        splits.append(FolderImages(samples, classes=classes, mean=tuple(IMAGENET_DEFAULT_MEAN),
                                   std=tuple(IMAGENET_DEFAULT_STD), name=f"imagefolder/{name}"))
    loose = _loose_files(dirs["train"]) + _loose_files(dirs["val"])
    return ImageData(spec, *splits, notes=_skipped_notes(spec.root, skipped, loose))
