"""Teachers from timm 0.6.5 CheckpointSaver files (OFA-KD's format) and from timm's pretrained weights, in timm 1.x.

The files in data/timm065/ were written by timm 0.6.5 itself (make_timm065_fixture.py, with its logits on a fixed
batch); load_teacher must give the same logits from timm 1.x.
"""

import argparse
import os

import pytest
import timm
import torch

from patfast.errors import UserError
from patfast.models import load_teacher
from patfast.models.create import create_model
from patfast.models.legacy_checkpoint import pretrained_teacher, read_teacher_state, teacher_from_config
from patfast.models.weights import load_weights, save_weights

DATA = os.path.join(os.path.dirname(__file__), "data", "timm065")
NAMES = ["swin_tiny_patch4_window7_224", "convnext_tiny", "vit_tiny_patch16_224", "mixer_s16_224"]


def fixture(name):
    return os.path.join(DATA, f"{name}.pth"), torch.load(os.path.join(DATA, f"{name}.logits.pt"), weights_only=True)


def timm1_name(name):
    """The timm 1.x name that builds the fixture's architecture. timm 1.x's mixer_s16_224 refuses architecture
    overrides (its function repeats the keys), so a function like it that takes them is registered for the test."""
    if name != "mixer_s16_224":
        return name
    alias = "patfast_test_mixer_s16_224"
    if not timm.is_model(alias):
        from timm.models import register_model
        from timm.models.mlp_mixer import _create_mixer

        def patfast_test_mixer_s16_224(pretrained=False, **kwargs):
            args = dict(dict(patch_size=16, num_blocks=8, embed_dim=512), **kwargs)
            return _create_mixer("mixer_s16_224", pretrained=pretrained, **args)

        register_model(patfast_test_mixer_s16_224)
    return alias


def saver_file(path, state, ema=None, **args):
    """A file shaped like timm's CheckpointSaver's."""
    obj = {"epoch": 9, "arch": args.get("model", "x"), "state_dict": state, "optimizer": {"state": {},
           "param_groups": []}, "version": 2, "args": argparse.Namespace(**args), "metric": 50.0}
    if ema is not None:
        obj["state_dict_ema"] = ema
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_timm065(name):
    path, ref = fixture(name)
    assert ref["timm_version"] == "0.6.5"
    outs = {}
    for use_ema in (False, True):
        model = load_teacher(timm1_name(name), path, ref["num_classes"], ref["img_size"], use_ema=use_ema,
                             **ref["kwargs"]).eval()
        with torch.no_grad():
            outs[use_ema] = model(ref["input"])
        expected = ref["logits_ema" if use_ema else "logits"]
        assert outs[use_ema].dtype == torch.float32
        torch.testing.assert_close(outs[use_ema], expected, rtol=0, atol=1e-5)
    assert (outs[True] - outs[False]).abs().max() > 0.5  # the EMA weights were the ones loaded


def test_namespace_allowed_only_for_that_load():
    path, ref = fixture("convnext_tiny")
    load_teacher("convnext_tiny", path, 100, 64, **ref["kwargs"])
    assert argparse.Namespace not in torch.serialization.get_safe_globals()
    with pytest.raises(UserError, match="pickled argparse.Namespace"):  # the other readers are as they were
        load_weights(create_model("convnext_tiny", 100, 64, **ref["kwargs"]), path)


def _touch(path):  # what a malicious file would run on unpickling
    open(path, "w").close()


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _touch, (self.marker,)


def test_pickled_class_still_refused(tmp_path):
    model = create_model("convnext_atto", 10, 32)
    marker = tmp_path / "ran"
    path = saver_file(tmp_path / "evil.pth", model.state_dict(), model="convnext_atto", hook=Payload(str(marker)))
    for use_ema in (False, True):
        with pytest.raises(UserError, match="only loads by running code from the file"):
            load_teacher("convnext_atto", path, 10, 32, use_ema=use_ema)
    assert not marker.exists()


