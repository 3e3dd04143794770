"""gpu_check's store (benchmarks/gpu_check.py): each step's output moves from inflight/ into parts.json with its
exit status; a step rerun (--only) replaces its own part and keeps the others; rows a killed step never reached
say why; what a killed run left in inflight/ is folded in by the next merge."""

import argparse
import json

import gpu_check

from patfast.bench import data as bench_data
from patfast.bench.record import NOT_REACHED, write_json

ORDER = ["env", "ceilings", "e2e_target", "kernels_hcl", "kernels_raa", "kernels_kd", "gpu_tests", "data",
         "e2e_others"]
CEILINGS = {"copy_gbps": 2000.0, "bf16_tflops": 700.0, "device": "NVIDIA H200"}


def kernel_row(provider, ms, note=None, **extra):
    return {"op": "kd_loss", "case": "K=100", "batch": 256, "shape": [256, 100], "dtype": "bfloat16", "mode": "fwd",
            "provider": provider, "device": "cuda", "ms": ms, "gbps": None if ms is None else 1.0, "note": note,
            **extra}


def step(out, name, part, rc=0, limit=25, run="r1"):
    """What gpu_check.sh does for one step: the step writes inflight/<name>.json, then merge."""
    (out / "inflight").mkdir(parents=True, exist_ok=True)
    if part is not None:
        write_json(part, str(out / "inflight" / f"{name}.json"))
    return gpu_check.merge(str(out), name, {"rc": rc, "seconds": 3, "limit": limit},
                           {"id": run, "mode": "gpu", "patfast_import": "this checkout"}, ORDER)


def test_a_rerun_step_replaces_its_part_and_keeps_the_others(tmp_path):
    out = tmp_path / "out"
    step(out, "env", {"gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0"})
    step(out, "ceilings", CEILINGS)
    step(out, "kernels_kd", {"kernels": [kernel_row("eager", 0.2), kernel_row("triton", None, "FAILED: "
                                         "RuntimeError: boom", error="RuntimeError: boom")]}, rc=1)
    doc = json.loads((out / "results.json").read_text())
    assert [f["what"] for f in doc["failures"]] == ["kernels_kd", "kd_loss K=100 B=256 fwd triton"]
    # --only kernels_kd in a second run: its part is replaced, env and ceilings stay from the first run
    doc = step(out, "kernels_kd", {"kernels": [kernel_row("eager", 0.2), kernel_row("triton", 0.01)]}, run="r2")
    assert doc["ceilings"]["copy_gbps"] == 2000.0 and doc["env"]["gpu"] == "NVIDIA H200"
    assert doc["failures"] == []
    tri = next(r for r in doc["kernels"] if r["provider"] == "triton")
    assert tri["vs_eager"] == 20.0 and tri["frac_copy"] == 1.0 / 2000.0  # the first run's ceilings
    steps = {s["step"]: s for s in doc["env"]["gpu_check"]["steps"]}
    assert [s["step"] for s in doc["env"]["gpu_check"]["steps"]] == ORDER
    assert (steps["env"]["run"], steps["kernels_kd"]["run"], steps["data"]["status"]) == (1, 2, "not run")
    assert len(doc["env"]["gpu_check"]["runs"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["inflight", "parts.json", "results.json", "results.md"]
    assert list((out / "inflight").iterdir()) == []  # moved into the store
    md = (out / "results.md").read_text()
    assert "| kernels_kd | ok | 3 | 25 | 2 |" in md and "| data | not run |" in md


def test_rows_a_killed_step_never_reached_say_why(tmp_path):
    out = tmp_path / "out"
    rows = [kernel_row("eager", 0.2), kernel_row("triton", None, NOT_REACHED)]
    doc = step(out, "kernels_kd", {"env": {"gpu": "NVIDIA H200"}, "kernels": rows}, rc=124, limit=25)
    assert doc["env"]["gpu"] == "NVIDIA H200"  # no env step ran: the kernel step's environment
    tri = next(r for r in doc["kernels"] if r["provider"] == "triton")
    assert tri["note"] == ("not measured: not reached: the kernels_kd step was stopped at its time limit (25 s) "
                           "before this")
    assert next(r for r in doc["kernels"] if r["provider"] == "eager")["ms"] == 0.2  # measured before the kill
    assert doc["failures"][0] == {"section": "steps", "what": "kernels_kd",
                                  "error": "FAILED (timed out at its limit of 25 s, exit 124)"}
    e2e = [{"pair": "a -> b", "batch": 128, "img_size": 224, "device": "cuda", "fast_img_s": 900.0,
            "reference_img_s": None, "floor_img_s": None, "fast_peak_gb": 9.0, "reference_peak_gb": None,
            "split": {}, "paths": {"fast": {"step_ms": 142.0}, "reference": {"note": NOT_REACHED}}}]
    (out / "inflight" / "e2e_target_1.json").write_text(json.dumps(e2e))
    doc = gpu_check.merge(str(out), "e2e_target", {"rc": 1, "seconds": 80, "limit": 150})
    (row,) = doc["e2e"]
    assert row["fast_img_s"] == 900.0
    assert row["paths"]["reference"]["note"] == ("not measured: not reached: the e2e_target step ended with exit "
                                                 "status 1 before this")


def test_a_run_killed_mid_step_is_folded_in_by_the_next_merge(tmp_path):
    out = tmp_path / "out"
    step(out, "ceilings", CEILINGS)
    args = argparse.Namespace(data="digits", split="train", img_size=224, batch_size=128, workers=16,
                              auto_augment="", batches=30)
    rows = [bench_data.new_row(args, "torch", "cuda"), bench_data.new_row(args, "gpu", "cuda")]
    rows[0].update(img_s=5000.0, setup_s=0.5, note=None)
    data = {"env": {}, "data": rows, "step": {"pair": "a -> b", "batch": 128, "img_size": 224, "img_s": None,
                                              "note": NOT_REACHED}}
    write_json(data, str(out / "inflight" / "data.json"))  # the data step was running when the run was killed
    (out / "inflight" / "data.json.tmp").write_text("{half a fi")  # and mid-write
    doc = gpu_check.merge(str(out))  # what the next run does first
    assert doc["data"]["rows"][0]["img_s"] == 5000.0
    assert doc["data"]["rows"][1]["note"] == ("not measured: not reached: the gpu_check run ended during the data "
                                              "step, before this")
    steps = {s["step"]: s for s in doc["env"]["gpu_check"]["steps"]}
    assert steps["data"]["status"].startswith("FAILED (no exit status")
    assert steps["ceilings"]["status"] == "ok"
    assert list((out / "inflight").iterdir()) == []


def test_e2e_rows_for_pairs_that_did_not_run(tmp_path):
    path = tmp_path / "e2e_others_{n}.json"
    assert gpu_check.main(["e2e-row", "--pair", "a,b", "--pair", "c,d", "--why", "not reached",
                           "--json", str(path)]) == 0
    (row,) = json.loads((tmp_path / "e2e_others_2.json").read_text())
    assert row["pair"] == "c -> d" and row["note"] == NOT_REACHED
    gpu_check.main(["e2e-row", "--pair", "a,b", "--failed", "bench train exited with status 1", "--json",
                    str(tmp_path / "x.json")])
    (row,) = json.loads((tmp_path / "x.json").read_text())
    assert row["error"] == "bench train exited with status 1" and row["note"].startswith("FAILED: ")
