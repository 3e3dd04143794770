"""StageTaps on timm models: the 4 stage features (SPEC section 5) and the 4 prompt points (SPEC section 4).

Expected shapes come from each architecture's definition (channels per stage, spatial size = image / reduction,
token grids without the class token) and from SPEC's tables; expected feature values come from timm's own
`forward_intermediates` or from a forward written out here, never from the taps.
"""

import pytest
import torch
from torch import nn

from patfast.errors import UserError
from patfast.models.create import create_model
from patfast.models.stages import StageShape, StageTaps

IMG = 64
B = 2


def _maps(channels, img, reductions=(4, 8, 16, 32)):
    return [StageShape("map", c, img // r, img // r) for c, r in zip(channels, reductions)]


def _tokens(channels, grids):
    return [StageShape("tokens", c, g, g) for c, g in zip(channels, grids)]


# Stage shapes at 64 px from the architectures: ResNet-18 64/128/256/512 at strides 4..32, MobileNetV2 24/32/96 and
# a 1280-channel head at 4..32, ConvNeXt-atto 40/80/160/320, DeiT-T 192 wide on a 16-px patch grid (64 / 16 = 4: 16
# tokens, class token excluded), Swin-T 96..768 at strides 4..32, Mixer-S/16 512 wide, ResMLP-12 384 wide.
SMALL = {
    "resnet18": _maps((64, 128, 256, 512), IMG),
    "mobilenetv2_100": _maps((24, 32, 96, 1280), IMG),
    "convnext_atto": _maps((40, 80, 160, 320), IMG),
    "deit_tiny_patch16_224": _tokens((192,) * 4, (4,) * 4),
    "swin_tiny_patch4_window7_224": _tokens((96, 192, 384, 768), (16, 8, 4, 2)),
    "mixer_s16_224": _tokens((512,) * 4, (4,) * 4),
    "resmlp_12_224": _tokens((384,) * 4, (4,) * 4),
}


def _feature_shape(s: StageShape, batch: int = B) -> tuple:
    return (batch, s.channels, s.height, s.width) if s.kind == "map" else (batch, s.height * s.width, s.channels)


def _index(module_name: str) -> int:
    return int(module_name.rpartition(".")[2])


@pytest.mark.parametrize("name", list(SMALL))
def test_stage_shapes_and_features_at_small_size(name):
    model = create_model(name, 10, IMG).eval()
    taps = StageTaps(model, IMG)
    assert taps.stage_shapes == SMALL[name]
    with torch.no_grad():
        model(torch.randn(B, 3, IMG, IMG))
    feats = taps.features()
    assert [tuple(f.shape) for f in feats] == [_feature_shape(s) for s in SMALL[name]]


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "deit_tiny_patch16_224",
                                  "swin_tiny_patch4_window7_224", "mixer_s16_224", "resmlp_12_224"])
def test_stage_features_equal_timm_intermediates(name):
    """Values, not only shapes: the taps' tokens are timm's maps in row-major token order, prefix tokens dropped."""
    model = create_model(name, 10, IMG).eval()
    taps = StageTaps(model, IMG)
    x = torch.randn(B, 3, IMG, IMG)
    isotropic = name.startswith(("deit", "mixer", "resmlp"))
    with torch.no_grad():
        model(x)
        feats = taps.features()
        indices = [_index(n) for n in taps.stage_modules] if isotropic else 4
        ref = model.forward_intermediates(x, indices=indices, intermediates_only=True)  # NCHW, no prefix tokens
    assert len(ref) == 4
    for f, r in zip(feats, ref):
        if f.dim() == 3:
            r = r.flatten(2).transpose(1, 2)
        torch.testing.assert_close(f, r, rtol=0, atol=0)


def test_mobilenetv2_stage_features_by_hand():
    """SPEC section 5: ends of blocks[1], blocks[2], blocks[4]; stage 4 = conv_head + bn2 output, not blocks[6]."""
    model = create_model("mobilenetv2_100", 10, IMG).eval()
    taps = StageTaps(model, IMG)
    assert taps.stage_modules == ["blocks.1", "blocks.2", "blocks.4", "bn2"]
    x = torch.randn(B, 3, IMG, IMG)
    with torch.no_grad():
        model(x)
        feats = taps.features()
        h = model.bn1(model.conv_stem(x))
        outs = []
        for block in model.blocks:
            h = block(h)
            outs.append(h)
        head = model.bn2(model.conv_head(h))
    for f, r in zip(feats, [outs[1], outs[2], outs[4], head]):
        assert torch.equal(f, r)


