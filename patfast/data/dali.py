"""The "dali" loader backend: NVIDIA DALI pipelines decode, crop, flip, RandAugment and normalise each batch.

Order: the samples and their order come from `ShardedSampler`, as for every backend (the same samples in the same
order for a (seed, epoch); each once per epoch; train drops the last partial batch, eval keeps it, in order). An
ImageFolder is read by `fn.readers.file` from the epoch's file list in sampler order (`random_shuffle=False`, one
shard: the sampler has already sharded), one pipeline built per epoch; an in-memory split (digits, CIFAR) is fed by
`fn.external_source` from one pipeline kept across epochs (reset between them; rebuilt after a partial epoch).

Randomness: every random number of a training sample (crop, flip, RandAugment's choices) is drawn in Python from a
counter-based hash of the sample's seed `_mix(seed, epoch, index)` (the seed the torch backend uses too) and fed to
the pipeline by `fn.external_source`; the DALI operators themselves are deterministic given those draws (the
pipeline seed, `_mix(seed, epoch it was built for, rank, ...)`, drives nothing). So a sample's augmentation
depends only on (seed, epoch, sample index): not on the batch size, rank, number of threads or prefetching, and
`set_epoch(e)` replays epoch e exactly. The draws differ from the torch backend's (another generator), so the
images differ in detail.

Train (mirrors transforms.py, timm's train transform): random-resized-crop box computed in-graph from the image
size with timm/torchvision's algorithm (area fraction uniform in `crop_scale`, log-uniform aspect ratio in
(3/4, 4/3), 10 attempts, then the centre-crop fallback), `fn.slice` to the box, `fn.resize` to img_size x img_size
(bilinear, antialiased when downscaling as PIL does, rounded to uint8 as PIL does), horizontal flip with probability
`hflip`, optional RandAugment (`_rand_augment`), then `fn.crop_mirror_normalize` to float32 CHW normalised with the
split's mean/std. Eval: resize the shorter side to int(img_size / crop_pct) (the longer one truncated as torchvision
does), centre crop img_size (torchvision's rounding), normalise. Random erasing and mixup are applied by the caller
on the batch tensors. Images are decoded as stored (no EXIF rotation), as PIL does for the torch backend.
For the same crop box the pixels match the torch backend's (PIL's) within one uint8 level, except when downscaling
on the outermost output row/column, where PIL renormalises its filter cut by the crop edge and DALI repeats the edge
pixel (up to ~1/8 of the local contrast there; tests/data/test_dali.py measures it).

Devices: on the CPU the pipeline is CPU-only (`device_id=None`); on CUDA files are decoded by the "mixed" (nvJPEG)
decoder and the augmentation runs on the GPU (`device_id` = the device's index). The CUDA path is written to the
same graph but has not been run on a GPU yet.

DALI is imported lazily: importing patfast never needs it; `DaliLoader` raises a UserError when it is missing.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from patfast.data.batch_augment import RAND_OPS, RandAugmentSpec, parse_rand_augment
from patfast.data.datasets import ArrayImages, FolderImages, Split
from patfast.data.sampling import EpochLoader, ShardedSampler, _mix
from patfast.data.transforms import RATIO, check_augment_args
from patfast.errors import UserError

DALI_MISSING = "the dali data backend needs NVIDIA DALI: pip install 'patfast[dali]'"
CROP_ATTEMPTS = 10  # random-resized-crop tries before its centre-crop fallback (timm, torchvision)
BINS_PER_LEVEL = 10  # RandAugment magnitudes are quantised to 1/10 of timm's magnitude unit
TRANSLATE_PCT = 0.45  # timm's RandAugment translation: up to 45 % of the image side at magnitude 10
_PREFETCH = 2  # DALI's prefetch queue depth


@functools.cache
def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def _import_dali():
    """(fn, types, math) of nvidia.dali, or a UserError when DALI is missing."""
    if not dali_available():
        raise UserError(DALI_MISSING)
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    return fn, types, dmath


@contextlib.contextmanager
def quiet_dali_aliases():
    """Drop DALI's warnings about its deprecated fn.experimental aliases (its own augmentations still call them and
    DALI forces those warnings on); other warnings raised inside are passed on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if "nvidia.dali.fn.experimental" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


