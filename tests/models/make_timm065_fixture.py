"""Write tests/models/data/timm065/: timm 0.6.5 CheckpointSaver files of small random models, with timm 0.6.5's logits.

OFA-KD's CIFAR-100 teachers (the ones the PAT paper distils from) are timm 0.6.5 CheckpointSaver files. This script
makes files of the same shape for one small model per family (Swin, ConvNeXt, ViT, MLP-Mixer), with timm 0.6.5 itself,
so that tests/models/test_legacy_checkpoint.py can check that patfast's load_teacher (timm 1.x) gives the same logits.
It is the only place timm 0.6.5 is needed; the tests read the files it writes. To regenerate:

    python3 -m venv /work/venv065
    /work/venv065/bin/pip install torch==2.14.1 torchvision==0.29.1 timm==0.6.5 numpy
    /work/venv065/bin/python tests/models/make_timm065_fixture.py   # from the repository root

(timm 0.6.5 imports on torch 2.14.1 unpatched.) For each model it writes

- `<name>.pth`: what timm 0.6.5's `CheckpointSaver.save_checkpoint` writes (`epoch`, `arch`, `state_dict`, `optimizer`,
  `version`, `args` (an argparse.Namespace), `state_dict_ema`, `metric`), written by that class itself; the EMA weights
  differ from the others;
- `<name>.logits.pt`: plain tensors and strings: the timm name, the architecture overrides (`kwargs`; they shrink the
  model, the names' own sizes give files of 20-110 MB), `img_size`, a fixed input batch `input`, and timm 0.6.5's
  logits for it in eval mode with `state_dict` (`logits`) and with `state_dict_ema` (`logits_ema`).

timm 0.6.5's registered functions refuse architecture overrides (`dict(patch_size=4, ..., **kwargs)` raises on a
repeated key), so the models are built with the class and the function's other arguments, as that function would.
Weights are seeded random values at scales that keep every part of the network significant (timm's own init leaves
ConvNeXt's layer scale at 1e-6 and Mixer's head at zero).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "timm065")

# name -> (module, class, the registered function's fixed arguments with the overrides applied, overrides, img_size)
MODELS = {
    "swin_tiny_patch4_window7_224": (
        "swin_transformer", "SwinTransformer", dict(patch_size=4),
        dict(window_size=4, embed_dim=12, depths=(2, 2, 1, 1), num_heads=(1, 2, 2, 4)), 64),
    "convnext_tiny": ("convnext", "ConvNeXt", {}, dict(depths=(2, 2, 2, 2), dims=(8, 16, 32, 64)), 64),
    "vit_tiny_patch16_224": (
        "vision_transformer", "VisionTransformer", dict(patch_size=16), dict(embed_dim=24, depth=12, num_heads=3), 64),
    "mixer_s16_224": ("mlp_mixer", "MlpMixer", dict(patch_size=16), dict(num_blocks=8, embed_dim=32), 64),
}
NUM_CLASSES = 100
BATCH = 3


def build(name: str):
    import importlib

    module, cls, fixed, overrides, img_size = MODELS[name]
    kwargs = dict(fixed, **overrides, num_classes=NUM_CLASSES)
    if module != "convnext":
        kwargs["img_size"] = img_size
    model = getattr(importlib.import_module(f"timm.models.{module}"), cls)(**kwargs)
    return model.eval()


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Seeded random parameters: matrices ~ 1/sqrt(fan-in), norm scales and layer scales ~ 1, the rest ~ 0.2."""
    with torch.no_grad():
        for key, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if key.endswith("weight") and p.ndim >= 2:
                p.copy_(noise / (p[0].numel() ** 0.5))
            elif key.endswith("weight") or key.endswith("gamma"):
                p.copy_(1 + 0.2 * noise)
            else:  # biases, relative position tables, position embeddings, class tokens
                p.copy_(0.2 * noise)


def args_for(name: str, img_size: int) -> argparse.Namespace:
    """The kind of Namespace timm's train.py (and OFA-KD's, derived from it) saves; values are illustrative."""
    return argparse.Namespace(
        dataset="cifar100", model=name, num_classes=NUM_CLASSES, img_size=img_size, input_size=None, mean=None,
        std=None, batch_size=128, epochs=300, opt="adamw", lr=5e-4, weight_decay=0.05, scale=[0.08, 1.0],
        ratio=[3 / 4, 4 / 3], smoothing=0.1, model_ema=True, model_ema_decay=0.9998, amp=True, seed=42,
        output="./output", checkpoint_hist=10, pretrained=False, initial_checkpoint="", drop_path=0.1)


def main() -> int:
    import timm
    from timm.utils import CheckpointSaver, ModelEmaV2

    if timm.__version__ != "0.6.5":
        print(f"this script needs timm 0.6.5 (found {timm.__version__}); see its docstring", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    for i, name in enumerate(MODELS):
        _, _, _, overrides, img_size = MODELS[name]
        gen = torch.Generator().manual_seed(1000 + i)
        model = build(name)
        randomise(model, gen)
        ema = ModelEmaV2(model)
        with torch.no_grad():  # EMA weights that differ from the model's (buffers, e.g. Swin's masks, are kept)
            for p in ema.module.parameters():
                p.mul_(0.9).add_(0.1 * torch.randn(p.shape, generator=gen))
        x = torch.randn(BATCH, 3, img_size, img_size, generator=gen)
        with torch.no_grad():
            logits, logits_ema = model(x), ema.module(x)
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)  # never stepped: its state is empty
        with tempfile.TemporaryDirectory() as tmp:
            saver = CheckpointSaver(model, optimizer, args=args_for(name, img_size), model_ema=ema,
                                    checkpoint_dir=tmp, recovery_dir=tmp, max_history=1)
            saver.save_checkpoint(epoch=299, metric=80.0)
            shutil.copyfile(os.path.join(tmp, "model_best.pth.tar"), os.path.join(OUT, f"{name}.pth"))
        kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
        torch.save({"name": name, "kwargs": kwargs, "img_size": img_size, "num_classes": NUM_CLASSES, "input": x,
                    "logits": logits, "logits_ema": logits_ema, "timm_version": timm.__version__,
                    "torch_version": str(torch.__version__)}, os.path.join(OUT, f"{name}.logits.pt"))
        size = os.path.getsize(os.path.join(OUT, f"{name}.pth"))
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, {size / 1e6:.2f} MB, "
              f"|logits| max {logits.abs().max():.3f}, EMA differs by {(logits - logits_ema).abs().max():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