def test_isotropic_depth_scaling_keeps_the_stage_prompt_pattern():
    """Mixer-S/16 has 8 blocks, not 12: SPEC says scale the indices. Whatever the rounding, the 12-block pattern must
    hold: prompt 1 before block 0, the last stage = the last block, and prompt i+1 on the block right after stage i."""
    model = create_model("mixer_s16_224", 10, IMG)
    assert len(model.blocks) == 8
    taps = StageTaps(model, IMG)
    stages = [_index(n) for n in taps.stage_modules]
    prompts = [_index(n) for n in taps.prompt_points]
    assert all(n.startswith("blocks.") for n in taps.stage_modules + taps.prompt_points)
    assert stages == sorted(set(stages)) and stages[-1] == 7
    assert prompts[0] == 0
    assert prompts[1:] == [s + 1 for s in stages[:3]]


# ----------------------------------------------------------------------------------------------------------------
# prompt points (SPEC section 4)
# ----------------------------------------------------------------------------------------------------------------

# The SPEC table in module names (timm 1.x: Swin's patch merging is layers.i.downsample, so "before stage-i blocks"
# is the input of layers.i.blocks) and the map each prompt receives at 64 px.
PROMPTS = {
    "resnet18": (["layer1", "layer2", "layer3", "layer4"],
                 [(64, 16, 16), (64, 16, 16), (128, 8, 8), (256, 4, 4)]),
    "convnext_atto": (["stages.0", "stages.1", "stages.2", "stages.3"],
                      [(40, 16, 16), (40, 16, 16), (80, 8, 8), (160, 4, 4)]),
    "deit_tiny_patch16_224": (["blocks.0", "blocks.2", "blocks.4", "blocks.10"], [(192, 4, 4)] * 4),
    "swin_tiny_patch4_window7_224": (["layers.0.blocks", "layers.1.blocks", "layers.2.blocks", "layers.3.blocks"],
                                     [(96, 16, 16), (192, 8, 8), (384, 4, 4), (768, 2, 2)]),
    "resmlp_12_224": (["blocks.0", "blocks.2", "blocks.4", "blocks.10"], [(384, 4, 4)] * 4),
    # 8 blocks: the names follow the scaled pattern (test_isotropic_depth_scaling_keeps_the_stage_prompt_pattern)
    "mixer_s16_224": (None, [(512, 4, 4)] * 4),
}


class AddConst(nn.Module):
    """A prompt that adds a constant and records the shapes it was given."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.seen: list[tuple] = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        return x + self.value


def _record_inputs(model, names):
    """Forward pre-hooks registered AFTER the taps' own: they see the input as the prompt left it."""
    modules = dict(model.named_modules())
    seen: dict[int, torch.Tensor] = {}
    for i, n in enumerate(names):
        modules[n].register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach().clone()))
    return seen


def _spatial_mask(x: torch.Tensor, num_prefix: int, rule: str = "first") -> torch.Tensor:
    """True where an entry of a prompt-point input belongs to a spatial position (not a prefix/class token)."""
    mask = torch.ones_like(x, dtype=torch.bool)
    if x.dim() == 3 and num_prefix:
        if rule == "first":
            mask[:, :num_prefix] = False
        else:
            mask[:, -1:] = False
    return mask


@pytest.mark.parametrize("name", list(PROMPTS))
def test_prompt_points_change_exactly_the_tensor_entering_the_stage(name):
    names, maps = PROMPTS[name]
    model = create_model(name, 10, IMG).eval()
    taps = StageTaps(model, IMG)
    if names is not None:
        assert taps.prompt_points == names
    names = taps.prompt_points
    assert [(s.channels, s.height, s.width) for s in taps.prompt_shapes] == maps
    seen = _record_inputs(model, names)
    x = torch.randn(B, 3, IMG, IMG)
    with torch.no_grad():
        model(x)
        clean = dict(seen)
        clean_logits = model(x)
        clean_feats = taps.features()
        for i in range(4):
            add = AddConst(0.5)
            taps.set_prompts([add if j == i else None for j in range(4)])
            # prompts set but prompting off: nothing runs, nothing changes
            assert torch.equal(model(x), clean_logits) and not add.seen
            taps.prompting = True
            try:
                model(x)
            finally:
                taps.prompting = False
            assert add.seen == [(B, *maps[i])]  # called once, on a (B, C, H, W) map without the class token
            for j in range(i):
                assert torch.equal(seen[j], clean[j]), f"prompt {i + 1} changed the input of point {j + 1}"
            diff = seen[i] - clean[i]
            mask = _spatial_mask(diff, taps.num_prefix)
            torch.testing.assert_close(diff[mask], torch.full_like(diff[mask], 0.5), rtol=0, atol=1e-5)
            assert torch.equal(diff[~mask], torch.zeros_like(diff[~mask]))  # the class token is kept aside
            # the change reaches the last stage (logits may not show it: ResMLP's head starts at zero)
            assert not torch.equal(taps.features()[3], clean_feats[3])
        # after all that, an unprompted forward is the clean forward again
        assert torch.equal(model(x), clean_logits)
        for f, c in zip(taps.features(), clean_feats):
            assert torch.equal(f, c)


