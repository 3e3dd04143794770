"""The kernels' performance model beside the benchmark rows (`patfast bench kernels`, issue 15).

Per (case, mode): patfast.kernels.perf_model's floor and estimate for the Triton provider, its programs, registers
and spills (compile-only builds for the model GPU's arch) and programs resident per SM, and, where the Triton row was
measured, the fraction of the floor reached (floor / measured time). On a GPU: at the run's own cases, with that
GPU's SM count and the copy bandwidth and matmul rate measured by the same run. Without one: at GPU-sized cases
(B = 128 unless --batch, bf16; the caller picks them), on an H200 at ASSUMED figures, and it says so (nothing in it
was measured).
Cases as in the step (inputs in a recorded PAT step's dtypes and layouts, patfast/bench/step_layouts.py) bring their
own dtypes: HCL through perf_model.hcl_launches_for on meta tensors of the recorded strides and dtypes (where
perf_model has it; else hcl_launches, contiguous, both sides in the student's dtype), the KD pair through
kd_launches in the student logits' dtype (it models contiguous logits, which the recorded ones are). Each such row
says which in "model_form".
"""

from __future__ import annotations

import torch

from patfast.kernels import perf_model

ASSUMED = {"copy_gbps": 4300.0, "bf16_tflops": 700.0}  # H200: the measured copy; ~70% of 989 TFLOP/s bf16
NO_MODEL = {"raa_block": "a block of PyTorch ops (LayerNorm, Linear) around raa_core: no single-kernel model"}


def step_form(case) -> str | None:
    """How the model takes a case as in the step (its inputs' recorded layouts); None for a same-layout case."""
    if getattr(case, "inputs", None) is None:
        return None
    if case.op == "hcl_loss_stages":
        return ("perf_model.hcl_launches_for on the recorded strides and dtypes" if hasattr(perf_model,
                "hcl_launches_for") else "perf_model.hcl_launches: contiguous, both sides in the student's dtype")
    return "perf_model.kd_launches: contiguous logits in the student's dtype"


def case_launches(case, mode: str, dtype: torch.dtype) -> list[perf_model.Launch] | None:
    """The launches of the Triton provider for a bench Case (patfast.bench.kernels) in ``mode``; None: no model.
    ``dtype``: the inputs' dtype of a same-layout case; a case as in the step brings its own (see step_form)."""
    inputs = getattr(case, "inputs", None)
    if case.op == "hcl_loss_stages" and inputs is not None:
        n = len(inputs) // 2
        if hasattr(perf_model, "hcl_launches_for"):
            feats = [x.empty(case.batch, "meta") for x in inputs]
            launches = perf_model.hcl_launches_for(feats[:n], feats[n:])
        else:
            launches = perf_model.hcl_launches([s[1:] for s in case.shapes], case.batch, inputs[0].torch_dtype)
    elif case.op == "hcl_loss_stages":
        launches = perf_model.hcl_launches([s[1:] for s in case.shapes], case.batch, dtype)
    elif case.op in ("kd_loss_pair", "kd_loss"):
        b, k = case.shapes[0]
        pair = case.op == "kd_loss_pair"
        launches = perf_model.kd_launches(b, k, dtype if inputs is None else inputs[0].torch_dtype, pair=pair,
                                          grads=2 if pair else 1)
    elif case.op in ("dkd_loss", "dist_loss", "ofa_loss"):
        launches = perf_model.logit_launches(case.op, *case.shapes[0], dtype)
    elif case.op == "raa_core":
        launches = perf_model.raa_core_launches(*case.shapes[0], dtype)
    else:
        return None
    return [x for x in launches if mode != "fwd" or " bwd" not in x.name]


def model_gpu(cuda: bool) -> perf_model.GPU:
    if not cuda:
        return perf_model.H200
    props = torch.cuda.get_device_properties(0)
    return perf_model.GPU(f"{props.name} (sm_{props.major}{props.minor})", sms=props.multi_processor_count,
                          arch=props.major * 10 + props.minor)


