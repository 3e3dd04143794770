"""A JPEG ImageFolder for loader benchmarks, made from the two photos scikit-learn bundles (nothing downloaded).

    python benchmarks/make_jpeg_folder.py OUT [--per-class 500] [--seed 0]

OUT/train/{china,flower}/NNNN.jpg and OUT/val/...: random crops of 200-427 px sides (aspect 3/4-4/3) of
china.jpg / flower.jpg (427 x 640), randomly mirrored, JPEG quality 90 — real photographic content, so decoding
costs what it costs on ImageNet-like files of that size. Same seed, same files.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--per-class", type=int, default=500, help="train images per class (val: a fifth)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    rng = np.random.default_rng(args.seed)
    for split, n in (("train", args.per_class), ("val", max(1, args.per_class // 5))):
        for name, photo in zip(("china", "flower"), photos.images):
            folder = os.path.join(args.out, split, name)
            os.makedirs(folder, exist_ok=True)
            h, w, _ = photo.shape
            for k in range(n):
                ch = int(rng.integers(200, h + 1))
                cw = int(min(w, max(150, round(ch * rng.uniform(3 / 4, 4 / 3)))))
                top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                crop = photo[top:top + ch, left:left + cw]
                if rng.random() < 0.5:
                    crop = crop[:, ::-1]
                Image.fromarray(np.ascontiguousarray(crop)).save(os.path.join(folder, f"{k:04d}.jpg"), quality=90)
    print(f"wrote {2 * (args.per_class + max(1, args.per_class // 5))} JPEG files under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