# ------------------------------------------------------------------------------------------------------ RandAugment


def _num_bins(spec: RandAugmentSpec) -> int:
    """DALI magnitude bins of a RandAugment spec: levels 0, 0.1, ..., magnitude_max on timm's magnitude scale."""
    return int(round(spec.magnitude_max * BINS_PER_LEVEL)) + 1


def _rand_augment_suite(spec: RandAugmentSpec) -> list:
    """timm's RandAugment ops as DALI augmentations whose magnitude bins hold timm's exact parameters, + identity.

    Bin b stands for timm magnitude level b / BINS_PER_LEVEL; each op's parameter is timm's level_to_arg formula
    at that level (signs: DALI negates the magnitude for ops timm negates at random). Build it outside the pipeline
    definition: the ops are marked do_not_convert (they hold no conditionals; AutoGraph-converting their parameter
    tables would take seconds per pipeline).
    """
    from nvidia.dali.auto_aug import augmentations as aug
    from nvidia.dali.pipeline import do_not_convert

    levels = np.arange(_num_bins(spec), dtype=np.float64) / BINS_PER_LEVEL
    inc = spec.increasing

    def scaled(op, to_param, negate=False):
        return op.augmentation(mag_range=levels, randomly_negate=negate, mag_to_param=to_param)

    def factor(level):  # timm's _enhance_level_to_arg / _enhance_increasing_level_to_arg (signed level)
        return np.float32(max(0.1, 1.0 + (level / 10) * 0.9) if inc else (level / 10) * 1.8 + 0.1)

    def posterize_mask(level):  # PIL posterize(bits): keep the top `bits` bits (0 bits: black, as PIL)
        bits = int((level / 10) * 4)
        bits = min(8, max(0, 4 - bits if inc else bits))
        return np.uint8(0xFF ^ ((1 << (8 - bits)) - 1))

    def solarize_threshold(level):
        threshold = min(256, int((level / 10) * 256))
        return np.float32(256 - threshold if inc else threshold)

    suite = {
        "AutoContrast": aug.auto_contrast,
        "Equalize": aug.equalize,
        "Invert": aug.invert,
        "Rotate": scaled(aug.rotate, lambda v: np.float32((v / 10) * 30.0), negate=True),
        "Posterize": scaled(aug.posterize, posterize_mask),
        "Solarize": scaled(aug.solarize, solarize_threshold),
        "SolarizeAdd": scaled(aug.solarize_add, lambda v: np.uint8(min(128, int((v / 10) * 110)))),
        "Color": scaled(aug.color, factor, negate=inc),
        "Contrast": scaled(aug.contrast, factor, negate=inc),
        "Brightness": scaled(aug.brightness, factor, negate=inc),
        "Sharpness": scaled(aug.sharpness, lambda v: aug.sharpness_kernel(float(factor(v)) - 1.0), negate=inc),
        "ShearX": scaled(aug.shear_x, lambda v: np.array([(v / 10) * 0.3, 0.0], np.float32), negate=True),
        "ShearY": scaled(aug.shear_y, lambda v: np.array([0.0, (v / 10) * 0.3], np.float32), negate=True),
        "TranslateXRel": scaled(aug.translate_x, lambda v: np.array([(v / 10) * TRANSLATE_PCT, 0.0], np.float32),
                                negate=True),
        "TranslateYRel": scaled(aug.translate_y, lambda v: np.array([0.0, (v / 10) * TRANSLATE_PCT], np.float32),
                                negate=True),
    }
    return [do_not_convert(op.__call__) for op in [suite[name] for name in RAND_OPS] + [aug.identity]]


def _rand_augment(images, params, suite: list, spec: RandAugmentSpec, img_size: int, fill: int):
    """RandAugment on uint8 HWC `images` (img_size x img_size) with `_rand_augment_suite(spec)`: layer k applies
    op params[k, 0] (len(RAND_OPS): identity, i.e. skipped) at magnitude bin params[k, 1] with sign params[k, 2].
    DALI's `select` splits the batch among the ops: the pipeline needs enable_conditionals."""
    _, types, _ = _import_dali()
    from nvidia.dali.auto_aug.core import select, signed_bin

    for k in range(spec.num_layers):
        magnitude = signed_bin(params[k, 1], random_sign=params[k, 2])
        images = select(suite, params[k, 0], images, magnitude_bin=magnitude, num_magnitude_bins=_num_bins(spec),
                        shape=(img_size, img_size), fill_value=fill, interp_type=types.INTERP_LINEAR)
    return images