def test_ema_requested_but_absent(tmp_path):
    model = create_model("convnext_atto", 10, 32)
    path = saver_file(tmp_path / "no_ema.pth", model.state_dict(), model="convnext_atto")
    load_teacher("convnext_atto", path, 10, 32)
    with pytest.raises(UserError, match=r"has no EMA weights \(no 'state_dict_ema'; it holds epoch, arch, state_dict"):
        load_teacher("convnext_atto", path, 10, 32, use_ema=True)
    plain = tmp_path / "plain.pth"
    torch.save(model.state_dict(), plain)
    with pytest.raises(UserError, match="no EMA weights .*it is a plain state dict"):
        load_teacher("convnext_atto", str(plain), 10, 32, use_ema=True)
    st = str(tmp_path / "t.safetensors")
    save_weights(model, st, {"model": "convnext_atto"})
    with pytest.raises(UserError, match="no EMA weights to pick"):
        load_teacher("convnext_atto", st, 10, 32, use_ema=True)


def test_wrong_architecture_names_keys():
    path, ref = fixture("swin_tiny_patch4_window7_224")
    with pytest.raises(UserError, match=r"saved for swin_tiny_patch4_window7_224\).*missing keys, e\.g\. stem\.0\."
                                        r"weight.*unexpected keys, e\.g\. patch_embed"):
        load_teacher("convnext_tiny", path, 100, 64, depths=(2, 2, 2, 2), dims=(8, 16, 32, 64))
    with pytest.raises(UserError, match="shape mismatch in .* tensors"):  # same family, other widths
        load_teacher("swin_tiny_patch4_window7_224", path, 100, 64, **dict(ref["kwargs"], embed_dim=24))


def test_weights_the_filter_drops_are_refused(tmp_path):
    """timm 0.6.5's ViT with representation_size has a pre_logits layer; timm 1.x's ViT has none and its filter drops
    those weights, which would change the teacher."""
    path, ref = fixture("vit_tiny_patch16_224")
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, weights_only=True)
    obj["state_dict"]["pre_logits.fc.weight"] = torch.randn(24, 24)
    obj["state_dict"]["pre_logits.fc.bias"] = torch.randn(24)
    torch.save(obj, tmp_path / "pre_logits.pth")
    with pytest.raises(UserError, match=r"VisionTransformer drops 2 tensors .* e\.g\. pre_logits\.fc\.weight"):
        load_teacher("vit_tiny_patch16_224", str(tmp_path / "pre_logits.pth"), 100, 64, **ref["kwargs"])


def test_plain_files_load_as_load_weights(tmp_path):
    torch.manual_seed(1)
    model = create_model("convnext_atto", 10, 32)
    plain, st = tmp_path / "w.pth", str(tmp_path / "w.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, plain)
    save_weights(model, st, {"model": "convnext_atto", "mean": [0.1, 0.2, 0.3]})
    for path in (str(plain), st):
        loaded = load_teacher("convnext_atto", path, 10, 32)
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(UserError, match="shape mismatch"):  # as load_weights: 10 classes are not 7
        load_teacher("convnext_atto", st, 7, 32)


def test_saver_metadata(tmp_path):
    path, ref = fixture("vit_tiny_patch16_224")
    # the mean/std a timm run records in its args reach the teacher's metadata
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, weights_only=True)
    obj["args"].mean, obj["args"].std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    torch.save(obj, tmp_path / "with_mean.pth")
    model = create_model("vit_tiny_patch16_224", 100, 64, **ref["kwargs"])
    state, meta, torch_file = read_teacher_state(str(tmp_path / "with_mean.pth"), use_ema=True)
    assert torch_file and meta == {"model": "vit_tiny_patch16_224", "mean": "[0.5071, 0.4865, 0.4409]",
                                   "std": "[0.2673, 0.2564, 0.2762]"}
    model.load_state_dict(state)
    assert read_teacher_state(path)[1] == {"model": "vit_tiny_patch16_224"}  # mean None: nothing recorded


def _imagenet_file(tmp_path, name="convnext_atto"):
    torch.manual_seed(2)
    source = create_model(name, 1000, 32)
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    return source, str(path)


