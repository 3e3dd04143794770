"""The kernel bench's cases built from the recorded step (patfast.bench.kernels, "as in the step", beside the
"same layout" ones): their inputs, rows, interpreter check and performance model."""

import pytest
import torch

from patfast.bench import kernel_model
from patfast.bench import kernels as K
from patfast.bench import step_layouts as S


@pytest.mark.parametrize("pair", list(S.PAIRS))
def test_hcl_case_as_in_the_step_builds_exactly_the_recorded_inputs(pair):
    record = S.load()[pair]
    case = K.hcl_step_case(pair, 3)
    assert case.name == f"{pair} (as in the step)" and case.layout == "as in the step" and case.pairs == (pair,)
    for mode in K.MODES:
        (fs, ft), grads = K.make_inputs(case, mode, torch.device("cpu"), torch.float32)  # bench dtype: ignored
        assert len(fs) == len(ft) == 4
        for x, layout in zip(fs + ft, [s for s, _ in record.hcl] + [t for _, t in record.hcl]):
            assert x.shape == (3, *layout.shape) and x.stride() == (layout.batch_stride, *layout.strides)
            assert x.dtype == getattr(torch, layout.dtype) and x.storage_offset() == layout.offset
            assert x.is_leaf and x.requires_grad == (mode == "fwd+bwd") and torch.isfinite(x).all()
            assert (x != 0).float().mean() > 0.99  # filled with random values, never zeros
        assert grads == (fs + ft if mode == "fwd+bwd" else [])


def test_kd_case_as_in_the_step_builds_exactly_the_recorded_logits():
    (case,) = K.kd_step_cases(list(S.PAIRS), 5)  # every pair's logits are alike: one case
    assert case.name == "K=100 (as in the step)" and case.pairs == tuple(S.PAIRS)
    (s, pt, t, temperature), grads = K.make_inputs(case, "fwd+bwd", torch.device("cpu"), torch.float32)
    for x, layout in zip((s, pt, t), S.load()["swin_t->resnet18"].kd_pair):
        assert x.shape == (5, 100) and x.stride() == (layout.batch_stride, *layout.strides)
        assert x.dtype == torch.bfloat16 == getattr(torch, layout.dtype)
    assert grads == [s, pt] and not t.requires_grad and temperature == 1.0


def test_the_default_cases_hold_both_layouts_and_teacher_selects_the_pairs():
    cases = K.build_cases("all", K.teacher_names(), [100, 1000], [64])
    hcl = [c.name for c in cases if c.op == "hcl_loss_stages"]
    assert hcl == ["swin_t", "convnext_t", "resnet50", "vit_s"] + [f"{p} (as in the step)" for p in S.PAIRS]
    assert [c.name for c in cases if c.op == "kd_loss_pair"] == ["K=100", "K=1000", "K=100 (as in the step)"]
    assert {c.layout for c in cases if c.op in K.LAYOUT_OPS} == {"same layout", "as in the step"}
    assert K.hcl_case("vit_s", 2).shapes == ((2, 196, 384),) * 4  # its same-layout case: the recorded shapes
    only = K.build_cases("hcl", ["convnext_t"], [100], [8])
    assert [c.name for c in only] == ["convnext_t", "convnext_t->deit_t (as in the step)"]
    assert not any(K.is_target(c) for c in cases if c.inputs is not None)
    # --classes selects the KD pair as in the step by its recorded K
    assert [c.name for c in K.build_cases("kd", K.teacher_names(), [41], [8]) if c.inputs is not None] == []


