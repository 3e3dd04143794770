"""benchmarks/render_results.py builds the document: ratios and fractions of the copy from the same run, the
issues' targets (benchmarks/targets.json: met / not met / not measured / FAILED), and the markdown, where a figure
whose code raised is FAILED with its exception, never "not measured"."""

import pytest
from render_results import data_target, e2e_targets, make_doc, render_md, targets

from patfast.bench.kernels import hcl_case, kd_case, raa_case


def _row(case, mode, provider, ms, **extra):
    nbytes = case.traffic_bytes(mode, 2)
    return {"op": case.op, "case": case.name, "batch": case.batch, "shape": case.shape, "dtype": "bfloat16",
            "mode": mode, "provider": provider, "device": "cuda", "bytes": nbytes, "timer": "do_bench",
            "ms": ms, "gbps": None if ms is None else nbytes / (ms * 1e-3) / 1e9,
            "note": None if ms is not None else "not measured: time budget", **extra}


def _cuda_doc(hcl_ms, kd_graph_ms, launches=(2, 1)):
    hcl = hcl_case("swin_t", 128)
    rows = [_row(hcl, "fwd+bwd", "eager", 60.0), _row(hcl, "fwd+bwd", "compiled", 1.0),
            _row(hcl, "fwd+bwd", "triton", hcl_ms)]
    for k in (100, 1000):
        kd = kd_case("kd_loss_pair", k, 256)
        rows += [_row(kd, "fwd+bwd", "eager", 0.2),
                 _row(kd, "fwd+bwd", "triton", 0.02, ms_graph=kd_graph_ms, launches_fwd=launches[0],
                      launches_bwd=launches[1], kernels_fwd=["_kl_partial_kernel", "_kl_merge_kernel"],
                      kernels_bwd=["_kl_bwd_kernel"])]
    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0"}
    return make_doc(env, {"copy_gbps": 3000.0, "bf16_tflops": 790.0, "device": "NVIDIA H100 80GB HBM3"}, rows)


def test_ratios_and_fraction_of_copy_come_from_the_same_run():
    doc = _cuda_doc(hcl_ms=0.4, kd_graph_ms=0.008)
    tri = next(r for r in doc["kernels"] if r["provider"] == "triton" and r["op"] == "hcl_loss_stages")
    assert tri["vs_eager"] == pytest.approx(150.0) and tri["vs_compiled"] == pytest.approx(2.5)
    # 6 passes x 72,253,440 bf16 elements in 0.4 ms, over a 3000 GB/s copy
    assert tri["bytes"] == 6 * 72_253_440 * 2
    assert tri["frac_copy"] == pytest.approx(6 * 72_253_440 * 2 / 0.4e-3 / 1e9 / 3000)


def _issue3(ts):
    return [t for t in ts if "RAA" not in t["target"]]


def test_targets_met_not_met_and_not_measured():
    met = {t["target"]: t["verdict"] for t in _issue3(targets(_cuda_doc(hcl_ms=0.35, kd_graph_ms=0.008)))}
    assert set(met.values()) == {"met"}, met
    assert len(met) == 9
    slow = _issue3(targets(_cuda_doc(hcl_ms=0.9, kd_graph_ms=0.02, launches=(3, 1))))
    verdicts = [t["verdict"] for t in slow]
    assert verdicts.count("not met") == 6  # 75% of copy, 1.5x compiled, forward launches x2, 10 us x2
    doc = _cuda_doc(hcl_ms=None, kd_graph_ms=None)
    verdicts = {t["target"]: t["verdict"] for t in _issue3(targets(doc))}
    assert [v for k, v in verdicts.items() if "HCL" in k or "10 us" in k] == ["not measured"] * 5
    assert [v for k, v in verdicts.items() if "launch" in k] == ["met"] * 4  # the counts were measured
    assert "time budget" in targets(doc)[0]["figure"]
    md = render_md(doc)
    assert "| not measured (time budget) | **not measured** |" in md
    cpu = make_doc({"gpu": None, "torch": "x", "triton": "x", "cuda": "x"}, None, [])
    assert all(t["figure"] == "not measured (no CUDA GPU in this run)" for t in targets(cpu))
    assert len(targets(cpu)) == 9 + 5