def test_pretrained_from_local_file_resets_head(tmp_path):
    source, path = _imagenet_file(tmp_path)
    model = pretrained_teacher("convnext_atto", 10, 32, file=path)
    assert model.head.fc.weight.shape == (10, 320)
    trunk = {k: v for k, v in source.state_dict().items() if not k.startswith("head.fc.")}
    for k, v in trunk.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert not torch.equal(model.head.fc.weight, source.head.fc.weight[:10])
    assert "state_dict" not in model.pretrained_cfg  # no second copy of the weights kept
    same = pretrained_teacher("convnext_atto", 1000, 32, file=path)  # 1000 classes: the head is the file's
    assert torch.equal(same.head.fc.weight, source.head.fc.weight)
    cfg = {"teacher": "convnext_atto", "img_size": 32, "teacher_ema": False, "teacher_pretrained": True}
    _, meta, where = teacher_from_config(cfg, 10, path)
    assert meta["mean"] == str(list(timm.data.IMAGENET_DEFAULT_MEAN))
    assert where == f"timm's pretrained weights in {path}"


def test_pretrained_from_timm065_saver_file_keeps_the_ema_choice():
    path, ref = fixture("swin_tiny_patch4_window7_224")
    for use_ema in (False, True):
        expected = load_teacher(ref["name"], path, 100, 64, use_ema=use_ema, **ref["kwargs"]).state_dict()
        model = pretrained_teacher(ref["name"], 10, 64, file=path, use_ema=use_ema, **ref["kwargs"])
        for k, v in model.state_dict().items():
            if not k.startswith("head.fc."):
                assert torch.equal(v, expected[k]), k


def test_pretrained_file_that_does_not_fit(tmp_path):
    _, path = _imagenet_file(tmp_path, "resnet10t")
    with pytest.raises(UserError, match=r"teacher \(pretrained\) checkpoint .* does not fit the model.*missing keys"):
        pretrained_teacher("convnext_atto", 10, 32, file=path)
    part = {k: v for k, v in torch.load(path).items() if not k.startswith("layer4.")}
    torch.save(part, tmp_path / "part.pth")  # timm loads it without complaint when it resets the head
    with pytest.raises(UserError, match=r"missing keys, e\.g\. layer4\."):
        pretrained_teacher("resnet10t", 10, 32, file=str(tmp_path / "part.pth"))


def test_pretrained_offline_is_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # fail at once (and never download), whatever the network
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError) as info:
        pretrained_teacher("convnext_atto", 10, 32)
    message = str(info.value)
    assert "\n" not in message and "pass --teacher-checkpoint FILE" in message
    with pytest.raises(UserError, match="timm's pretrained weights have none"):
        pretrained_teacher("convnext_atto", 10, 32, use_ema=True)


@pytest.mark.slow
def test_train_cli_loads_the_ema_teacher(tmp_path, capsys):
    """loop.py's teacher comes through load_teacher: a CheckpointSaver file (argparse.Namespace inside, which
    load_weights refuses) whose state_dict does not fit and whose state_dict_ema does."""
    from patfast.cli import main

    torch.manual_seed(0)
    good = create_model("convnext_atto", 10, 32).state_dict()
    broken = {k: v for k, v in good.items() if not k.startswith("head.")}
    path = saver_file(tmp_path / "t.pth", broken, ema=good, model="convnext_atto", num_classes=10)
    argv = ["train", "--data", "digits", "--teacher", "convnext_atto", "--teacher-checkpoint", path, "--epochs", "1",
            "--img-size", "32", "--batch-size", "64", "--no-progress", "--device", "cpu", "--pat-dim", "64",
            "--pat-heads", "4", "--student", "resnet10t", "--out", str(tmp_path / "run")]
    assert main([*argv, "--teacher-ema"]) == 0
    assert f"teacher: convnext_atto from {path} (EMA weights)" in capsys.readouterr().out
    argv[-1] = str(tmp_path / "run2")
    assert main(argv) == 2  # without --teacher-ema: state_dict, which lacks the head
    assert "missing keys, e.g. head.norm.weight" in capsys.readouterr().err