# ------------------------------------------------------------------------------------------------- random draws


def _uniforms(seeds: np.ndarray, count: int) -> np.ndarray:
    """(B, count) float64 uniforms in [0, 1): outputs 1..count of splitmix64 started at each 64-bit seed."""
    with np.errstate(over="ignore"):
        z = seeds.astype(np.uint64)[:, None] + (np.arange(1, count + 1, dtype=np.uint64)
                                                * np.uint64(0x9E3779B97F4A7C15))[None]
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def crop_flip_draws(seeds: np.ndarray, crop_scale: Sequence[float], hflip: float,
                    ratio: Sequence[float] = RATIO) -> np.ndarray:
    """(B, 2 * CROP_ATTEMPTS + 3) float64 per sample: area fractions (uniform in crop_scale) and aspect ratios
    (log-uniform in ratio) of the crop attempts, the uniforms placing the crop (top, left), and the flip (0/1)."""
    a = CROP_ATTEMPTS
    u = _uniforms(seeds, 2 * a + 3)
    lo, hi = crop_scale
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    area = lo + (hi - lo) * u[:, :a]
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, a:2 * a])
    flip = (u[:, 2 * a + 2:] < hflip).astype(np.float64)
    return np.concatenate([area, aspect, u[:, 2 * a:2 * a + 2], flip], axis=1)


def rand_augment_draws(seeds: np.ndarray, spec: RandAugmentSpec) -> np.ndarray:
    """(B, num_layers, 3) int32 per sample and layer: op index (len(RAND_OPS): skipped), magnitude bin, sign (1 =
    negate). As timm: op uniform over the list (with replacement), applied with probability `prob`, magnitude m,
    or gauss(m, mstd), or uniform(0, m) for mstd = inf, clipped to [0, mmax]; quantised to 1/BINS_PER_LEVEL.
    """
    n = spec.num_layers
    u = _uniforms(seeds ^ np.uint64(0x5A17_DA11_0000_0001), 5 * n).reshape(len(seeds), n, 5)
    num_ops = len(RAND_OPS)
    op = np.minimum((u[..., 0] * num_ops).astype(np.int64), num_ops - 1)
    op = np.where(u[..., 1] <= spec.prob, op, num_ops)
    if spec.magnitude_std == math.inf:
        magnitude = u[..., 2] * spec.magnitude
    elif spec.magnitude_std > 0:  # Box-Muller
        gauss = np.sqrt(-2.0 * np.log1p(-u[..., 2])) * np.cos(2.0 * math.pi * u[..., 3])
        magnitude = spec.magnitude + spec.magnitude_std * gauss
    else:
        magnitude = np.full(u.shape[:2], spec.magnitude)
    bins = np.rint(np.clip(magnitude, 0.0, spec.magnitude_max) * BINS_PER_LEVEL)
    sign = u[..., 4] < 0.5
    return np.stack([op, bins, sign], axis=-1).astype(np.int32)


# ------------------------------------------------------------------------------------------- pipeline pieces