def _raa_doc(core_fwd, core_bwd, block, sdpa_cudnn="measured"):
    """Fake B=128 RAA figures (ms): block = {provider: fwd+bwd ms}; sdpa_cudnn="missing" leaves that row unmeasured."""
    core = raa_case("raa_core", 128)
    rows = [_row(core, "fwd", "triton", core_fwd), _row(core, "fwd+bwd", "triton", 0.05, ms_bwd=core_bwd)]
    blk = raa_case("raa_block", 128)
    for provider, ms in block.items():
        rows.append(_row(blk, "fwd+bwd", provider, ms))
    if sdpa_cudnn == "missing":
        rows[-1]["note"] = "not measured: RuntimeError: No available kernel. Aborting execution."
    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0"}
    return make_doc(env, {"copy_gbps": 3000.0, "bf16_tflops": 790.0}, rows)


def _raa_verdicts(doc):
    return {t["target"].split(": ", 1)[1]: (t["verdict"], t["figure"]) for t in targets(doc) if "RAA" in t["target"]}


def test_raa_targets_met_not_met_and_not_measured():
    fast = {"eager": 1.0, "compiled": 0.5, "sdpa_flash": 0.45, "sdpa_cudnn": 0.4, "triton": 0.3}
    v = _raa_verdicts(_raa_doc(0.012, 0.025, fast))
    assert len(v) == 5 and {x[0] for x in v.values()} == {"met"}, v
    sdpa = next(x for k, x in v.items() if "SDPA" in k)
    assert sdpa[1] == "1.33x (300.0 us vs 400.0 us sdpa_cudnn)"  # against the faster backend
    slow = {"eager": 0.8, "compiled": 0.35, "sdpa_flash": 0.33, "sdpa_cudnn": 0.5, "triton": 0.3}
    v = _raa_verdicts(_raa_doc(0.016, 0.031, slow))
    assert [x[0] for x in v.values()] == ["not met"] * 5, v  # 16 us, 31 us, 2.67x, 1.17x, 1.1x (flash)
    # cuDNN unavailable: judged on flash alone; compiled and backward-alone not measured
    partial = {"eager": 1.0, "sdpa_flash": 0.45, "triton": 0.3, "sdpa_cudnn": None}
    v = _raa_verdicts(_raa_doc(0.012, None, partial, sdpa_cudnn="missing"))
    verdicts = [x[0] for x in v.values()]
    assert verdicts == ["met", "not measured", "met", "not measured", "met"], v
    assert "sdpa_flash" in next(x[1] for k, x in v.items() if "SDPA" in k)
    # neither SDPA backend measured: the verdict says why, per backend
    none = {"eager": 1.0, "triton": 0.3, "sdpa_flash": None, "sdpa_cudnn": None}
    fig = next(x for k, x in _raa_verdicts(_raa_doc(0.012, 0.02, none)).items() if "SDPA" in k)
    assert fig[0] == "not measured" and "sdpa_flash: time budget" in fig[1] and "sdpa_cudnn: time budget" in fig[1]
    md = render_md(_raa_doc(0.012, 0.025, fast))
    assert "## Targets (issues #3 and #4)" in md and "backward <= 30 us" in md


def test_a_row_that_raised_is_failed_in_the_table_the_targets_and_the_failures():
    doc = _cuda_doc(hcl_ms=None, kd_graph_ms=0.008)
    hcl = next(r for r in doc["kernels"] if r["provider"] == "triton" and r["op"] == "hcl_loss_stages")
    hcl.update(error="RuntimeError: CUDA error: an illegal memory access was encountered",
               note="FAILED: RuntimeError: CUDA error: an illegal memory access was encountered")
    kd = next(r for r in doc["kernels"] if r["provider"] == "triton" and r["case"] == "K=1000")
    kd.update(launches_fwd=None, launches_bwd=None, ms_graph=None, launches_error="RuntimeError: profiler broke",
              graph_error="RuntimeError: capture failed")
    doc = make_doc(doc["env"], doc["ceilings"], doc["kernels"])
    assert [(f["what"], f["error"]) for f in doc["failures"]] == [
        ("hcl_loss_stages swin_t B=128 fwd+bwd triton", hcl["error"]),
        ("kd_loss_pair K=1000 B=256 fwd+bwd triton", "launches: RuntimeError: profiler broke"),
        ("kd_loss_pair K=1000 B=256 fwd+bwd triton", "graph: RuntimeError: capture failed")]
    verdicts = {t["target"]: (t["verdict"], t["figure"]) for t in targets(doc)}
    hcl_targets = [v for k, v in verdicts.items() if k.startswith("HCL")]
    assert hcl_targets == [("FAILED", "FAILED: RuntimeError: CUDA error: an illegal memory access was "
                                      "encountered")] * 3
    kd_targets = [v for k, v in verdicts.items() if "K=1000" in k]
    assert kd_targets == [("FAILED", "FAILED: launch count: RuntimeError: profiler broke")] * 2 + [
        ("FAILED", "FAILED: CUDA-graph time: RuntimeError: capture failed")]
    md = render_md(doc)
    assert "## FAILED (3)" in md
    assert "| swin_t | 128 | fwd+bwd | triton | FAILED [" in md
    assert "| 1000 | 256 | fwd+bwd | triton | 20.0 us | FAILED [" in md  # the time was measured, the graph FAILED
    assert "CUDA-graph timing FAILED: RuntimeError: capture failed" in md
    assert "not measured (FAILED" not in md


