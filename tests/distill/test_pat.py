"""PAT mechanics (SPEC sections 1 and 4): losses, the frozen teacher, the AFP feedback loop, prompt stages.

Small random models at 32 px: teacher ConvNeXt-atto (maps) or DeiT-T (tokens), student ResNet-18.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from patfast import ops
from patfast.distill.build import DistillSettings, build_distiller
from patfast.errors import UserError
from patfast.models.create import create_model

IMG = 32


def _kl(target_logits, logits, t=1.0):
    """Independent KL(softmax(target/T) || softmax(logits/T)) summed over classes, batch mean, times T^2."""
    target_logits, logits = target_logits.detach(), logits.detach()
    p = F.softmax(target_logits.double() / t, -1)
    return float((p * (F.log_softmax(target_logits.double() / t, -1) - F.log_softmax(logits.double() / t, -1)))
                 .sum(-1).mean() * t * t)


def _record_teacher(d):
    """Logits of every forward of the timm teacher model, in call order (clean first, then prompted)."""
    outs = []
    d.teacher.model.register_forward_hook(lambda m, a, o: outs.append(o))
    return outs


def _record_prompted(d):
    """Wrap teacher.prompted to keep what it returned (logits, 4 stage features) at each call."""
    calls = []
    real = d.teacher.prompted

    def prompted(x):
        out = real(x)
        calls.append(out)
        return out

    d.teacher.prompted = prompted
    return calls


def _record_aligned(d):
    """Outputs of the 4 aligners at each forward: a list of lists."""
    calls = []

    def hook(i):
        def f(m, a, o):
            if i == 0:
                calls.append([])
            calls[-1].append(o)
        return f

    for i, a in enumerate(d.aligners):
        a.register_forward_hook(hook(i))
    return calls


def _count_calls(modules):
    counts = {k: 0 for k in modules}
    for k, m in modules.items():
        m.register_forward_hook(lambda mod, a, o, k=k: counts.__setitem__(k, counts[k] + 1))
    return counts


def _nonzero(t):
    return t is not None and bool(torch.count_nonzero(t))


# ----------------------------------------------------------------------------------------------------------------
# step 0, feedback, teacher
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher", ["convnext_atto", "deit_tiny_patch16_224"])
def test_step0_no_feedback_and_only_beta_learns(make_pat, make_batch, teacher):
    d = make_pat(teacher=teacher).train()
    assert sorted(d.prompts) == ["1", "2", "3", "4"]
    assert all(p.feedback is None for p in d.prompts.values())
    assert all(p.beta.item() == 0.0 for p in d.prompts.values())
    fusion_calls = _count_calls({k: p.fusion for k, p in d.prompts.items()})
    prompt_calls = _count_calls({k: p.prompt for k, p in d.prompts.items()})
    x, y = make_batch()
    _, losses = d(x, y)
    sum(losses.values()).backward()
    assert all(n == 0 for n in fusion_calls.values())  # no feedback yet: the fusion block is skipped
    assert all(n == 1 for n in prompt_calls.values())  # prompts run once (the prompted forward only)
    for key, block in d.prompts.items():
        assert _nonzero(block.beta.grad), f"prompt {key}: beta got no gradient"
        for name, p in block.named_parameters():
            if name != "beta":
                assert not _nonzero(p.grad), f"prompt {key}: {name} got gradient while beta = 0"
        assert all(p.grad is None for p in block.fusion.parameters())


@pytest.mark.parametrize("teacher", ["convnext_atto", "deit_tiny_patch16_224"])
def test_feedback_is_the_previous_batch_difference_and_feeds_the_next_step(make_pat, make_batch, teacher):
    d = make_pat(teacher=teacher).train()
    prompted = _record_prompted(d)
    aligned = _record_aligned(d)
    fusion_in, fb_in, fb_out = {}, {}, {}
    for k, p in d.prompts.items():
        p.fusion.register_forward_pre_hook(lambda m, a, k=k: fusion_in.__setitem__(k, a[0].detach().clone()))
        if not isinstance(p.fb_align, torch.nn.Identity):
            p.fb_align.register_forward_pre_hook(lambda m, a, k=k: fb_in.__setitem__(k, a[0].detach().clone()))
            p.fb_align.register_forward_hook(lambda m, a, o, k=k: fb_out.__setitem__(k, o.detach().clone()))

    x1, y1 = make_batch(seed=1)
    d(x1, y1)[1]["loss_fd"].backward()
    feats_t = prompted[0][1]
    teacher_shapes = [tuple(f.shape) for f in feats_t]
    assert [tuple(a.shape) for a in aligned[0]] == teacher_shapes  # aligners reach the teacher's stage shapes
    fb1 = {}
    for i in range(1, 5):
        fb = d.prompts[str(i)].feedback
        assert fb is not None and not fb.requires_grad and fb.grad_fn is None
        assert torch.equal(fb, (aligned[0][i - 1] - feats_t[i - 1]).detach())
        fb1[i] = fb.clone()

    x2, y2 = make_batch(seed=2)
    d.zero_grad()
    d(x2, y2)[1]["loss_fd"].backward()
    entry = [s.channels for s in d.teacher.taps.prompt_shapes]
    for i in range(1, 5):
        block = d.prompts[str(i)]
        c = entry[i - 1]
        got = fusion_in[str(i)]
        assert got.shape[1] == 2 * c  # cat[x, aligned feedback]
        fb_map = fb1[i] if fb1[i].dim() == 4 else fb1[i].transpose(1, 2).reshape(
            fb1[i].shape[0], fb1[i].shape[2], *(2 * [math.isqrt(fb1[i].shape[1])]))
        if isinstance(block.fb_align, torch.nn.Identity):  # stage output shape == stage input shape
            assert torch.equal(got[:, c:], fb_map)
        else:  # CNN teacher, stages 2-4: map -> map aligner from the stage output back to the stage input
            assert torch.equal(fb_in[str(i)], fb_map)
            assert torch.equal(got[:, c:], fb_out[str(i)])
            assert got.shape[2] == 2 * fb_map.shape[2]  # the next stage halves the grid: 2x nearest up
        # beta is still 0: the fusion block runs but learns nothing yet
        assert all(not _nonzero(p.grad) for p in block.fusion.parameters())
        # the feedback now holds this step's difference
        assert torch.equal(block.feedback, (aligned[1][i - 1] - prompted[1][1][i - 1]).detach())
        assert not torch.equal(block.feedback, fb1[i])

    with torch.no_grad():
        for p in d.prompts.values():
            p.beta.fill_(0.1)
    d.zero_grad()
    x3, y3 = make_batch(seed=3)
    d(x3, y3)[1]["loss_fd"].backward()
    for i in range(1, 5):
        first = d.prompts[str(i)].fusion[0].weight.grad  # 1x1 conv over cat[x, fb]
        assert _nonzero(first[:, entry[i - 1]:]), f"prompt {i}: the feedback half of the fusion input got no gradient"

    # evaluation does not touch the feedback state
    state = {k: v.clone() for k, v in d.feedback_state().items()}
    d.eval()
    with torch.no_grad():
        d(*make_batch(seed=4))
    assert all(torch.equal(state[k], v) for k, v in d.feedback_state().items())


def test_cnn_teacher_feedback_aligner_maps_stage_outputs_to_stage_inputs(make_pat):
    d = make_pat(teacher="convnext_atto")
    # ConvNeXt-atto at 32 px: stage outputs (40,8,8) (80,4,4) (160,2,2) (320,1,1); stage inputs (40,8,8) for
    # stages 1 and 2 (before stages[1]'s downsample), then (80,4,4), (160,2,2)
    assert isinstance(d.prompts["1"].fb_align, torch.nn.Identity)
    for i, (c_in, c_out, size) in zip((2, 3, 4), [(80, 40, 8), (160, 80, 4), (320, 160, 2)]):
        fa = d.prompts[str(i)].fb_align
        assert fa.conv.in_channels == c_in and fa.conv.out_channels == c_out and fa.conv.bias is None
        assert fa.bn.num_features == c_in
        out = fa(torch.randn(2, c_in, size // 2, size // 2))
        assert out.shape == (2, c_out, size, size)


def test_teacher_is_frozen_eval_and_its_clean_forward_builds_no_graph(make_pat, make_batch):
    d = make_pat().train()
    teacher = d.teacher.model
    assert not any(m.training for m in teacher.modules())
    assert all(m.training for m in d.prompts.modules()) and d.student.training and d.raa.training
    modes = []
    teacher.register_forward_pre_hook(lambda m, a: modes.append([s.training for s in m.modules()]))
    outs = _record_teacher(d)
    x, y = make_batch()
    _, losses = d(x, y)
    sum(losses.values()).backward()
    assert len(outs) == 2
    assert not outs[0].requires_grad and outs[0].grad_fn is None  # clean forward: no graph
    assert outs[1].requires_grad  # prompted forward: graph through the frozen teacher
    assert len(modes) == 2 and not any(any(m) for m in modes)  # eval mode in both forwards
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not any(m.training for m in teacher.modules())


# ----------------------------------------------------------------------------------------------------------------
# the four loss terms (SPEC section 1)
# ----------------------------------------------------------------------------------------------------------------


def test_loss_terms_at_beta_zero(make_pat, make_batch):
    d = make_pat().train()
    outs = _record_teacher(d)
    x, y = make_batch()
    logits, losses = d(x, y)
    assert set(losses) == {"loss_gt", "loss_kd", "loss_fd", "loss_reg"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        clean = d.teacher.model(x)  # the same mean/std: no re-normalisation
    assert torch.equal(outs[0], clean)
    torch.testing.assert_close(losses["loss_kd"], ops.kd_loss(logits, clean))
    assert math.isclose(losses["loss_kd"].item(), _kl(clean, logits), rel_tol=1e-5)
    assert math.isclose(losses["loss_gt"].item(), F.cross_entropy(logits, y, label_smoothing=0.1).item(),
                        rel_tol=1e-6)
    assert losses["loss_fd"].item() > 0
    # beta = 0 (paper variant): the prompted teacher IS the clean teacher
    assert torch.equal(outs[1], outs[0])
    assert abs(losses["loss_reg"].item()) < 1e-6


def test_loss_weights_and_temperatures(make_pat, make_batch):
    d = make_pat(gt_weight=0.5, kd_weight=2.0, fd_weight=3.0, reg_weight=4.0, kd_temperature=2.0).train()
    with torch.no_grad():
        for p in d.prompts.values():
            p.beta.fill_(0.5)
    outs = _record_teacher(d)
    prompted = _record_prompted(d)
    aligned = _record_aligned(d)
    x, y = make_batch()
    logits, losses = d(x, y)
    clean, logits_pt = outs
    assert not torch.equal(logits_pt, clean)  # beta != 0: the prompts act
    assert math.isclose(losses["loss_gt"].item(), 0.5 * F.cross_entropy(logits, y, label_smoothing=0.1).item(),
                        rel_tol=1e-6)
    assert math.isclose(losses["loss_kd"].item(), 2.0 * _kl(clean, logits, t=2.0), rel_tol=1e-5)
    # loss_reg: KL(clean || prompted) at T = 1, whatever the KD temperature
    assert math.isclose(losses["loss_reg"].item(), 4.0 * _kl(clean, logits_pt, t=1.0), rel_tol=1e-4, abs_tol=1e-9)
    fd = sum(ops.hcl_loss(a, f).item() for a, f in zip(aligned[0], prompted[0][1]))  # summed over 4 stages
    assert math.isclose(losses["loss_fd"].item(), 3.0 * fd, rel_tol=1e-5)


def test_hcl_teacher_side_is_not_detached(make_pat, make_batch):
    """loss_fd reaches the prompts through the prompted teacher features (SPEC: F'_T is not detached)."""
    d = make_pat().train()
    x, y = make_batch()
    d(x, y)[1]["loss_fd"].backward()
    assert all(_nonzero(p.beta.grad) for p in d.prompts.values())


# ----------------------------------------------------------------------------------------------------------------
# parameters and prompt stages
# ----------------------------------------------------------------------------------------------------------------


def test_trainable_parameters_exclude_only_the_teacher(make_pat):
    d = make_pat()
    train = d.trainable_parameters()
    ids = [id(p) for p in train]
    assert len(ids) == len(set(ids))
    teacher_ids = {id(p) for p in d.teacher.parameters()}
    assert teacher_ids and not set(ids) & teacher_ids
    expected = {id(p) for m in (d.student, d.raa, d.aligners, d.prompts) for p in m.parameters()}
    assert set(ids) == expected
    assert all(id(p.beta) in ids for p in d.prompts.values())
    assert not any(k.startswith("teacher.") for k in d.trainable_state_dict())
    assert any(k.startswith("student.") for k in d.trainable_state_dict())


def test_afp_stage_subset(make_pat, make_batch, monkeypatch):
    d = make_pat(pat_afp_stage=(1, 3)).train()
    assert sorted(d.prompts) == ["1", "3"]
    taps_prompts = d.teacher.taps.prompts
    assert taps_prompts[0] is d.prompts["1"] and taps_prompts[2] is d.prompts["3"]
    assert taps_prompts[1] is None and taps_prompts[3] is None
    # RAA, aligners and HCL still use all 4 stages
    assert len(d.raa.projectors) == 4 and len(d.aligners) == 4
    calls = []
    real = ops.hcl_loss_stages

    def counting(feats_s, feats_t, **k):
        calls.append(len(feats_s))
        return real(feats_s, feats_t, **k)

    monkeypatch.setattr(ops, "hcl_loss_stages", counting)
    d(*make_batch())
    assert calls == [4]
    assert d.prompts["1"].feedback is not None and d.prompts["3"].feedback is not None
    assert set(d.feedback_state()) == {"1", "3"}


@pytest.mark.parametrize("stages", [(0,), (5,), (1, 2, 3, 4, 5), (-1, 2)])  # () is the "no AFP" ablation
def test_bad_afp_stages_are_user_errors(stages):
    s, t = create_model("resnet18", 10, IMG), create_model("convnext_atto", 10, IMG)
    with pytest.raises(UserError):
        build_distiller("pat", s, t, DistillSettings(pat_afp_stage=stages), img_size=IMG, data_mean=(0.5,) * 3,
                        data_std=(0.25,) * 3)


def test_build_distiller_passes_user_overrides_to_the_taps():
    s, t = create_model("resnet18", 10, IMG), create_model("convnext_atto", 10, IMG)
    stages = ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    t_stages = ["stages.0.blocks.0", "stages.1.blocks.0", "stages.2.blocks.0", "stages.3.blocks.0"]
    points = ["stages.0.blocks", "stages.1.blocks", "stages.2.blocks", "stages.3.blocks"]  # after each downsample
    settings = DistillSettings(student_stages=stages, teacher_stages=t_stages, teacher_prompt_points=points)
    d = build_distiller("pat", s, t, settings, img_size=IMG, data_mean=(0.5,) * 3, data_std=(0.25,) * 3)
    assert d.student_taps.stage_modules == stages
    assert d.teacher.taps.stage_modules == t_stages
    assert d.teacher.taps.prompt_points == points
    # prompts sit after the downsample now: entry shape = stage output shape, no feedback aligner needed
    assert [(p.channels, p.height) for p in d.teacher.taps.prompt_shapes] == [(40, 8), (80, 4), (160, 2), (320, 1)]
    assert all(isinstance(p.fb_align, torch.nn.Identity) for p in d.prompts.values())
    with pytest.raises(UserError):
        build_distiller("pat", create_model("resnet18", 10, IMG), create_model("convnext_atto", 10, IMG),
                        DistillSettings(teacher_prompt_points=["stages.0", "stages.9"]), img_size=IMG,
                        data_mean=(0.5,) * 3, data_std=(0.25,) * 3)


def test_dim_not_divisible_by_heads_is_a_user_error():
    s, t = create_model("resnet18", 10, IMG), create_model("convnext_atto", 10, IMG)
    with pytest.raises(UserError):
        build_distiller("pat", s, t, DistillSettings(pat_dim=100, pat_heads=8), img_size=IMG, data_mean=(0.5,) * 3,
                        data_std=(0.25,) * 3)


# ----------------------------------------------------------------------------------------------------------------
# prompt block layers (SPEC section 4) and whole training steps
# ----------------------------------------------------------------------------------------------------------------


def _conv(m, cin, cout, k, groups=1, padding=0):
    assert isinstance(m, torch.nn.Conv2d), m
    assert (m.in_channels, m.out_channels, m.kernel_size, m.groups) == (cin, cout, (k, k), groups)
    assert m.padding == (padding, padding) and m.stride == (1, 1) and m.bias is not None


def test_prompt_block_layers_follow_spec(make_pat):
    d = make_pat(teacher="convnext_atto")
    for key, c in zip("1234", (40, 40, 80, 160)):  # channels entering ConvNeXt-atto's stages
        block = d.prompts[key]
        f, p = list(block.fusion), list(block.prompt)
        assert len(f) == 5 and len(p) == 5
        _conv(f[0], 2 * c, c, 1)
        _conv(f[1], c, c, 5, padding=2)  # dense
        _conv(f[2], c, c, 1)
        _conv(f[4], c, c, 1)
        _conv(p[0], c, c, 1, groups=4)
        _conv(p[1], c, c, 5, groups=c, padding=2)  # depthwise
        _conv(p[2], c, c, 1)
        _conv(p[4], c, c, 1, groups=4)
        for se in (f[3], p[3]):  # SE(c, r=16): GAP -> 1x1 c -> c/16 -> ReLU -> 1x1 c/16 -> c -> sigmoid
            convs = [m for m in se.modules() if isinstance(m, torch.nn.Conv2d)]
            assert [(m.in_channels, m.out_channels) for m in convs] == [(c, c // 16), (c // 16, c)]
        assert block.beta.shape == () and block.beta.requires_grad


# wide teachers get prompts on their narrow stages only: the dense 5x5 fusion conv has 25 c^2 weights
PAIRS = [
    ("swin_tiny_patch4_window7_224", "resnet18", "official", (1, 2)),
    ("deit_tiny_patch16_224", "deit_tiny_patch16_224", "paper", (1, 2, 3, 4)),
    ("deit_tiny_patch16_224", "mobilenetv2_100", "official", (1, 2, 3, 4)),
    ("mixer_s16_224", "resmlp_12_224", "official", (2,)),
    ("convnext_atto", "swin_tiny_patch4_window7_224", "paper", (1, 2, 3, 4)),
]


@pytest.mark.parametrize("teacher, student, variant, afp", PAIRS,
                         ids=[f"{t.split('_')[0]}-{s.split('_')[0]}-{v}" for t, s, v, _ in PAIRS])
def test_training_steps_run(make_pat, make_batch, teacher, student, variant, afp):
    d = make_pat(teacher=teacher, student=student, img=IMG, variant=variant, pat_afp_stage=afp).train()
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.01)
    betas = []
    for step in range(2):  # step 2 runs the fusion block on step 1's feedback
        x, y = make_batch(seed=step)
        logits, losses = d(x, y, first_batch=step == 0)
        assert logits.shape == (4, 10)
        assert all(torch.isfinite(v) for v in losses.values())
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        betas.append([p.beta.item() for p in d.prompts.values()])
    assert all(b != 0.0 for b in betas[0])  # beta moved after the first step
    assert all(p.feedback is not None for p in d.prompts.values())
    assert all(p.grad is None for p in d.teacher.parameters())
