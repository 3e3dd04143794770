"""The performance model beside the kernel benchmark's rows (patfast.bench.kernel_model)."""

import pytest
import torch

from patfast.bench import kernel_model
from patfast.bench.kernels import MODES, hcl_case, kd_case, raa_case


def _triton_row(case, mode, ms):
    return {"op": case.op, "case": case.name, "batch": case.batch, "mode": mode, "provider": "triton", "ms": ms}


def test_floor_is_the_traffic_model_over_the_copy_and_a_measured_row_gets_its_fraction():
    case = kd_case("kd_loss_pair", 1000, 256)
    doc = kernel_model.model([case], MODES, torch.bfloat16, None, cuda=False,
                             rows=[_triton_row(case, "fwd+bwd", 0.004)], registers=False)
    fwd, both = doc["rows"]
    assert (fwd["mode"], both["mode"]) == ("fwd", "fwd+bwd")
    bytes_floor = case.traffic_bytes("fwd+bwd", 2)  # 8 passes of B x K: the bench's own traffic model
    copy_ms = bytes_floor / (kernel_model.ASSUMED["copy_gbps"] * 1e9) * 1e3
    # plus the O(B x chunks) statistics between the launches: 2.5% here
    assert copy_ms <= both["floor_ms"] <= 1.03 * copy_ms
    assert both["frac_floor"] == pytest.approx(both["floor_ms"] / 0.004)
    assert fwd["ms"] is None and fwd["frac_floor"] is None
    assert [x["name"] for x in fwd["launches"]] == ["kd fwd: per-chunk statistics", "kd fwd: merge (one program)"]
    assert "registers not read (--no-model-registers)" in doc["about"] and doc["assumed"]


def test_every_bench_op_has_a_model_or_says_why_not():
    cases = [hcl_case("convnext_t", 64), kd_case("kd_loss", 100, 64), kd_case("dist_loss", 100, 64),
             raa_case("raa_core", 64), raa_case("raa_block", 64)]
    doc = kernel_model.model(cases, MODES, torch.bfloat16, None, cuda=False, registers=False)
    for e in doc["rows"]:
        if e["op"] == "raa_block":
            assert "no single-kernel model" in e["note"]
        else:
            assert e["estimate_ms"] >= e["floor_ms"] > 0 and e["launches"], e
    text = kernel_model.render_text(doc)
    assert text.startswith(doc["about"]) and "hcl map (96, 56, 56) bwd" in text


def test_a_failing_compile_only_build_leaves_a_model_without_registers(monkeypatch):
    def broken(launches):
        raise RuntimeError("no ptxas")

    monkeypatch.setattr(kernel_model.perf_model, "with_resources", broken)
    kernel_model._CACHE.clear()
    doc = kernel_model.model([raa_case("raa_core", 8)], MODES, torch.bfloat16, None, cuda=False)
    assert "registers not read (compile-only build failed: RuntimeError: no ptxas)" in doc["about"]
    assert all(x["regs"] is None for e in doc["rows"] for x in e["launches"])
