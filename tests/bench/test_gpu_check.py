"""benchmarks/gpu_check.sh --dry-run end to end, `patfast bench kernels` on the CPU, and the results writer."""

import json
import os
import subprocess
import sys

import pytest
import torch

from patfast.bench.kernels import NO_CUDA, NO_CUDA_SDPA, hcl_case, kd_case, raa_case
from patfast.bench.results import make_doc, parse_gpu_tests, render_md, targets
from patfast.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
TOP_KEYS = {"env", "ceilings", "kernels", "data", "e2e", "gpu_tests"}
ROW_KEYS = {"op", "shape", "dtype", "mode", "provider", "ms", "gbps"}
E2E_KEYS = {"pair", "batch", "img_size", "fast_img_s", "reference_img_s", "floor_img_s", "fast_peak_gb",
            "reference_peak_gb", "split"}
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (reference-only) behaviour")


def assert_user_error(code, err, needle):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("patfast: error: "), err
    assert needle in lines[0], err


def assert_schema(doc):
    assert set(doc) == TOP_KEYS
    assert {"gpu", "torch", "triton", "cuda"} <= set(doc["env"])
    assert {"copy_gbps", "bf16_tflops"} <= set(doc["ceilings"])
    for row in doc["e2e"]:
        assert E2E_KEYS <= set(row), row
        if row["fast_img_s"] is None:
            assert row["note"].startswith("not measured"), row
    assert doc["kernels"]
    for row in doc["kernels"]:
        assert ROW_KEYS <= set(row), row
        assert (row["ms"] is None) == (row["gbps"] is None), row
        if row["ms"] is None:
            assert row["note"].startswith("not measured"), row  # never a figure without a measurement