def test_rows_as_in_the_step_count_each_tensor_at_its_own_size(tmp_path):
    case = K.hcl_step_case("swin_t->resnet18", 2)
    bench = K.Bench([case, K.hcl_case("swin_t", 2)], cuda=False, compiled=False, compiled_batches=None, quick=True,
                    budget=None, interpret_check=False, env={}, ceilings={}, json_path=None, md_path=None,
                    log=lambda line: None)
    row = bench.rows[(case, "fwd+bwd", "eager")]
    elems = [2 * 3136 * 96, 2 * 784 * 192, 2 * 196 * 384, 2 * 49 * 768]
    read = sum(elems) * 2 + elems[0] * 4 + sum(elems[1:]) * 2  # students bf16; teachers fp32 at stage 1, bf16 after
    assert row["bytes"] == 3 * read and bench.rows[(case, "fwd", "eager")]["bytes"] == read
    assert (row["dtype"], row["layout"], row["pairs"]) == ("bfloat16+float32", "as in the step", ["swin_t->resnet18"])
    assert row["inputs"][0] == "student stage 1: (3136,96) bfloat16 strides (1,3136)"
    assert row["inputs"][4] == "teacher stage 1: (3136,96) float32 strides (96,1)"
    assert bench.rows[(K.hcl_case("swin_t", 2), "fwd", "eager")]["layout"] == "same layout"
    doc = bench.run()
    assert all(r["ms"] > 0 for r in doc["kernels"] if r["provider"] == "eager")


def test_the_interpreter_checks_a_case_as_in_the_step_against_the_fp32_reference():
    case = K.kd_step_cases(["swin_t->resnet18"], 2)[0]
    bench = K.Bench([case], cuda=False, compiled=False, compiled_batches=None, quick=True, budget=None,
                    interpret_check=True, env={}, ceilings={}, json_path=None, md_path=None, log=lambda line: None)
    rows = {(r["mode"], r["provider"]): r for r in bench.run()["kernels"]}
    assert rows[("fwd", "triton")]["interpreter_rel_err"] < 1e-5  # fp32 losses
    # bf16 gradients: within one bf16 ulp (the interpreter truncates fp32 -> bf16)
    assert 0 < rows[("fwd+bwd", "triton")]["interpreter_rel_err"] < K.interpret_tolerance(torch.bfloat16)
    assert "error" not in rows[("fwd+bwd", "triton")]
    assert K.interpret_tolerance(torch.float32) == K.INTERPRET_TOLERANCE
    assert K.interpret_tolerance(torch.bfloat16) == 2.0**-7


def test_the_model_takes_a_case_as_in_the_step_with_its_recorded_layouts(monkeypatch):
    case = K.hcl_step_case("swin_t->resnet18", 128)
    kd = K.kd_step_cases(["swin_t->resnet18"], 128)[0]
    doc = kernel_model.model([case, kd], K.MODES, torch.bfloat16, None, cuda=False, registers=False)
    hcl_row, kd_row = doc["rows"][1], doc["rows"][3]
    assert hcl_row["dtype"] == "bfloat16+float32" and hcl_row["estimate_ms"] >= hcl_row["floor_ms"] > 0
    # the recorded strides and dtypes where perf_model has hcl_launches_for
    assert ("hcl_launches_for" in hcl_row["model_form"]) == hasattr(kernel_model.perf_model, "hcl_launches_for")
    assert kd_row["model_form"] == "perf_model.kd_launches: contiguous logits in the student's dtype"
    assert len(kd_row["launches"]) == 3
    # a perf_model without hcl_launches_for: hcl_launches, contiguous, in the student's dtype (bf16)
    stages = [(3136, 96), (784, 192), (196, 384), (49, 768)]
    launches = kernel_model.perf_model.hcl_launches(stages, 128, torch.bfloat16)
    calls = []
    monkeypatch.setattr(kernel_model.perf_model, "hcl_launches",
                        lambda stages, b, dtype: calls.append((stages, b, dtype)) or launches)
    monkeypatch.delattr(kernel_model.perf_model, "hcl_launches_for", raising=False)
    doc = kernel_model.model([case], ["fwd"], torch.float32, None, cuda=False, registers=False)
    assert calls == [(stages, 128, torch.bfloat16)] and doc["rows"][0]["estimate_ms"] > 0
    assert doc["rows"][0]["model_form"] == "perf_model.hcl_launches: contiguous, both sides in the student's dtype"