def _random_crop_box(shape_hw, draws, ratio: Sequence[float] = RATIO):
    """timm/torchvision RandomResizedCrop.get_params in DALI arithmetic: (anchor [top, left], shape [h, w]) int32.

    shape_hw: the image's (H, W, ...) int shape; draws: a sample's row of `crop_flip_draws`.
    """
    fn, types, dmath = _import_dali()
    a = CROP_ATTEMPTS
    size = fn.cast(shape_hw, dtype=types.FLOAT64)
    height, width = size[0], size[1]
    target_area = height * width * draws[0:a]
    aspect = draws[a:2 * a]
    w = dmath.floor(dmath.sqrt(target_area * aspect) + 0.5)  # int(round(.)): ties have probability zero
    h = dmath.floor(dmath.sqrt(target_area / aspect) + 0.5)
    fits = (w <= width) & (h <= height) & (w >= 1) & (h >= 1)
    # the first attempt that fits: the largest of fits * (a, a - 1, ..., 1) marks it (0: none fits)
    first = fn.reductions.max(fn.cast(fits, dtype=types.INT32) * types.Constant(np.arange(a, 0, -1, dtype=np.int32)))
    found = fn.cast(first > 0, dtype=types.FLOAT64)
    k = dmath.min(a - first, a - 1)
    h_try, w_try = h[k], w[k]
    top_try = dmath.floor(draws[2 * a] * (height - h_try + 1))
    left_try = dmath.floor(draws[2 * a + 1] * (width - w_try + 1))
    # fallback: the whole image, cut to the nearest allowed aspect ratio, centred
    in_ratio = width / height
    narrow = fn.cast(in_ratio < ratio[0], dtype=types.FLOAT64)
    wide = fn.cast(in_ratio > ratio[1], dtype=types.FLOAT64)
    h_fall = height + narrow * (dmath.floor(width / ratio[0] + 0.5) - height)
    w_fall = width + wide * (dmath.floor(height * ratio[1] + 0.5) - width)
    top_fall = dmath.floor((height - h_fall) / 2)
    left_fall = dmath.floor((width - w_fall) / 2)
    keep = 1.0 - found
    anchor = fn.stack(found * top_try + keep * top_fall, found * left_try + keep * left_fall)
    shape = fn.stack(found * h_try + keep * h_fall, found * w_try + keep * w_fall)
    return fn.cast(anchor, dtype=types.INT32), fn.cast(shape, dtype=types.INT32)


