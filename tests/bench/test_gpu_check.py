"""benchmarks/gpu_check.sh end to end on the CPU: the dry run (every step, Triton through the interpreter), the
budget table, a raising provider FAILED with a non-zero exit, --only keeping the other steps' results, the import
fallback, and the GPU code path with a step that times out."""

import json
import os
import re
import stat
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
STEPS = ["env", "ceilings", "e2e_target", "kernels_hcl", "kernels_raa", "kernels_kd", "gpu_tests", "data",
         "e2e_others"]
TOP_KEYS = {"env", "ceilings", "kernels", "data", "e2e", "gpu_tests", "failures"}
E2E_KEYS = {"pair", "batch", "img_size", "fast_img_s", "reference_img_s", "floor_img_s", "fast_peak_gb",
            "reference_peak_gb", "split"}
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour of the script")

# Injected into every Python of a run (sitecustomize on PYTHONPATH): the Triton HCL op raises, as a broken kernel.
BROKEN_HCL = '''
import importlib.abc, importlib.util, sys


class _BreakHcl(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "patfast.ops":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            real = module.hcl_loss_stages

            def broken(*args, backend="auto", **kwargs):
                if backend == "triton":
                    raise RuntimeError("injected: the Triton HCL kernel broke")
                return real(*args, backend=backend, **kwargs)

            module.hcl_loss_stages = broken

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _BreakHcl())
'''


def run(args, timeout=900, **env):
    env = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def budget_table(text: str) -> dict[str, tuple[int, int]]:
    """step -> (limit s, cumulative s) from the printed budget table; "total" -> (total, 0)."""
    rows = {}
    for m in re.finditer(r"^  (\w+) +(\d+) +(\d+)?", text, flags=re.M):
        rows[m.group(1)] = (int(m.group(2)), int(m.group(3) or 0))
    return rows


def assert_schema(doc):
    assert set(doc) == TOP_KEYS
    assert {"gpu", "torch", "triton", "cuda"} <= set(doc["env"])
    assert {"copy_gbps", "bf16_tflops"} <= set(doc["ceilings"])
    for row in doc["e2e"]:
        assert E2E_KEYS <= set(row), row
    for row in doc["kernels"]:
        assert (row["ms"] is None) == (row["gbps"] is None), row
        if row["ms"] is None:  # never a figure without a measurement; never a failure called "not measured"
            assert row["note"].startswith("FAILED: " if row.get("error") else "not measured: "), row


# ----------------------------------------------------------------------------------------------------------------
# The budget
# ----------------------------------------------------------------------------------------------------------------


