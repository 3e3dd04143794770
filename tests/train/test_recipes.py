"""Every packaged recipe resolves (`--config NAME`), its models build and its stage taps resolve at its image size,
on the meta device (no weights, no compute); the CIFAR-100 ones carry SPEC section 7's protocol."""

import pytest
import torch

from patfast.cli import _token_student, build_parser
from patfast.distill.build import DistillSettings, build_distiller
from patfast.models.create import create_model
from patfast.train.config import parse_args, resolve
from patfast.train.recipes import packaged_recipes

RECIPES = sorted(packaged_recipes())

# SPEC section 7, written out here (not read from the recipes)
CNN = {"opt": "sgd", "lr": 0.05, "weight_decay": 2e-3, "min_lr": 1e-3, "warmup_epochs": 3, "clip_grad": 0.0}
VIT = {"opt": "adamw", "lr": 5e-4, "weight_decay": 0.05, "min_lr": 1e-5, "warmup_epochs": 20, "clip_grad": 5.0,
       "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "mixup": 0.8, "cutmix": 1.0}
CIFAR = {"epochs": 300, "batch_size": 128, "img_size": 224, "crop_scale": [0.08, 1.0], "hflip": 0.5,
         "smoothing": 0.1, "model_ema": True, "model_ema_decay": 0.9998, "distiller": "pat"}
PAIRS = {("swin_tiny_patch4_window7_224", "resnet18"), ("vit_small_patch16_224", "mobilenetv2_100"),
         ("convnext_tiny", "deit_tiny_patch16_224"), ("convnext_tiny", "resmlp_12_224")}


def resolved(name: str, *extra: str) -> dict:
    parser = build_parser()
    args = parse_args(parser, ["train", "--config", name, *extra], parser.commands)
    return resolve(args, "train", student_is_tokens=_token_student)


def test_the_list_holds_the_headline_pairs_both_variants_the_ablations_and_imagenet():
    cifar = [n for n in RECIPES if n.startswith("cifar100-")]
    pairs = {(resolved(n)["teacher"], resolved(n)["student"], resolved(n)["pat_variant"]) for n in cifar}
    assert {(t, s, v) for t, s in PAIRS for v in ("paper", "official")} <= pairs
    ablations = [n for n in cifar if "-deit_t-" in n and not n.endswith("-official")]
    assert len(ablations) == 3
    imagenet = {(resolved(n)["teacher"], resolved(n)["student"]) for n in RECIPES if n.startswith("imagenet-")}
    assert imagenet == {("swin_tiny_patch4_window7_224", "resnet18"), ("convnext_tiny", "deit_tiny_patch16_224"),
                        ("swin_tiny_patch4_window7_224", "resmlp_12_224")}
    assert all(packaged_recipes()[n].summary for n in RECIPES)


@pytest.mark.parametrize("name", [n for n in RECIPES if n.startswith("cifar100-")])
def test_cifar_recipes_carry_the_paper_protocol(name):
    cfg = resolved(name)
    assert cfg["data"].startswith("cifar100:")
    want = {**CIFAR, **(VIT if _token_student(cfg["student"]) else CNN)}
    assert {k: cfg[k] for k in want} == want
    assert cfg["recipe"] == ("vit" if _token_student(cfg["student"]) else "cnn")


def test_ablations_switch_what_they_say():
    no_afp, no_fb, raa = (resolved(f"cifar100-convnext_t-deit_t-{k}") for k in ("no-afp", "afp-no-feedback",
                                                                               "raa-only"))
    assert no_afp["pat_afp_stage"] == [] and no_afp["kd_weight"] == 1.0 and no_afp["pat_feedback"]
    assert no_fb["pat_afp_stage"] == [1, 2, 3, 4] and not no_fb["pat_feedback"]
    assert raa["pat_afp_stage"] == [] and raa["kd_weight"] == 0.0 and raa["reg_weight"] == 0.0


def test_the_command_line_overrides_a_recipe():
    cfg = resolved("cifar100-swin_t-resnet18", "--epochs", "2", "--data", "cifar100:/somewhere")
    assert cfg["epochs"] == 2 and cfg["data"] == "cifar100:/somewhere" and cfg["lr"] == 0.05


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_builds_its_distiller_on_the_meta_device(name):
    cfg = resolved(name)
    classes = 100 if name.startswith("cifar100-") else 1000
    with torch.device("meta"):
        student = create_model(cfg["student"], classes, cfg["img_size"])
        teacher = create_model(cfg["teacher"], classes, cfg["img_size"])
        settings = DistillSettings.from_config(cfg, pat_aligner_order="plain")  # "auto" is resolved by the loop
        d = build_distiller(cfg["distiller"], student, teacher, settings, img_size=cfg["img_size"],
                            data_mean=(0.5,) * 3, data_std=(0.25,) * 3)
    assert len(d.student_taps.stage_shapes) == len(d.teacher.taps.stage_shapes) == 4
    assert sorted(int(i) for i in d.prompts) == cfg["pat_afp_stage"]
    assert d.feedback == cfg["pat_feedback"]
    assert d.variant.teacher_train_first_batch == (cfg["pat_variant"] == "official")


def test_recipes_command_lists_every_recipe_in_one_line_each(capsys):
    from patfast.cli import main

    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in RECIPES:
        assert sum(line.startswith(name + " ") for line in lines) == 1


def test_an_unknown_recipe_is_one_line_error(capsys):
    from patfast.cli import main

    assert main(["train", "--config", "cifar100-no-such-pair"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "patfast recipes" in err


def test_a_checkpoint_from_before_an_option_existed_still_resumes():
    from patfast.errors import UserError
    from patfast.train.checkpoint import check_compatible

    cfg = resolved("cifar100-swin_t-resnet18")
    old = {k: v for k, v in cfg.items() if k not in ("grad_accum", "sync_bn", "pat_feedback")}
    assert check_compatible(old, cfg, "last.pth", False) == []
    with pytest.raises(UserError, match="grad_accum"):
        check_compatible(old, {**cfg, "grad_accum": 2}, "last.pth", False)


def test_sync_bn_takes_the_plain_aligner_order():
    from patfast.errors import UserError
    from patfast.train.distributed import World
    from patfast.train.loop import _aligner_order

    two = World(rank=0, size=2)
    assert _aligner_order({"sync_bn": True, "pat_aligner_order": "auto"}, two) == "plain"
    assert _aligner_order({"sync_bn": True, "pat_aligner_order": "plain"}, two) == "plain"
    with pytest.raises(UserError, match="per process"):
        _aligner_order({"sync_bn": True, "pat_aligner_order": "upsample-last"}, two)
    assert _aligner_order({"sync_bn": True, "pat_aligner_order": "auto"}, World()) == "upsample-last"  # one process
    assert _aligner_order({"pat_aligner_order": "upsample-last"}, two) == "upsample-last"
    assert _aligner_order({"pat_aligner_order": "auto", "backend": "reference"}, World()) == "upsample-last"


def test_no_afp_is_said_with_none_not_by_a_missing_value(tmp_path):
    from patfast.errors import UserError
    from patfast.train.config import read_yaml

    (tmp_path / "a.yaml").write_text("pat_afp_stage: none\n")
    (tmp_path / "b.yaml").write_text("pat_afp_stage: []\n")
    (tmp_path / "c.yaml").write_text("pat_afp_stage:\n")
    assert read_yaml(str(tmp_path / "a.yaml"), "train")["pat_afp_stage"] == []
    assert read_yaml(str(tmp_path / "b.yaml"), "train")["pat_afp_stage"] == []
    with pytest.raises(UserError):
        read_yaml(str(tmp_path / "c.yaml"), "train")
