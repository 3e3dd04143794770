"""Configuration: precedence (defaults < recipe < data defaults < YAML < command line) and validation."""

import argparse

import pytest

from patfast.errors import UserError
from patfast.train.config import OPTIONS, RECIPES, add_options, parse_args, resolve


def parse(command, *argv, tokens=None):
    p = argparse.ArgumentParser()
    add_options(p, command)
    return resolve(parse_args(p, list(argv), command=command), command, student_is_tokens=tokens)


def test_command_line_beats_yaml_beats_defaults(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.125\nepochs: 7\nbatch-size: 16\n")
    cfg = parse("train", "--config", str(cfg_file), "--lr", "0.25")
    assert cfg["lr"] == 0.25  # command line wins
    assert cfg["epochs"] == 7 and cfg["batch_size"] == 16  # YAML (kebab-case keys accepted) beats data defaults


def test_every_option_has_a_resolved_value_for_its_commands():
    for command in ("train", "teacher", "eval"):
        cfg = parse(command)
        names = {o.name for o in OPTIONS if command in o.commands}
        assert names <= set(cfg)


def test_recipe_follows_the_student_kind():
    assert parse("train", "--data", "digits", "--student", "deit_tiny_patch16_224",
                 tokens=lambda n: n.startswith("deit"))["opt"] == "adamw"
    cfg = parse("train", "--student", "resnet18", tokens=lambda n: False)
    assert cfg["opt"] == "sgd" and cfg["recipe"] == "cnn"
    assert cfg["weight_decay"] == RECIPES["cnn"]["weight_decay"]


def test_explicit_optimizer_brings_its_own_rates():
    cfg = parse("train", "--opt", "adamw", tokens=lambda n: False)
    assert cfg["opt"] == "adamw"
    assert cfg["lr"] == RECIPES["vit"]["lr"] and cfg["weight_decay"] == RECIPES["vit"]["weight_decay"]


def test_lists_parse_from_both_sources(tmp_path):
    cfg = parse("train", "--pat-afp-stage", "1,3", "--crop-scale", "0.2,0.9")
    assert cfg["pat_afp_stage"] == [1, 3] and cfg["crop_scale"] == [0.2, 0.9]
    f = tmp_path / "c.yaml"
    f.write_text("pat_afp_stage: [2, 4]\nstudent_stages: [a, b, c, d]\n")
    cfg = parse("train", "--config", str(f))
    assert cfg["pat_afp_stage"] == [2, 4] and cfg["student_stages"] == ["a", "b", "c", "d"]


@pytest.mark.parametrize("argv, needle", [
    (["--pat-afp-stage", "5"], "--pat-afp-stage"),
    (["--pat-afp-stage", "1,1"], "--pat-afp-stage"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--lr", "abc"], "--lr"),
    (["--epochs", "2.5"], "--epochs"),
    (["--hflip", "1.5"], "--hflip"),
    (["--crop-scale", "0.9,0.1"], "--crop-scale"),
    (["--pat-variant", "buggy"], "--pat-variant"),
    (["--distiller", "crd"], "--distiller"),
    (["--pat-dim", "100", "--pat-heads", "8"], "divisible"),
    (["--teacher-stages", "a,b,c"], "--teacher-stages"),
    (["--model-ema-decay", "1.0"], "--model-ema-decay"),
])
def test_bad_values_are_user_errors(argv, needle):
    with pytest.raises(UserError, match=needle.replace("-", r"\-")):
        parse("train", *argv)


def test_config_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        parse("train", "--config", str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [unclosed\n")
    with pytest.raises(UserError, match="cannot read config"):
        parse("train", "--config", str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("learning_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown key 'learning_rate'"):
        parse("train", "--config", str(unknown))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("epochs: many\n")
    with pytest.raises(UserError, match="'epochs'"):
        parse("train", "--config", str(wrong))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        parse("train", "--config", str(listy))


def test_distill_settings_are_spelled_as_the_config_keys():
    from dataclasses import fields

    from patfast.distill.build import DistillSettings

    names = {f.name for f in fields(DistillSettings)} - {"pat_queries_per_stage"}  # not a command-line option
    assert names <= {o.name for o in OPTIONS if "train" in o.commands}
    cfg = parse("train", "--pat-dim", "256", "--kd-weight", "2", "--pat-afp-stage", "1,3")
    s = DistillSettings.from_config(cfg)
    assert (s.pat_dim, s.kd_weight, list(s.pat_afp_stage), s.pat_variant) == (256, 2.0, [1, 3], "paper")


def test_an_args_yaml_feeds_config_back(tmp_path, assert_config_reusable):
    import yaml

    # what the loop writes (train/loop.py): {"command": ..., **resolved}, with None for the auto values
    for command, argv in (("train", ["--distiller", "kd", "--epochs", "3", "--out", str(tmp_path / "old")]),
                          ("teacher", ["--teacher", "resnet10t", "--lr", "0.02"])):
        path = tmp_path / f"{command}.yaml"
        path.write_text(yaml.safe_dump({"command": command, **parse(command, *argv)}, sort_keys=False))
        assert_config_reusable(path)
    cfg = parse("train", "--config", str(tmp_path / "train.yaml"))
    assert cfg["out"] is None and cfg["distiller"] == "kd" and cfg["teacher_mean"] is None  # a new run's own out


def test_short_runs_get_a_warm_up_and_an_ema_that_fit_them():
    # issue 16 item 7: the ViT recipe's 20 warm-up epochs were clamped to the run (3 epochs: peak lr at the end,
    # no decay), and the EMA's 0.9998 averages over 5,000 steps (a 3-epoch run's EMA stayed near initialisation)
    from patfast.train.config import ema_decay, warmup_note
    from patfast.train.optim import WarmupCosine

    vit = lambda n: n.startswith("deit")  # noqa: E731
    cfg = parse("train", "--data", "cifar100:/x", "--student", "deit_tiny_patch16_224", "--epochs", "3", tokens=vit)
    assert cfg["warmup_epochs"] == 0.6 and "vit recipe's 20 warm-up" in warmup_note(cfg)
    steps = 3 * 391
    lrs = [WarmupCosine(_Opt(), cfg["lr"], cfg["min_lr"], round(0.6 * 391), steps).value(s) for s in range(steps)]
    assert max(lrs) == cfg["lr"] and lrs[-1] < 1.01 * cfg["min_lr"]  # it warms up, then decays to the end
    assert ema_decay(cfg, steps) == pytest.approx(1 - 10 / steps)  # averages over a tenth of the run
    long = parse("train", "--data", "cifar100:/x", "--student", "deit_tiny_patch16_224", tokens=vit)
    assert long["warmup_epochs"] == 20 and warmup_note(long) == ""
    assert ema_decay(long, 300 * 391) == 0.9998
    given = parse("train", "--data", "cifar100:/x", "--student", "deit_tiny_patch16_224", "--epochs", "3",
                  "--warmup-epochs", "2", "--model-ema-decay", "0.999", tokens=vit)
    assert given["warmup_epochs"] == 2 and ema_decay(given, steps) == 0.999  # what the user gives is kept


class _Opt:
    param_groups: list = []