def test_prompt_points_sit_where_the_spec_says_in_the_forward():
    """What enters each prompt point: ResNet/ConvNeXt prompt 1 = stem (+maxpool) output and prompt i = stage i-1
    output (ConvNeXt: before stage i's downsample); Swin prompt i = the patch-merging output of layers.i-1;
    ViT prompt 1 = after patch + class + position embedding."""
    x = torch.randn(B, 3, IMG, IMG)
    with torch.no_grad():
        for name, first in [("resnet18", lambda m, x: m.maxpool(m.act1(m.bn1(m.conv1(x))))),
                            ("convnext_atto", lambda m, x: m.stem(x))]:
            model = create_model(name, 10, IMG).eval()
            taps = StageTaps(model, IMG)
            seen = _record_inputs(model, taps.prompt_points)
            model(x)
            feats = taps.features()
            assert torch.equal(seen[0], first(model, x))
            for i in range(1, 4):
                assert torch.equal(seen[i], feats[i - 1]), (name, i)

        model = create_model("swin_tiny_patch4_window7_224", 10, IMG).eval()
        taps = StageTaps(model, IMG)
        seen = _record_inputs(model, taps.prompt_points)
        merged = {}
        for i in range(4):
            model.layers[i].downsample.register_forward_hook(lambda m, a, o, i=i: merged.__setitem__(i, o))
        model(x)
        assert torch.equal(seen[0], model.patch_embed(x))
        for i in range(1, 4):
            assert type(model.layers[i].downsample).__name__ == "PatchMerging"
            assert torch.equal(seen[i], merged[i])  # after the merging: stage i's width and grid
            assert seen[i].shape[1:] == (IMG // 2 ** (i + 2), IMG // 2 ** (i + 2), 96 * 2 ** i)

        model = create_model("deit_tiny_patch16_224", 10, IMG).eval()
        taps = StageTaps(model, IMG)
        seen = _record_inputs(model, taps.prompt_points)
        model(x)
        assert seen[0].shape == (B, 1 + 16, 192)
        cls = (model.cls_token + model.pos_embed[:, :1])[0, 0]
        assert torch.equal(seen[0][0, 0], cls) and torch.equal(seen[0][1, 0], cls)


# ----------------------------------------------------------------------------------------------------------------
# class-token rules (SPEC section 6, difference 4)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["first", "last"])
def test_class_token_rule_on_features_and_prompts(rule):
    model = create_model("deit_tiny_patch16_224", 10, IMG).eval()
    taps = StageTaps(model, IMG, class_token=rule)
    assert [s.tokens for s in taps.stage_shapes] == [16] * 4
    raw = {}
    model.blocks[1].register_forward_hook(lambda m, a, o: raw.__setitem__("out", o))
    seen = _record_inputs(model, ["blocks.0"])
    x = torch.randn(B, 3, IMG, IMG)
    with torch.no_grad():
        model(x)
        clean_in = seen[0]
        feat = taps.features()[0]
        assert raw["out"].shape == (B, 17, 192)
        # first: the real class token (index 0) is dropped; last (official): the last patch token is dropped
        assert torch.equal(feat, raw["out"][:, 1:] if rule == "first" else raw["out"][:, :-1])
        taps.set_prompts([AddConst(0.5), None, None, None])
        taps.prompting = True
        model(x)
        taps.prompting = False
    diff = seen[0] - clean_in
    untouched = 0 if rule == "first" else 16  # the token set aside as "class token"
    assert torch.equal(diff[:, untouched], torch.zeros_like(diff[:, untouched]))
    others = [t for t in range(17) if t != untouched]
    torch.testing.assert_close(diff[:, others], torch.full_like(diff[:, others], 0.5), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# user overrides and user errors
# ----------------------------------------------------------------------------------------------------------------


def test_explicit_stage_modules_and_prompt_points_are_used():
    model = create_model("resnet18", 10, IMG).eval()
    taps = StageTaps(model, IMG, stage_modules=["maxpool", "layer1.0", "layer2", "layer3.1"],
                     prompt_points=["layer1.1", "layer2.1", "layer3.1", "layer4.1"])
    assert taps.stage_modules == ["maxpool", "layer1.0", "layer2", "layer3.1"]
    assert taps.prompt_points == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert taps.stage_shapes == [StageShape("map", 64, 16, 16), StageShape("map", 64, 16, 16),
                                 StageShape("map", 128, 8, 8), StageShape("map", 256, 4, 4)]
    # inputs of the second block of each layer: the layer's own width and grid
    assert taps.prompt_shapes == [StageShape("map", 64, 16, 16), StageShape("map", 128, 8, 8),
                                  StageShape("map", 256, 4, 4), StageShape("map", 512, 2, 2)]
    x = torch.randn(B, 3, IMG, IMG)
    got = {}
    model.maxpool.register_forward_hook(lambda m, a, o: got.__setitem__("maxpool", o))
    with torch.no_grad():
        model(x)
        assert torch.equal(taps.features()[0], got["maxpool"])
        adds = [AddConst(0.1) for _ in range(4)]
        taps.set_prompts(adds)
        taps.prompting = True
        model(x)
        taps.prompting = False
    assert [a.seen for a in adds] == [[(B, 64, 16, 16)], [(B, 128, 8, 8)], [(B, 256, 4, 4)], [(B, 512, 2, 2)]]


@pytest.mark.parametrize("kw", [
    {"stage_modules": ["layer1", "layer2", "layer3"]},
    {"stage_modules": ["layer1", "layer2", "layer3", "layer4", "fc"]},
    {"stage_modules": ["layer1", "layer2", "layer3", "layer9"]},
    {"stage_modules": ["layer1", "layer2", "layer3", ""]},
    {"prompt_points": ["layer1", "layer2"]},
    {"prompt_points": ["layer1", "layer2", "layer3", "nope.module"]},
])
def test_bad_overrides_are_user_errors(kw):
    model = create_model("resnet18", 10, IMG)
    with pytest.raises(UserError):
        StageTaps(model, IMG, **kw)


def test_unknown_module_lists_close_names_and_the_defaults():
    model = create_model("resnet18", 10, IMG)
    with pytest.raises(UserError, match=r"^--student-stages: ResNet has no module 'layer9' \(close names: layer1, "
                                        r"layer2, layer3, layer4; names as in model.named_modules\(\)\); the default "
                                        r"stages: --student-stages layer1,layer2,layer3,layer4$"):
        StageTaps(model, IMG, stage_modules=["layer1", "layer2", "layer3", "layer9"], flag="--student-stages")
    with pytest.raises(UserError, match=r"^--teacher-prompt-points: ResNet has no module 'layer2.7' \(close names: "
                                        r"layer2, layer2.0, layer2.1, .*the default prompt points: "
                                        r"--teacher-prompt-points layer1,layer2,layer3,layer4$"):
        StageTaps(model, IMG, prompt_points=["layer1", "layer2.7", "layer3", "layer4"], flag="--teacher-stages")


@pytest.mark.parametrize("kw, message", [
    ({"stage_modules": ["layer4", "layer3", "layer2", "layer1"]},
     "^--teacher-stages: the stages must be in forward order, earliest first, but 'layer3' comes before 'layer4' in "
     "ResNet's forward; e.g. --teacher-stages layer1,layer2,layer3,layer4$"),
    ({"stage_modules": ["layer1", "layer3", "layer2", "layer4"]}, "but 'layer2' comes before 'layer3'"),
    ({"stage_modules": ["layer1", "layer1.0", "layer2", "layer3"]},  # layer1.0's output leaves before layer1's
     "but 'layer1.0' comes before 'layer1' in ResNet's forward; e.g. --teacher-stages layer1.0,layer1,layer2,layer3$"),
    ({"stage_modules": ["layer1", "layer2", "layer2", "layer4"]},
     "^--teacher-stages: module 'layer2' is named twice; name 4 different modules in forward order, earliest first; "
     "the default stages: --teacher-stages layer1,layer2,layer3,layer4$"),
    ({"prompt_points": ["layer2", "layer1", "layer3", "layer4"]},
     "^--teacher-prompt-points: the prompt points must be in forward order, .*e.g. --teacher-prompt-points "
     "layer1,layer2,layer3,layer4$"),
    ({"prompt_points": ["layer1.1", "layer1", "layer3", "layer4"]},  # layer1's input arrives before layer1.1's
     "but 'layer1' comes before 'layer1.1'"),
])
def test_overrides_out_of_forward_order_are_user_errors(kw, message):
    model = create_model("resnet18", 10, IMG)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        StageTaps(model, IMG, flag="--teacher-stages", **kw)


def test_nested_overrides_in_forward_order_are_accepted():
    model = create_model("resnet18", 10, IMG)
    taps = StageTaps(model, IMG, stage_modules=["layer1.0", "layer1", "layer2", "layer3"],
                     prompt_points=["layer1", "layer1.0", "layer2", "layer3"])
    assert taps.stage_modules == ["layer1.0", "layer1", "layer2", "layer3"]
    assert taps.prompt_points == ["layer1", "layer1.0", "layer2", "layer3"]


def test_too_small_images_are_user_errors():
    with pytest.raises(UserError):
        create_model("resnet18", 10, 16)  # the deepest stage reduces 32x
    with pytest.raises(UserError):
        create_model("deit_tiny_patch16_224", 10, 8)  # smaller than one 16-px patch
    model = create_model("deit_tiny_patch16_224", 10, IMG)
    with pytest.raises(UserError):
        StageTaps(model, 32)  # the ViT was built for 64-px images


# ----------------------------------------------------------------------------------------------------------------
# SPEC section 5's table (and section 4's prompt points) at 224
# ----------------------------------------------------------------------------------------------------------------

_ISO_STAGES = ["blocks.1", "blocks.3", "blocks.9", "blocks.11"]
_ISO_PROMPTS = ["blocks.0", "blocks.2", "blocks.4", "blocks.10"]

# name: (stage modules, stage shapes, prompt points, prompt maps (C, H, W) or None where SPEC gives none)
SPEC_224 = {
    "resnet18": (["layer1", "layer2", "layer3", "layer4"], _maps((64, 128, 256, 512), 224),
                 ["layer1", "layer2", "layer3", "layer4"], [(64, 56, 56), (64, 56, 56), (128, 28, 28), (256, 14, 14)]),
    # bottleneck blocks: 4x expansion; the 64-channel stem output enters layer1
    "resnet50": (["layer1", "layer2", "layer3", "layer4"], _maps((256, 512, 1024, 2048), 224),
                 ["layer1", "layer2", "layer3", "layer4"],
                 [(64, 56, 56), (256, 56, 56), (512, 28, 28), (1024, 14, 14)]),
    "mobilenetv2_100": (["blocks.1", "blocks.2", "blocks.4", "bn2"], _maps((24, 32, 96, 1280), 224), None, None),
    "convnext_tiny": (["stages.0", "stages.1", "stages.2", "stages.3"], _maps((96, 192, 384, 768), 224),
                      ["stages.0", "stages.1", "stages.2", "stages.3"],
                      [(96, 56, 56), (96, 56, 56), (192, 28, 28), (384, 14, 14)]),
    "vit_small_patch16_224": (_ISO_STAGES, _tokens((384,) * 4, (14,) * 4), _ISO_PROMPTS, [(384, 14, 14)] * 4),
    "deit_tiny_patch16_224": (_ISO_STAGES, _tokens((192,) * 4, (14,) * 4), _ISO_PROMPTS, [(192, 14, 14)] * 4),
    "swin_tiny_patch4_window7_224": (["layers.0", "layers.1", "layers.2", "layers.3"],
                                     _tokens((96, 192, 384, 768), (56, 28, 14, 7)),
                                     ["layers.0.blocks", "layers.1.blocks", "layers.2.blocks", "layers.3.blocks"],
                                     [(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)]),
    "mixer_b16_224": (_ISO_STAGES, _tokens((768,) * 4, (14,) * 4), _ISO_PROMPTS, [(768, 14, 14)] * 4),
    "resmlp_12_224": (_ISO_STAGES, _tokens((384,) * 4, (14,) * 4), _ISO_PROMPTS, [(384, 14, 14)] * 4),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SPEC_224))
def test_spec_table_at_224(name):
    stages, shapes, points, prompt_maps = SPEC_224[name]
    model = create_model(name, 10, 224).eval()
    taps = StageTaps(model, 224)
    assert taps.stage_modules == stages
    assert taps.stage_shapes == shapes
    if points is not None:
        assert taps.prompt_points == points
        assert [(s.channels, s.height, s.width) for s in taps.prompt_shapes] == prompt_maps
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert [tuple(f.shape) for f in taps.features()] == [_feature_shape(s, 1) for s in shapes]
    if name.startswith(("vit", "deit")):  # 197 tokens per block output, class token first, dropped in features
        assert taps.num_prefix == 1


def test_empty_override_is_a_wrong_count_not_the_defaults():
    model = create_model("resnet18", 10, 32)
    with pytest.raises(UserError, match="exactly 4"):
        StageTaps(model, 32, stage_modules=[])