def test_the_budget_table_fits_420_s_with_the_install_and_the_start_ups():
    proc = run(["--budget"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = budget_table(proc.stdout)
    assert list(table) == ["install", *STEPS, "overhead", "total"]
    cum = 0
    for name in ["install", *STEPS, "overhead"]:
        limit, cumulative = table[name]
        cum += limit
        assert cumulative == cum, name
    assert table["install"][0] == 30 and table["total"][0] == cum <= 420
    assert table["overhead"][0] >= 5  # the start-ups outside the steps are counted


def test_over_budget_is_refused_and_only_counts_the_selected_steps(tmp_path):
    proc = run(["--budget"], E2E_TARGET_TIMEOUT="200")
    assert proc.returncode == 1 and "over budget: 465 s > 420 s" in proc.stdout
    proc = run(["--budget", "--only", "data,env"], E2E_TARGET_TIMEOUT="200")
    assert proc.returncode == 0 and list(budget_table(proc.stdout)) == ["install", "env", "data", "overhead",
                                                                        "total"]
    out = tmp_path / "out"
    proc = run([str(out), "--dry-run"], TESTS_TIMEOUT="100")  # a dry run fails before running anything
    assert proc.returncode == 1 and "over budget" in proc.stdout
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("args, needle", [([], "usage"), (["--only"], "usage"), (["x", "--nope"], "unknown option"),
                                          (["x", "--only", "kernels"], "unknown step 'kernels'")])
def test_usage_errors_exit_2(args, needle):
    proc = run(args, timeout=60)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


def test_a_non_numeric_limit_is_a_usage_error():
    proc = run(["--budget"], DATA_TIMEOUT="20s")
    assert proc.returncode == 2 and "data must be whole seconds, got '20s'" in proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@cpu_only
def test_gpu_check_dry_run_runs_every_step_and_the_triton_ops_through_the_interpreter(tmp_path):
    out = tmp_path / "out"
    proc = run([str(out), "--dry-run"])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "gpu_check: all steps ran" in proc.stdout and "nothing FAILED" in proc.stdout
    assert budget_table(proc.stdout)["total"][0] <= 420
    assert "Name: timm" in proc.stdout and "Name: setuptools" in proc.stdout  # pip show, in the env step
    # OUTDIR holds a few files only (the GPU machine returns at most 8)
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "inflight", "parts.json", "results.json",
                                                     "results.md"]
    assert list((out / "inflight").iterdir()) == []
    doc = json.loads((out / "results.json").read_text())
    assert_schema(doc)
    assert doc["failures"] == []
    run_info = doc["env"]["gpu_check"]
    assert doc["env"]["gpu"] is None and run_info["dry_run"] is True
    assert [s["step"] for s in run_info["steps"]] == STEPS and {s["status"] for s in run_info["steps"]} == {"ok"}
    assert run_info["patfast_import"].startswith("this checkout")
    target, other = doc["e2e"]
    assert target["fast_img_s"] > 0 and target["reference_img_s"] > 0 and target["floor_img_s"] > 0
    assert target["paths"]["fast"]["ops"] == "triton"  # the fast path's Triton ops through the interpreter
    assert target["split"]["reference"]["student"] > 0 and "dry run" in target["split"]["fast"]["note"]
    assert other["floor_img_s"] > 0  # the second e2e step's loop, on the cheapest path
    rows = doc["data"]["rows"]
    assert [r["backend"] for r in rows] == ["torch", "dali", "gpu"]
    for r in rows:  # a figure, or a reason why not
        assert r["img_s"] is not None or r["note"].startswith("not measured"), r
    assert doc["data"]["step"]["img_s"] > 0  # the dry run times a tiny PAT step on the CPU
    assert doc["ceilings"]["copy_gbps"] > 0 and doc["ceilings"]["device"].startswith("CPU")
    tests = doc["gpu_tests"]  # collected through the report plugin
    assert tests["mode"] == "collect-only" and tests["collected"] > 0 and tests["rc"] == 0
    rows = doc["kernels"]
    assert {r["op"] for r in rows} == {"hcl_loss_stages", "kd_loss_pair", "kd_loss", "raa_block", "raa_core"}
    assert all(r["ms"] > 0 for r in rows if r["provider"] == "eager")
    triton = [r for r in rows if r["provider"] == "triton"]
    # HCL: 4 teachers' same-layout cases + 4 pairs as in the step; KD: 2 x 2 + the pair as in the step; RAA 2
    assert len(triton) == 2 * (4 + 4 + 4 + 1 + 2)
    same = [r for r in triton if r.get("layout") != "as in the step"]
    assert len(same) == 2 * (4 + 4 + 2) and all(r["interpreter_rel_err"] < 1e-4 for r in same)
    # as in the step, bf16 inputs: their bf16 gradients within one bf16 ulp (the interpreter truncates to bf16)
    assert all(r["interpreter_rel_err"] < 2.0**-7 for r in triton)
    md = (out / "results.md").read_text()
    assert "FAILED" not in md.replace("what raised says FAILED", "")
    assert "## Targets" in md and "## Ceilings" in md and "### raa_block" in md
    assert md.index("## End-to-end") < md.index("## Kernels") < md.index("## GPU tests") < md.index("## Data")


@pytest.mark.slow
@cpu_only
def test_a_raising_provider_is_failed_and_only_keeps_the_other_steps(tmp_path):
    out, inject = tmp_path / "out", tmp_path / "inject"
    inject.mkdir()
    proc = run([str(out), "--dry-run", "--only", "ceilings"])
    assert proc.returncode == 0, proc.stdout[-4000:]
    (inject / "sitecustomize.py").write_text(BROKEN_HCL)
    proc = run([str(out), "--dry-run", "--only", "e2e_target,kernels_hcl"], PYTHONPATH=str(inject),
               GPU_CHECK_KERNEL_ARGS="--teacher swin_t", GPU_CHECK_E2E_ARGS="--paths fast,reference --no-split")
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert "=== gpu_check: kernels_hcl FAILED with exit status 1 ===" in proc.stdout
    assert "=== gpu_check: e2e_target FAILED with exit status 1 ===" in proc.stdout
    # the exit summary names every FAILED row, with the exception
    assert ("FAILED: kernels: hcl_loss_stages swin_t B=1 fwd triton: interpreter check: RuntimeError: injected: "
            "the Triton HCL kernel broke") in proc.stdout
    assert "gpu_check: FAILED in this run: e2e_target (exit 1) kernels_hcl (exit 1)" in proc.stdout
    doc = json.loads((out / "results.json").read_text())
    assert_schema(doc)
    (e2e,) = doc["e2e"]  # the fast path's Triton HCL through the interpreter raised; the reference path ran
    assert e2e["paths"]["fast"]["error"] == "RuntimeError: injected: the Triton HCL kernel broke"
    assert e2e["fast_img_s"] is None and e2e["reference_img_s"] > 0
    rows = {(r["mode"], r["provider"]): r for r in doc["kernels"]}
    for mode in ("fwd", "fwd+bwd"):
        assert rows[(mode, "triton")]["error"] == ("interpreter check: RuntimeError: injected: the Triton HCL "
                                                   "kernel broke")
        assert rows[(mode, "eager")]["ms"] > 0 and rows[(mode, "eager")]["frac_copy"] > 0  # run 1's ceilings
    assert doc["ceilings"]["copy_gbps"] > 0  # kept from the first run
    steps = {s["step"]: s for s in doc["env"]["gpu_check"]["steps"]}
    assert (steps["ceilings"]["status"], steps["ceilings"]["run"]) == ("ok", 1)
    assert (steps["kernels_hcl"]["status"], steps["kernels_hcl"]["run"]) == ("FAILED (exit status 1)", 2)
    assert steps["data"]["status"] == "not run"
    md = (out / "results.md").read_text()
    # swin_t->resnet18 as in the step (--teacher swin_t selects it) adds its two HCL Triton rows to the 5
    assert "## FAILED (7)" in md and "| swin_t | 1 | fwd | triton | FAILED [" in md
    assert "| swin_t->resnet18 (as in the step) | 1 | fwd | triton | FAILED [" in md
    assert "| convnext_atto -> resnet10t | 2 | 32 | FAILED |" in md
    assert "not measured: interpreter" not in md


@pytest.mark.slow
@cpu_only
def test_a_failed_install_falls_back_to_pythonpath_and_says_so(tmp_path):
    # The GPU image's setuptools without `wheel` cannot build the editable install: a python whose pip install
    # fails stands for it, and a stale patfast elsewhere on the path for the import that does not resolve here.
    stale = tmp_path / "stale" / "patfast"
    stale.mkdir(parents=True)
    (stale / "__init__.py").write_text("")
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nif [ "$1 $2 $3" = "-m pip install" ]; then\n'
                       f'  echo "error: invalid command \'bdist_wheel\'" >&2; exit 1\nfi\nexec {sys.executable} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    proc = run([str(out), "--dry-run", "--install", "--only", "env"], PYTHON=str(wrapper),
               PYTHONPATH=str(stale.parent))
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "invalid command 'bdist_wheel'" in proc.stdout and "the editable install failed (exit 1)" in proc.stdout
    assert "WARNING: patfast is not installed from this checkout" in proc.stdout
    assert "falling back to PYTHONPATH" in proc.stdout
    assert "all steps ran, patfast imported through the PYTHONPATH fallback" in proc.stdout
    doc = json.loads((out / "results.json").read_text())
    note = doc["env"]["gpu_check"]["patfast_import"]
    assert note.startswith(f"this checkout ({ROOT}) through PYTHONPATH: FALLBACK") and str(stale) in note
    assert doc["env"]["torch"]  # the env step ran with patfast from the checkout
    assert "through PYTHONPATH: FALLBACK" in (out / "results.md").read_text()
    assert "install" in budget_table(proc.stdout) and "(--install)" in proc.stdout