def model(cases: list, modes, dtype: torch.dtype, ceilings: dict | None, cuda: bool, rows: list[dict] | None = None,
          registers: bool = True) -> dict:
    """{"about": what it models, "rows": one entry per (case, mode)}: the model of the Triton provider for each
    bench Case in each of ``modes`` ("fwd", "fwd+bwd"), beside the measured Triton row of ``rows`` where there is
    one (its time and the fraction of the floor reached). ``registers``: read registers / spills from compile-only
    builds (about a second per kernel configuration)."""
    gpu = model_gpu(cuda)
    ceilings = ceilings or {}
    measured = bool(cuda and ceilings.get("copy_gbps") and ceilings.get("bf16_tflops"))
    copy, mm = (ceilings["copy_gbps"], ceilings["bf16_tflops"]) if measured else (ASSUMED["copy_gbps"],
                                                                                   ASSUMED["bf16_tflops"])
    triton_rows = {(r["op"], str(r["case"]), r["batch"], r["mode"]): r for r in rows or []
                   if r["provider"] == "triton"}
    plans = [(c, mode, case_launches(c, mode, dtype)) for c in cases for mode in modes]
    note = None
    if registers:
        flat = [x for _, _, launches in plans if launches for x in launches]
        try:
            resolved = iter(_with_resources(flat, gpu.arch))
            plans = [(c, mode, None if launches is None else [next(resolved) for _ in launches])
                     for c, mode, launches in plans]
        except Exception as e:  # noqa: BLE001 (the model without registers is still a model)
            note = f"not read (compile-only build failed: {type(e).__name__}: {str(e)[:200]})"
    out = []
    for c, mode, launches in plans:
        entry = {"op": c.op, "case": c.name, "batch": c.batch, "mode": mode,
                 "dtype": c.dtype_name(dtype) if hasattr(c, "dtype_name") else str(dtype).removeprefix("torch.")}
        if step_form(c):
            entry["model_form"] = step_form(c)
        row = triton_rows.get((c.op, str(c.name), c.batch, mode))
        ms = row.get("ms") if row else None
        if launches is None:
            entry["note"] = NO_MODEL.get(c.op, "no model")
        else:
            rep = perf_model.report(launches, copy, mm, gpu)
            entry.update(floor_ms=rep["floor_us"] / 1e3, estimate_ms=rep["estimate_us"] / 1e3, ms=ms,
                         frac_floor=rep["floor_us"] / 1e3 / ms if ms else None, bytes=rep["bytes"],
                         flops=rep["flops"], launches=rep["launches"])
        out.append(entry)
    source = ("measured by this run" if measured else
              f"ASSUMED {ASSUMED['copy_gbps']:g} GB/s copy and {ASSUMED['bf16_tflops']:g} TFLOP/s bf16 matmul")
    what = "the model of this GPU" if cuda else "a MODEL of an H200, nothing in it measured"
    regs = note or ("from compile-only builds" if registers else "not read (--no-model-registers)")
    about = (f"Performance model (kernels/perf_model.py), {what}: {gpu.name}, {gpu.sms} SMs, {source}, "
             f"{str(dtype).removeprefix('torch.')} inputs (cases as in the step: their recorded dtypes and layouts); "
             f"registers {regs}.")
    return {"about": about, "gpu": gpu.name, "copy_gbps": copy, "matmul_tflops": mm, "assumed": not measured,
            "rows": out}


_CACHE: dict[str, tuple] = {}


def _with_resources(launches: list[perf_model.Launch], arch: int) -> list[perf_model.Launch]:
    """perf_model.with_resources for ``arch``, each distinct build compiled once per process."""
    import dataclasses

    def key(x):
        b = x.build
        return repr((getattr(b["kernel"], "__name__", str(b["kernel"])), sorted(b["signature"].items()),
                     sorted(b["constexprs"].items()), b["num_warps"], b.get("maxnreg"), arch))

    todo = {}
    for x in launches:
        if x.build is not None and key(x) not in _CACHE:
            todo[key(x)] = dataclasses.replace(x, build={**x.build, "arch": arch})
    for k, x in zip(todo, perf_model.with_resources(list(todo.values()))):
        _CACHE[k] = (x.regs, x.spills, x.smem)
    out = []
    for x in launches:
        if x.build is None:
            out.append(x)
        else:
            regs, spills, smem = _CACHE[key(x)]
            out.append(dataclasses.replace(x, regs=regs, spills=spills, smem=smem or 0))
    return out


def _us(ms) -> str:
    return "-" if ms is None else f"{ms * 1e3:.2f}"


def render_text(doc: dict, detail: bool = True) -> str:
    """One line per (case, mode): measured time (where there is one), the model's floor and estimate (us) and the
    fraction of the floor reached; with ``detail`` then per launch programs x warps, registers, spills, programs
    resident per SM (without: fwd+bwd lines only, a pointer to the rest)."""
    out = [doc["about"], "  times in us; 'reached' = floor / measured"
           + ("; per launch: programs x warps, registers per thread, spill bytes, programs resident per SM, the "
              "model's time" if detail else "; fwd+bwd only (every mode and launch: --md PATH)")]
    for e in doc["rows"] if detail else [e for e in doc["rows"] if e["mode"] == "fwd+bwd"]:
        head = f"  {e['op']} {e['case']} B={e['batch']} {e['mode']}:"
        if "floor_ms" not in e:
            out.append(f"{head} {e['note']}")
            continue
        reached = "" if e.get("frac_floor") is None else f", reached {100 * e['frac_floor']:.0f}%"
        measured = "" if e.get("ms") is None else f"measured {_us(e['ms'])}, "
        out.append(f"{head} {measured}model floor {_us(e['floor_ms'])}, model estimate {_us(e['estimate_ms'])}"
                   f"{reached}")
        for x in e["launches"] if detail else []:
            regs = "?" if x["regs"] is None else str(x["regs"])
            spills = "?" if x["spills"] is None else str(x["spills"])
            out.append(f"      {x['name']}: {x['programs']} x {x['num_warps']} warps, {regs} regs, {spills} B "
                       f"spills, {x['resident_per_sm']}/SM, model {x['estimate_us']:.1f} us")
    return "\n".join(out)