# ----------------------------------------------------------------------------------------------------------------
# gpu_check.sh
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@cpu_only
def test_gpu_check_dry_run_writes_results(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", SCRIPT, str(out), "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "gpu_check: all steps ran" in proc.stdout
    doc = json.loads((out / "results.json").read_text())
    assert_schema(doc)
    assert doc["env"]["gpu"] is None and doc["env"]["gpu_check"]["dry_run"] is True
    assert [s["step"] for s in doc["env"]["gpu_check"]["steps"]] == ["env", "ceilings", "gpu_tests", "kernels",
                                                                      "data", "e2e"]
    (e2e,) = doc["e2e"]  # the dry run's one tiny pair, all three paths timed, the split profiled
    assert e2e["fast_img_s"] > 0 and e2e["reference_img_s"] > 0 and e2e["floor_img_s"] > 0
    assert set(e2e["split"]) == {"fast", "reference"} and e2e["split"]["fast"]["student"] > 0
    rows = doc["data"]["rows"]
    assert [r["backend"] for r in rows] == ["torch", "dali", "gpu"]
    for r in rows:  # a figure, or a reason why not
        assert r["img_s"] is not None or r["note"].startswith("not measured"), r
    assert doc["data"]["step"]["img_s"] > 0  # the dry run times a tiny PAT step on the CPU
    assert all(s["rc"] == 0 for s in doc["env"]["gpu_check"]["steps"])
    assert doc["ceilings"]["copy_gbps"] > 0 and doc["ceilings"]["bf16_tflops"] > 0
    assert doc["ceilings"]["device"].startswith("CPU")
    assert doc["gpu_tests"]["mode"] == "collect-only" and doc["gpu_tests"]["collected"] > 0
    rows = doc["kernels"]
    assert {r["op"] for r in rows} == {"hcl_loss_stages", "kd_loss_pair", "kd_loss", "raa_block", "raa_core"}
    sdpa = [r for r in rows if r["provider"].startswith("sdpa_")]
    assert len(sdpa) == 8 and all(r["ms"] is None and r["note"] == f"not measured: {NO_CUDA_SDPA}" for r in sdpa)
    assert {r["case"] for r in rows if r["op"] == "hcl_loss_stages"} == {"swin_t", "convnext_t", "resnet50"}
    assert all(r["ms"] > 0 for r in rows if r["provider"] == "eager")
    triton = [r for r in rows if r["provider"] == "triton"]
    assert all(r["ms"] is None and NO_CUDA in r["note"] for r in triton)
    assert all(r["interpreter_rel_err"] < 1e-4 for r in triton)  # the harness ran each case through Triton
    md = (out / "results.md").read_text()
    assert "not measured" in md and "## Targets" in md and "## Ceilings" in md
    assert "### raa_block" in md and "RAA core, q/k/v (128, 8, 64, 64), bf16: forward <= 15 us" in md
    assert (out / "gpu_check.log").exists()


@pytest.mark.slow
@cpu_only
def test_gpu_check_real_mode_records_a_failing_test_step_and_still_benchmarks(tmp_path):
    # The GPU code path of the script (not --dry-run) on the CPU: pytest -m gpu really runs (everything skips),
    # here cut off by a 1 s limit to stand for a failing step; the kernel step must still run and write results.
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, TESTS_TIMEOUT="1", GPU_CHECK_KERNEL_ARGS="--quick --op kd",
               GPU_CHECK_DATA_ARGS="--img-size 32 --batch-size 16 --batches 2 --workers 0",
               GPU_CHECK_E2E_ARGS="--dry-run --paths reference --no-split", E2E_BUDGET="0")
    proc = subprocess.run(["bash", SCRIPT, str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "steps that failed: gpu_tests (exit 124, timed out after 1 s)" in proc.stdout
    doc = json.loads((out / "results.json").read_text())
    assert_schema(doc)
    steps = {s["step"]: s["rc"] for s in doc["env"]["gpu_check"]["steps"]}
    assert steps == {"env": 0, "ceilings": 0, "gpu_tests": 124, "kernels": 0, "data": 0, "e2e": 0}
    # the first pair always starts (here a tiny dry-run stand-in); the others come after E2E_BUDGET = 0 s
    assert [e["reference_img_s"] is not None for e in doc["e2e"]] == [True, False, False]
    assert "past E2E_BUDGET=0 s" in doc["e2e"][1]["note"]
    assert doc["data"]["step"]["img_s"] is None  # no GPU: the PAT step rate is not measured
    assert doc["gpu_tests"]["mode"] == "run" and doc["gpu_tests"]["timed_out"]
    assert {r["op"] for r in doc["kernels"]} == {"kd_loss_pair", "kd_loss"}
    assert "timed out after 150" not in (out / "results.md").read_text()
    assert "timed out after 1" in (out / "results.md").read_text()


def test_gpu_check_without_outdir_is_a_usage_error():
    proc = subprocess.run(["bash", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# patfast bench kernels
# ----------------------------------------------------------------------------------------------------------------


@cpu_only
def test_bench_kernels_quick_on_cpu_is_reference_only(tmp_path, capsys):
    path = tmp_path / "kernels.json"
    code = main(["bench", "kernels", "--quick", "--json", str(path), "--md", str(tmp_path / "k.md")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert NO_CUDA in out  # says reference-only, and why
    doc = json.loads(path.read_text())
    assert_schema(doc | {"gpu_tests": None})
    assert {r["case"] for r in doc["kernels"] if r["op"] == "hcl_loss_stages"} == {"swin_t"}
    assert {r["batch"] for r in doc["kernels"]} == {1}
    for r in doc["kernels"]:
        assert (r["ms"] is not None) == (r["provider"] == "eager"), r
    assert "not measured" in (tmp_path / "k.md").read_text()


@cpu_only
def test_bench_kernels_op_raa_on_cpu(tmp_path, capsys):
    path = tmp_path / "kernels.json"
    code = main(["bench", "kernels", "--op", "raa", "--json", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert NO_CUDA in out and NO_CUDA_SDPA in out
    rows = json.loads(path.read_text())["kernels"]
    assert {r["op"] for r in rows} == {"raa_block", "raa_core"} and {r["batch"] for r in rows} == {1}
    assert {r["provider"] for r in rows if r["ms"] is not None} == {"eager"}
    assert all(r["ms_bwd"] > 0 for r in rows if r["provider"] == "eager" and r["mode"] == "fwd+bwd")


@pytest.mark.parametrize("argv, needle", [
    (["bench", "kernels", "--op", "nope"], "invalid choice: 'nope'"),
    (["bench", "kernels", "--op", "raa", "--batch", "-1"], "--batch must be comma-separated positive integers"),
    (["bench", "kernels", "--batch", "64,x"], "--batch must be comma-separated positive integers"),
    (["bench", "kernels", "--batch", "0"], "--batch must be comma-separated positive integers"),
    (["bench", "kernels", "--teacher", "vit"], "unknown teacher vit"),
    (["bench", "nothing"], "invalid choice: 'nothing'"),
    (["bench", "kernels", "--ceilings", "/nonexistent/ceilings.json", "--op", "kd"], "cannot read ceilings"),
])
def test_bench_mistakes_are_one_line_errors(capsys, argv, needle):
    code = main(argv)
    _, err = capsys.readouterr()
    assert_user_error(code, err, needle)


def test_bench_bad_op_from_the_command_line_exits_2():
    proc = subprocess.run([sys.executable, "-m", "patfast", "bench", "kernels", "--op", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("patfast: error: "), proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# results.py: ratios, targets, pytest counts
# ----------------------------------------------------------------------------------------------------------------


def _row(case, mode, provider, ms, **extra):
    nbytes = case.traffic_bytes(mode, 2)
    return {"op": case.op, "case": case.name, "batch": case.batch, "shape": case.shape, "dtype": "bfloat16",
            "mode": mode, "provider": provider, "device": "cuda", "bytes": nbytes, "timer": "do_bench",
            "ms": ms, "gbps": None if ms is None else nbytes / (ms * 1e-3) / 1e9,
            "note": None if ms is not None else "not measured: time budget", **extra}


def _cuda_doc(hcl_ms, kd_graph_ms, launches=(1, 1)):
    hcl = hcl_case("swin_t", 128)
    rows = [_row(hcl, "fwd+bwd", "eager", 60.0), _row(hcl, "fwd+bwd", "compiled", 1.0),
            _row(hcl, "fwd+bwd", "triton", hcl_ms)]
    for k in (100, 1000):
        kd = kd_case("kd_loss_pair", k, 256)
        rows += [_row(kd, "fwd+bwd", "eager", 0.2),
                 _row(kd, "fwd+bwd", "triton", 0.02, ms_graph=kd_graph_ms, launches_fwd=launches[0],
                      launches_bwd=launches[1], kernels_fwd=["_kl_fwd_kernel"], kernels_bwd=["_kl_bwd_kernel"])]
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
    slow = _issue3(targets(_cuda_doc(hcl_ms=0.9, kd_graph_ms=0.02, launches=(2, 1))))
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


def test_gpu_test_counts_from_junit_and_from_the_log(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text('<testsuites><testsuite name="pytest" tests="5" failures="1" errors="0" skipped="1" '
                     'time="12.5"><testcase classname="tests.kernels.test_hcl" name="test_a"><failure/>'
                     '</testcase></testsuite></testsuites>')
    t = parse_gpu_tests(1, None, str(junit), collect_only=False)
    assert (t["passed"], t["failed"], t["errors"], t["skipped"]) == (3, 1, 0, 1)
    assert t["failures"] == ["tests.kernels.test_hcl::test_a"]
    log = tmp_path / "log"
    log.write_text("FAILED tests/kernels/test_kd.py::test_b - AssertionError\n2 failed, 30 passed in 50.1s\n")
    t = parse_gpu_tests(1, str(log), str(tmp_path / "missing.xml"), collect_only=False)
    assert (t["passed"], t["failed"]) == (30, 2) and t["failures"] == ["tests/kernels/test_kd.py::test_b"]
    log.write_text("32/529 tests collected (497 deselected) in 4.42s\n")
    assert parse_gpu_tests(0, str(log), None, collect_only=True)["collected"] == 32
    assert parse_gpu_tests(124, None, None, collect_only=False, timeout_s=180)["timed_out"]