@pytest.mark.slow
@cpu_only
def test_gpu_mode_records_a_timed_out_step_and_still_runs_the_next(tmp_path):
    # The GPU code path of the script (not --dry-run) on the CPU: pytest -m gpu really runs (everything would
    # skip), here killed by a 1 s limit while collecting; the steps after it still run, the others' pairs are not
    # started (past E2E_PAIR_S), and the exit status is 1.
    out = tmp_path / "out"
    proc = run([str(out), "--only", "e2e_target,kernels_kd,gpu_tests,e2e_others"], TESTS_TIMEOUT="1",
               GPU_CHECK_KERNEL_ARGS="--quick", E2E_PAIR_S="100000",
               GPU_CHECK_E2E_ARGS="--dry-run --paths reference --no-split")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "gpu_check: FAILED in this run: gpu_tests (exit 124, timed out after 1 s)" in proc.stdout
    doc = json.loads((out / "results.json").read_text())
    assert_schema(doc)
    steps = {s["step"]: s["status"] for s in doc["env"]["gpu_check"]["steps"]}
    assert steps["gpu_tests"] == "FAILED (timed out at its limit of 1 s, exit 124)"
    assert steps["e2e_target"] == steps["kernels_kd"] == steps["e2e_others"] == "ok"
    assert steps["env"] == "not run"
    assert doc["gpu_tests"]["mode"] == "run" and doc["gpu_tests"]["timed_out"]
    target, *others = doc["e2e"]
    assert target["reference_img_s"] > 0 and len(others) == 2
    assert all("not started: past the budget" in e["note"] and "E2E_PAIR_S=100000" in e["note"] for e in others)
    assert {r["op"] for r in doc["kernels"]} == {"kd_loss_pair", "kd_loss"}
    assert "killed at the step's limit of 1 s" in (out / "results.md").read_text()