def test_e2e_targets_are_failed_when_a_path_raised_and_say_why_when_not_measured():
    row = {"pair": "swin_tiny_patch4_window7_224 -> resnet18", "batch": 128, "img_size": 224, "device": "cuda",
           "fast_img_s": None, "reference_img_s": 400.0, "floor_img_s": None, "fast_peak_gb": None,
           "reference_peak_gb": 20.0, "split": {},
           "paths": {"fast": {"note": "FAILED: BackendCompilerFailed: inductor broke",
                              "error": "BackendCompilerFailed: inductor broke"},
                     "reference": {"step_ms": 320.0},
                     "floor": {"note": "not measured: not reached: the e2e_target step was stopped at its time "
                                       "limit (150 s) before this"}}}
    doc = make_doc({"gpu": "NVIDIA H200"}, None, [], e2e=[row])
    verdicts = [(t["verdict"], t["figure"]) for t in e2e_targets(doc)]
    assert verdicts == [("FAILED", "FAILED: fast: BackendCompilerFailed: inductor broke")] * 3
    assert doc["failures"] == [{"section": "e2e", "what": row["pair"],
                                "error": "fast: BackendCompilerFailed: inductor broke"}]
    row["paths"]["fast"] = {"step_ms": 100.0}
    row.update(fast_img_s=1280.0, fast_peak_gb=15.0)
    verdicts = [(t["verdict"], t["figure"]) for t in e2e_targets(make_doc({"gpu": "NVIDIA H200"}, None, [],
                                                                           e2e=[row]))]
    assert verdicts == [("met", "3.20x"), ("not measured", "not measured (floor: not reached: the e2e_target step "
                                                            "was stopped at its time limit (150 s) before this)"),
                        ("met", "15.00 vs 20.00 GiB")]
    md = render_md(make_doc({"gpu": "NVIDIA H200"}, None, [], e2e=[row]))
    assert "| 1280 | 400 | 3.20x | not measured |" in md


def test_the_data_target_is_judged_against_the_compiled_fast_path_of_the_same_pair():
    pair = "swin_tiny_patch4_window7_224 -> resnet18"
    data = {"rows": [{"backend": "gpu", "img_s": 3000.0, "device": "cuda:0"}],
            "step": {"pair": pair, "batch": 128, "img_size": 224, "device": "cuda:0", "img_s": 900.0}}

    def e2e(fast, **kw):
        return [{"pair": pair, "batch": 128, "img_size": 224, "device": "cuda:0", "fast_img_s": fast} | kw]

    assert "2.00x, **met**" in data_target(data, e2e=e2e(1500.0))  # 3000 / 1500, not 3000 / 900 (uncompiled)
    assert "1.20x, **not met**" in data_target(data, e2e=e2e(2500.0))
    for other in (e2e(1500.0, batch=64), e2e(1500.0, device="cpu"), e2e(None), None):
        assert "**not measured** (no compiled fast-path step rate" in data_target(data, e2e=other)
    cpu = {**data, "rows": [{"backend": "gpu", "img_s": 3000.0, "device": "cpu"}]}
    assert "**not measured** (no CUDA GPU in this run)" in data_target(cpu, e2e=e2e(1500.0))