def _eval_geometry(shape_hw, img_size: int, crop_pct: float):
    """torchvision Resize(int(img_size / crop_pct)) + CenterCrop(img_size) sizes in DALI integer arithmetic:
    (resized [h, w] float32, crop anchor [top, left] int32)."""
    fn, types, dmath = _import_dali()
    scale = math.floor(img_size / crop_pct)
    hw = fn.cast(shape_hw, dtype=types.INT32)
    height, width = hw[0], hw[1]
    long_side = scale * dmath.max(height, width) // dmath.min(height, width)  # int(scale * long / short)
    tall = fn.cast(height > width, dtype=types.INT32)
    new_h = scale + tall * (long_side - scale)
    new_w = long_side + tall * (scale - long_side)

    def centre(extent):  # int(round((extent - img_size) / 2)), Python's round half to even
        d = extent - img_size
        q = d // 2
        return q + (d - 2 * q) * (q - 2 * (q // 2))

    resized = fn.cast(fn.stack(new_h, new_w), dtype=types.FLOAT)
    return resized, fn.cast(fn.stack(centre(new_h), centre(new_w)), dtype=types.INT32)


def _crop_resize(images, anchor, shape, size):
    """Crop [top, left, h, w] then resize to size (bilinear, antialiased when downscaling; uint8 as PIL rounds)."""
    fn, types, _ = _import_dali()
    crop = fn.slice(images, start=anchor, shape=shape, axes=[0, 1])
    return fn.resize(crop, size=size, antialias=True, interp_type=types.INTERP_LINEAR)


def _normalize(images, mean: Sequence[float], std: Sequence[float], mirror=None):
    """uint8 HWC -> float32 CHW (x / 255 - mean) / std, optionally mirrored (a per-sample 0/1)."""
    fn, types, _ = _import_dali()
    return fn.crop_mirror_normalize(images, mirror=0 if mirror is None else mirror, dtype=types.FLOAT,
                                    output_layout="CHW", mean=[255.0 * m for m in mean],
                                    std=[255.0 * s for s in std])


def _to_torch(batch, dtype: torch.dtype, device: torch.device, stream=None) -> torch.Tensor:
    """A dense DALI TensorList copied into a new torch tensor on `device`: a CPU one synchronously, a GPU one
    asynchronously on `stream` (the torch stream the pipeline outputs were bound to by `run(stream)`)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    tensor = batch.as_tensor()
    out = torch.empty(tensor.shape(), dtype=dtype, device=device)
    return feed_ndarray(tensor, out, cuda_stream=stream)


def _dali_reason(error: Exception) -> str:
    """The one informative line of a DALI pipeline error (what the failing operator encountered)."""
    text = str(error)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and "pipeline object is no longer valid" not in line
             and not line.strip().startswith("C++ context")]
    return lines[0] if lines else type(error).__name__


def resized_crop_dali(images: Sequence[np.ndarray], boxes: Sequence[Sequence[int]], flips: Sequence[bool],
                      size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The loader's train geometry with given boxes, on the CPU: crop each uint8 HWC image to its box (top, left,
    height, width), resize to size x size (bilinear, antialiased), flip where `flips`, normalise -> (B, 3, S, S)."""
    fn, types, _ = _import_dali()
    from nvidia.dali import pipeline_def

    batch = [np.ascontiguousarray(image, dtype=np.uint8) for image in images]
    boxes = np.asarray(boxes, dtype=np.int32).reshape(len(batch), 4)
    flips = np.asarray(flips, dtype=np.int32).reshape(len(batch))

    @pipeline_def(batch_size=len(batch), num_threads=1, device_id=None, seed=0, prefetch_queue_depth=1)
    def graph():
        x = fn.external_source(source=lambda: batch, batch=True, layout="HWC", dtype=types.UINT8)
        box = fn.external_source(source=lambda: list(boxes), batch=True, dtype=types.INT32)
        flip = fn.external_source(source=lambda: list(flips), batch=True, dtype=types.INT32)
        resized = _crop_resize(x, box[0:2], box[2:4], [float(size), float(size)])
        return _normalize(resized, mean, std, mirror=flip)

    pipe = graph()
    pipe.build()
    (out,) = pipe.run()
    return _to_torch(out, torch.float32, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------- loader


class _EpochFeed:
    """What a pipeline's external sources read: one epoch's sample indices and random draws, batch by batch.

    Past the epoch's last batch a reusable (in-memory) pipeline's sources raise StopIteration, which ends DALI's
    epoch without prefetching stale batches (`reset()` then starts the next one); a file pipeline, built per epoch,
    wraps around instead (its reader does too; those prefetched batches are never used).
    """

    def __init__(self, batch_size: int, wrap: bool):
        self.batch_size, self.wrap = batch_size, wrap
        self.index = np.zeros(0, np.int64)
        self.draws = self.ra = None
        self.batches = 0

    def set(self, order: list[int], batches: int, draws: np.ndarray | None, ra: np.ndarray | None) -> None:
        self.index, self.batches, self.draws, self.ra = np.asarray(order, dtype=np.int64), batches, draws, ra

    def rows(self, k: int) -> slice:
        """The positions of batch k in the epoch's order."""
        if k >= self.batches:
            if not self.wrap:
                raise StopIteration
            k %= self.batches
        return slice(k * self.batch_size, min((k + 1) * self.batch_size, len(self.index)))

    def indices(self, info) -> np.ndarray:
        return self.index[self.rows(info.iteration)]

    def draw_rows(self, info) -> np.ndarray:
        return self.draws[self.rows(info.iteration)]

    def ra_rows(self, info) -> np.ndarray:
        return self.ra[self.rows(info.iteration)]


class DaliLoader(EpochLoader):
    """Iterable of (images (B, 3, S, S) float32 normalised, labels (B,) int64), both on `device`.

    train=True: random-resized-crop (area `crop_scale`, ratio 3/4..4/3), flip with probability `hflip`,
    RandAugment for a timm "rand-..." `auto_augment`, normalise; drop_last. train=False: resize the shorter side to
    int(img_size / crop_pct), centre-crop img_size, normalise; last partial batch kept, in order. `workers` DALI
    threads (at least 1). See the module docstring for order, seeding and the (not yet GPU-tested) CUDA path.

    RandAugment (`_rand_augment`, DALI's `nvidia.dali.auto_aug` augmentations and `select`) follows timm's
    rand_augment_transform: n layers, each a uniformly chosen op of timm's list (inc1: the "increasing" variants),
    applied with probability p, magnitude m (+ Gaussian noise mstd, clipped to [0, mmax]) with timm's level-to-
    parameter formulas and random signs. Differences from timm: magnitudes are quantised to 0.1 (exact when mstd
    is 0); the fill of rotate/shear/translate is one grey level, round(255 * mean of the mean) rather than timm's
    per-channel mean colour (DALI's warp fill is a scalar); Equalize follows OpenCV's histogram formula and
    Sharpness leaves no 1 px original border (DALI's ops); Color is DALI's saturation, Contrast/AutoContrast round
    slightly differently from PIL. DALI's own `rand_augment` suite (identity, no Invert/SolarizeAdd, always-applied
    ops, other posterize range) is deliberately not used.
    """

    backend = "dali"

    def __init__(self, split: Split, *, batch_size: int, img_size: int, train: bool, device: torch.device, seed: int,
                 workers: int, rank: int, world_size: int, crop_scale=(0.08, 1.0), hflip: float = 0.5,
                 auto_augment: str | None = None, crop_pct: float = 0.875):
        _import_dali()
        if not isinstance(split, (ArrayImages, FolderImages)):
            raise TypeError(f"unsupported split type {type(split).__name__}")
        for name, value in (("batch size", batch_size), ("image size", img_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise UserError(f"{name} must be an integer >= 1, got {value!r}")
        lo, hi = check_augment_args(crop_scale, hflip, crop_pct)
        device = torch.device(device)
        if device.type not in ("cpu", "cuda"):
            raise UserError(f"the dali data backend runs on the CPU or a CUDA device, not {device}")
        if auto_augment is not None and not str(auto_augment).strip():
            auto_augment = None
        self.augment = parse_rand_augment(auto_augment) if train and auto_augment else None
        if self.augment is not None and self.augment.num_layers == 0:
            self.augment = None
        self.dataset = split
        self.mean, self.std = split.mean, split.std
        self.num_classes = split.num_classes
        self.batch_size, self.drop_last, self.train = int(batch_size), train, train
        self.img_size, self.crop_scale, self.hflip, self.crop_pct = int(img_size), (lo, hi), float(hflip), crop_pct
        self.device, self.seed, self.rank, self.world_size = device, seed, rank, world_size
        self.num_threads = max(1, int(workers))
        self.sampler = ShardedSampler(len(split), shuffle=train, seed=seed, rank=rank, world_size=world_size)
        self._next_epoch = 0
        self._idle = None  # (pipeline, feed) of an in-memory split, ready for another epoch
        self._fill = round(255 * sum(self.mean) / 3)  # RandAugment's warp fill: one grey level (DALI: scalar)

    # ------------------------------------------------------------------------------------------ the pipeline

    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    def _device_id(self) -> int | None:
        if not self._cuda():
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _draws(self, seeds: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The epoch's crop/flip and RandAugment draws (None for eval / without RandAugment)."""
        if not self.train:
            return None, None
        draws = crop_flip_draws(seeds, self.crop_scale, self.hflip)
        return draws, rand_augment_draws(seeds, self.augment) if self.augment is not None else None

    def _pipeline(self, epoch: int, feed: _EpochFeed, order: list[int]):
        """A built DALI pipeline reading `feed` (and for an ImageFolder the files of `order`, this epoch's order):
        outputs (images float32 CHW, labels int64)."""
        fn, types, _ = _import_dali()
        from nvidia.dali import pipeline_def

        split, cuda, augment = self.dataset, self._cuda(), self.train and self.augment is not None
        source = {"batch": True, "batch_info": True}

        def graph():
            if isinstance(split, FolderImages):
                files = [split.samples[i][0] for i in order]
                encoded, labels = fn.readers.file(files=files, labels=[int(split.labels[i]) for i in order],
                                                  random_shuffle=False, pad_last_batch=True, name="files")
                shape = fn.peek_image_shape(encoded, dtype=types.INT32, adjust_orientation=False)
                images = fn.decoders.image(encoded, device="mixed" if cuda else "cpu", output_type=types.RGB,
                                           adjust_orientation=False)
            else:
                images = fn.external_source(source=lambda info: split.images[feed.indices(info)], layout="HWC",
                                            dtype=types.UINT8, **source)
                labels = fn.external_source(source=lambda info: split.labels[feed.indices(info)],
                                            dtype=types.INT64, **source)
                shape = images.shape(dtype=types.INT32)
                if cuda:
                    images = images.gpu()
            labels = fn.cast(fn.reshape(labels, shape=[]), dtype=types.INT64)
            if not self.train:
                resized, anchor = _eval_geometry(shape, self.img_size, self.crop_pct)
                images = fn.resize(images, size=resized, antialias=True, interp_type=types.INTERP_LINEAR)
                images = fn.slice(images, start=anchor, shape=[self.img_size] * 2, axes=[0, 1])
                return _normalize(images, self.mean, self.std), labels
            draws = fn.external_source(source=feed.draw_rows, dtype=types.FLOAT64, **source)
            anchor, box = _random_crop_box(shape, draws)
            images = _crop_resize(images, anchor, box, [float(self.img_size)] * 2)
            flip = fn.cast(draws[2 * CROP_ATTEMPTS + 2], dtype=types.INT32)
            if not augment:
                return _normalize(images, self.mean, self.std, mirror=flip), labels
            params = fn.external_source(source=feed.ra_rows, dtype=types.INT32, **source)
            images = fn.flip(images, horizontal=flip)
            images = _rand_augment(images, params, suite, self.augment, self.img_size, self._fill)
            return _normalize(images, self.mean, self.std), labels

        suite = _rand_augment_suite(self.augment) if augment else None
        with quiet_dali_aliases():
            pipe = pipeline_def(graph, enable_conditionals=augment)(
                batch_size=self.batch_size, num_threads=self.num_threads, device_id=self._device_id(),
                seed=_mix(self.seed, epoch, self.rank, 0xDA11) & 0x7FFFFFFF, prefetch_queue_depth=_PREFETCH)
            pipe.build()
        return pipe

    def _failure(self, error: Exception, order: list[int], k: int) -> UserError:
        """A one-line UserError for a pipeline that failed at batch k (a file that cannot be read or decoded)."""
        reason = _dali_reason(error)
        if not isinstance(self.dataset, FolderImages):
            return UserError(f"the dali pipeline failed on {self.dataset.name}: {reason}")
        from PIL import Image

        # the failing batch is k or one DALI had prefetched; find the file with PIL to name it
        paths = [self.dataset.samples[i][0] for i in order[k * self.batch_size:(k + _PREFETCH + 1) * self.batch_size]]
        for path in paths:
            try:
                with Image.open(path) as img:
                    img.load()
            except Exception as e:  # noqa: BLE001  (any PIL failure names the file)
                return UserError(f"cannot decode image {path}: {reason} ({type(e).__name__}: {e})")
        return UserError(f"cannot read or decode an image of {self.dataset.name} among {paths[0]} ... "
                         f"{paths[-1]}: {reason}")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._next_epoch
        self._next_epoch = epoch + 1
        self.sampler.set_epoch(epoch)
        keys = list(self.sampler)
        order = [i for i, _ in keys]
        count = self.batches(len(order))
        draws, ra = self._draws(np.array([s for _, s in keys], dtype=np.uint64))
        files = isinstance(self.dataset, FolderImages)
        # an in-memory pipeline that finished its last epoch is reused (DALI reset); files need their new order
        reused, self._idle = self._idle, None
        pipe, feed = reused if reused is not None else (None, _EpochFeed(self.batch_size, wrap=files))
        feed.set(order, count, draws, ra)
        try:
            if pipe is None:
                pipe = self._pipeline(epoch, feed, order)
            else:
                pipe.reset()
        except RuntimeError as e:
            raise self._failure(e, order, 0) from None
        # CUDA: outputs bound to torch's current stream, so the copy and DALI's release of the buffers are ordered
        # after DALI's work and before the training step's kernels (not run on a GPU yet)
        stream = torch.cuda.current_stream(self.device) if self._cuda() else None
        finished = False
        try:
            for k in range(count):
                try:
                    images, labels = pipe.run(stream) if stream is not None else pipe.run()
                except RuntimeError as e:
                    raise self._failure(e, order, k) from None
                count = min(self.batch_size, len(order) - k * self.batch_size)
                x = _to_torch(images, torch.float32, self.device, stream)[:count]
                y = _to_torch(labels, torch.int64, torch.device("cpu"))[:count]
                yield x, y.to(self.device, non_blocking=stream is not None)
            finished = True
        finally:
            if finished and not files:
                self._idle = (pipe, feed)
            del pipe

    def __repr__(self) -> str:
        return (f"DaliLoader({self.dataset.name}, batch_size={self.batch_size}, batches={len(self)}, "
                f"train={self.train}, device={self.device}, threads={self.num_threads})")
