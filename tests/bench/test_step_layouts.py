"""The recorded HCL / KD inputs of a real PAT step (patfast.bench.step_layouts, step_layouts.json): how they were
made, that a fresh recording still gives them, what they are, and how a layout is rebuilt at another batch size."""

import json

import pytest
import torch

from patfast.bench import step_layouts as S


def test_the_committed_file_says_how_it_was_made_and_covers_every_pair():
    with open(S.DATA_FILE) as f:
        doc = json.load(f)
    made = doc["made_by"]
    assert made["command"].startswith("python benchmarks/record_step_layouts.py")
    assert len(made["commit"].split("+")[0]) == 40 and made["date"] and made["torch"] and made["timm"]
    assert doc["settings"] == {"img_size": 224, "classes": 100, "batch": 2, "variant": "paper",
                               "autocast": "cuda bfloat16", "channels_last": True, "backend": "auto",
                               "aligner_order": "upsample-last"}
    records = S.load()
    assert list(records) == list(S.PAIRS)
    for name, r in records.items():
        assert (r.teacher, r.student) == S.PAIRS[name] and len(r.hcl) == 4 and r.temperature == 1.0
        for s, t in r.hcl:  # HCL gets equal shapes; both sides differentiable (the prompted teacher has a graph)
            assert s.shape == t.shape and s.requires_grad and t.requires_grad
        s, pt, t = r.kd_pair
        assert s.shape == pt.shape == t.shape == (100,) and s.requires_grad and pt.requires_grad
        assert not t.requires_grad  # the clean teacher: no graph


def test_a_fresh_recording_gives_the_committed_file():
    """The Swin-T -> ResNet18 step (the target pair: token teacher, transposed student tokens, a fp32 stage) is
    recorded again and must equal the committed record (so the file can neither go stale nor be hand-edited)."""
    name = "swin_t->resnet18"
    assert S.record_pair(name) == S.load()[name], "re-run python benchmarks/record_step_layouts.py"


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in S.PAIRS if n != "swin_t->resnet18"])
def test_a_fresh_recording_gives_the_committed_file_for_the_other_pairs(name):
    assert S.record_pair(name) == S.load()[name], "re-run python benchmarks/record_step_layouts.py"


def test_what_the_recording_found():
    """The layouts themselves (the report of issue 15 item 5): what the fast path hands HCL and the KL pair."""
    r = S.load()
    swin = r["swin_t->resnet18"]
    for i, (s, t) in enumerate(swin.hcl):  # TokenAligner's (B, C, L) Linear output seen as tokens: channels-first
        length, c = s.shape
        assert (s.dtype, s.strides, t.strides) == ("bfloat16", (1, length), (c, 1))
        assert t.dtype == ("float32" if i == 0 else "bfloat16")  # Swin's stage 1 residual stream stays fp32
    for name in ("convnext_t->deit_t", "resnet50->deit_t"):  # maps: channels_last on both sides
        for s, t in r[name].hcl:
            c, h, w = s.shape
            assert s.strides == t.strides == (1, w * c, c) and s.dtype == "float32"  # MapAligner's upsample: fp32
    assert {t.dtype for _, t in r["resnet50->deit_t"].hcl} == {"bfloat16"}
    vit = r["vit_s->mobilenetv2"]
    for _, t in vit.hcl:  # the teacher's tokens without the class token: a slice, batch stride 197 x 384
        assert (t.batch_stride, t.offset, t.dtype) == (197 * 384, 384, "float32") and not t.contiguous()
    for record in r.values():
        assert all(x.contiguous() and x.dtype == "bfloat16" for x in record.kd_pair)


def test_a_layout_is_rebuilt_at_any_batch_size():
    maps = torch.empty(2, 8, 5, 3).contiguous(memory_format=torch.channels_last)
    tokens = torch.empty(2, 6, 15).transpose(1, 2)  # (B, L, C) tokens, channels-first in memory
    sliced = torch.empty(2, 10, 4)[:, 1:]  # a class token dropped
    for x in (maps, tokens, sliced):
        layout = S.TensorLayout.of(x)
        assert S.TensorLayout.from_json(json.loads(json.dumps(layout.to_json()))) == layout
        for batch in (1, 3):
            y = layout.empty(batch)
            assert y.shape == (batch, *x.shape[1:]) and y.stride() == x.stride() and y.dtype == x.dtype
            assert y.storage_offset() == x.storage_offset()
    assert S.TensorLayout.of(sliced).offset == 4 and S.TensorLayout.of(sliced).batch_stride == 40
    with pytest.raises(ValueError, match="batch axis is not the outermost"):
        S.TensorLayout.of(torch.empty(5, 2, 3).transpose(0, 1))  # (B, L, C) from (L, B, C)


def test_the_emulated_gpu_gives_a_bf16_convolution_cudnn_s_channels_last_output():
    with S.emulated_cuda() as mode:
        x = S._fake(mode, torch.randn(2, 16, 8, 8)).contiguous(memory_format=torch.channels_last)
        w = S._fake(mode, torch.randn(4, 16, 3, 3)).contiguous(memory_format=torch.channels_last)
        with mode:
            y = torch.nn.functional.conv2d(x.bfloat16(), w.bfloat16(), padding=1)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
