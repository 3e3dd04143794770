"""results.json and results.md of a benchmark run: environment, ceilings, kernel rows beside their baselines, the
issues' targets (benchmarks/targets.json), the end-to-end step, the data loaders, the GPU tests.

results.json, exactly these keys:
    {"env": {"gpu", "torch", "triton", "cuda", ...},
     "ceilings": {"copy_gbps", "bf16_tflops", ...},            (measured in the same run; null = not measured)
     "kernels": [{"op", "shape", "dtype", "mode", "provider", "ms", "gbps", ...}, ...],
     "data": {"rows": [...], "step": {...}} or null,          (patfast bench data: loader img/s, PAT step rate)
     "e2e": [{"pair", "batch", "img_size", "fast_img_s", "reference_img_s", "floor_img_s", "fast_peak_gb",
              "reference_peak_gb", "split": {...}}, ...],      (patfast bench train, one per pair)
     "gpu_tests": {"mode", "passed", "failed", ...} or null,  (pytest -m gpu, written by gpu_check.sh)
     "failures": [{"section", "what", "error"}, ...]}         (everything that raised: FAILED, see record.py)
A figure that was not measured is null in the JSON and "not measured" in the markdown, with the reason; one whose
code raised is null and "FAILED", with the exception (patfast/bench/record.py). benchmarks/gpu_check.py builds the
document of a gpu_check.sh run from its steps. Each section's table is the benchmark's own (patfast.bench.tables,
.train, .data); what is judged here is the targets.

    python benchmarks/render_results.py RESULTS_JSON [--md PATH]   results.md of a results.json (or of the --json of
                                                                   `patfast bench kernels`), to stdout or PATH
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from patfast.bench import num
from patfast.bench.record import FAILED, row_failures
from patfast.bench.tables import SDPA_BASES, derive, fmt_ms, fmt_range
from patfast.bench.tables import section as kernel_section

TARGETS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets.json")


def load_targets(path: str = TARGETS_PATH) -> dict:
    """The targets (benchmarks/targets.json): per subject its issue and figures."""
    with open(path) as f:
        return json.load(f)


TARGETS = load_targets()


# ----------------------------------------------------------------------------------------------------------------
# Building the document
# ----------------------------------------------------------------------------------------------------------------


def make_doc(env: dict, ceilings: dict | None, kernels: list[dict], gpu_tests: dict | None = None,
             e2e: list | None = None, data: dict | None = None) -> dict:
    ceilings = dict(ceilings or {})
    ceilings.setdefault("copy_gbps", None)
    ceilings.setdefault("bf16_tflops", None)
    doc = {"env": env, "ceilings": ceilings, "kernels": [dict(r) for r in kernels], "data": data,
           "e2e": list(e2e or []), "gpu_tests": gpu_tests}
    derive(doc["kernels"], doc["ceilings"])
    doc["failures"] = failures(doc)
    return doc

def failures(doc: dict) -> list[dict]:
    """Everything in the document that raised (FAILED), each {"section", "what", "error"}."""
    from patfast.bench.train import failures as e2e_failures

    out = [{"section": "ceilings", "what": what, "error": e} for what, e in
           (("ceilings", doc["ceilings"].get("error")), ("copy", doc["ceilings"].get("copy_error")),
            ("bf16 matmul", doc["ceilings"].get("matmul_error"))) if e]
    for r in doc["kernels"]:
        what = f"{r['op']} {r.get('case')} B={r.get('batch')} {r['mode']} {r['provider']}"
        out += [{"section": "kernels", "what": what, "error": e} for e in row_failures(r)]
    data = doc.get("data") or {}
    for r in [*(data.get("rows") or []), *([data["step"]] if data.get("step") else [])]:
        what = f"{r['backend']} loader" if "backend" in r else f"PAT step rate {r.get('pair')}"
        out += [{"section": "data", "what": what, "error": e} for e in row_failures(r)]
    for r in doc.get("e2e") or []:
        out += [{"section": "e2e", "what": r["pair"], "error": e} for e in row_failures(r) + e2e_failures(r)]
    tests = doc.get("gpu_tests") or {}
    out += [{"section": "gpu_tests", "what": f["test"], "error": f"{f['when']}: {f['message']}"}
            for f in tests.get("failures") or []]
    return out

# ----------------------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------------------


def _find(doc: dict, provider: str, **match) -> dict | None:
    for r in doc["kernels"]:
        if r["provider"] == provider and all(r.get(k) == v for k, v in match.items()):
            return r
    return None

def targets(doc: dict, t: dict | None = None) -> list[dict]:
    """The kernel targets (``t``: targets.json), each {"target", "figure", "verdict": "met" | "not met" |
    "not measured" | "FAILED"}."""
    t = t or TARGETS
    out = []

    def add(target: str, value, ok, figure: str, why_missing: str):
        if value is not None:
            out.append({"target": target, "figure": figure, "verdict": "met" if ok else "not met"})
        elif FAILED in why_missing:
            out.append({"target": target, "figure": why_missing, "verdict": FAILED})
        else:
            out.append({"target": target, "figure": f"not measured ({why_missing})", "verdict": "not measured"})

    def missing(row: dict | None, what: str, error_key: str | None = None) -> str:
        if row is None or row.get("device") != "cuda":
            return "case not in this run" if doc["env"].get("gpu") else "no CUDA GPU in this run"
        if row.get("ms") is None:
            return (row.get("note") or "not measured").removeprefix("not measured: ")
        if error_key and row.get(error_key):
            return f"{FAILED}: {what}: {row[error_key]}"
        return f"{what} not measured"

    h = t["hcl"]
    match = {k: h[k] for k in ("op", "case", "batch", "mode")}
    hcl = f"HCL {h['mode']}, {h['label']} 4 stages, B={h['batch']}, bf16"
    tri = _find(doc, "triton", **match)
    cuda_tri = tri if tri and tri.get("device") == "cuda" else None
    frac = cuda_tri.get("frac_copy") if cuda_tri else None
    add(f"{hcl}: >= {100 * h['min_frac_copy']:g}% of measured copy bandwidth (6-pass model)", frac,
        frac is not None and frac >= h["min_frac_copy"],
        f"{100 * frac:.1f}% ({num(cuda_tri['gbps'])} GB/s of {num(doc['ceilings']['copy_gbps'])})" if frac else "",
        missing(tri, "copy bandwidth"))
    for base in ("eager", "compiled"):
        need = h[f"min_vs_{base}"]
        ratio = cuda_tri.get(f"vs_{base}") if cuda_tri else None
        base_row = _find(doc, base, **match)
        add(f"{hcl}: >= {need:g}x the {'eager' if base == 'eager' else 'torch.compile'} reference", ratio,
            ratio is not None and ratio >= need,
            f"{ratio:.2f}x ({fmt_ms(cuda_tri['ms'])} vs {fmt_ms(base_row['ms'])})" if ratio else "",
            missing(tri, "") if tri is None or tri.get("ms") is None or tri.get("device") != "cuda"
            else missing(base_row, "baseline"))
    kd = t["kd"]
    # forward 2 launches since issue 15 (per-chunk statistics, then one deterministic merge), backward 1
    want_launches = kd["launches"]
    if not isinstance(want_launches, dict):
        want_launches = dict.fromkeys(("fwd", "bwd"), want_launches)
    for k in kd["classes"]:
        match = {"op": kd["op"], "case": f"K={k}", "batch": kd["batch"], "mode": kd["mode"]}
        row = _find(doc, "triton", **match)
        cuda_row = row if row and row.get("device") == "cuda" else None
        name = f"KD pair, B={kd['batch']}, K={k}"
        for way in ("fwd", "bwd"):
            n = cuda_row.get(f"launches_{way}") if cuda_row else None
            kernels = ", ".join(cuda_row.get(f"kernels_{way}") or []) if cuda_row else ""
            want = want_launches[way]
            launches = "one launch" if want == 1 else f"{want} launches"
            add(f"{name}: {launches} {'forward' if way == 'fwd' else 'backward'}", n, n == want,
                f"{n} ({kernels})" if n is not None else "", missing(row, "launch count", "launches_error"))
        ms = cuda_row.get("ms_graph") if cuda_row else None
        stream = f"; {fmt_ms(cuda_row['ms'])} per call on a stream (do_bench)" if cuda_row and cuda_row.get(
            "ms") else ""
        add(f"{name}: fwd+bwd <= {kd['max_graph_ms'] * 1e3:g} us (CUDA-graph replay: GPU time without host gaps)",
            ms, ms is not None and ms <= kd["max_graph_ms"], f"{fmt_ms(ms)}{stream}" if ms is not None else "",
            missing(row, "CUDA-graph time", "graph_error"))
    _raa_targets(doc, t["raa"], add, missing)
    return out


def _raa_targets(doc: dict, t: dict, add, missing) -> None:
    """RAA (targets.json "raa"): core forward and backward-alone times; the whole block's fwd+bwd against the eager
    and compiled references and the faster SDPA composition. Appends through ``add``."""
    b, issue = t["batch"], f"issue #{t['issue']}"
    core = f"RAA core, q/k/v ({b}, 8, 64, 64), bf16"
    fwd = _find(doc, "triton", op="raa_core", batch=b, mode="fwd")
    ms = fwd.get("ms") if fwd and fwd.get("device") == "cuda" else None
    add(f"{core}: forward <= {t['core_max_fwd_ms'] * 1e3:g} us ({issue})", ms,
        ms is not None and ms <= t["core_max_fwd_ms"], fmt_range(fwd) if ms is not None else "",
        missing(fwd, "forward time"))
    both = _find(doc, "triton", op="raa_core", batch=b, mode="fwd+bwd")
    ms = both.get("ms_bwd") if both and both.get("device") == "cuda" else None
    add(f"{core}: backward <= {t['core_max_bwd_ms'] * 1e3:g} us (backward alone, {issue})", ms,
        ms is not None and ms <= t["core_max_bwd_ms"], fmt_range(both, "ms_bwd") if ms is not None else "",
        missing(both, "backward-alone time", "bwd_error"))
    block = f"RAA whole block fwd+bwd, tokens ({b}, 64, 512), bf16"
    tri = _find(doc, "triton", op="raa_block", batch=b, mode="fwd+bwd")
    cuda_tri = tri if tri and tri.get("device") == "cuda" and tri.get("ms") is not None else None
    for base, need in t["block_min_vs"].items():  # sdpa: the faster of flash / cuDNN
        ratio = cuda_tri.get(f"vs_{base}") if cuda_tri else None
        if base == "sdpa":
            name = "faster SDPA composition (front + flash or cuDNN SDPA)"
            best = cuda_tri.get("sdpa_best") if cuda_tri else None
            base_row = _find(doc, best, op="raa_block", batch=b, mode="fwd+bwd") if best else None
            rows = [_find(doc, p, op="raa_block", batch=b, mode="fwd+bwd") for p in SDPA_BASES]
            why = "; ".join(f"{p}: {missing(r, 'baseline')}" for p, r in zip(SDPA_BASES, rows))
        else:
            name = "eager reference" if base == "eager" else "torch.compile reference"
            base_row = _find(doc, base, op="raa_block", batch=b, mode="fwd+bwd")
            why = missing(base_row, "baseline")
            best = None
        if cuda_tri is None:
            why = missing(tri, "")
        add(f"{block}: >= {need:g}x the {name} ({issue})", ratio, ratio is not None and ratio >= need,
            f"{ratio:.2f}x ({fmt_ms(cuda_tri['ms'])} vs {fmt_ms(base_row['ms'])}"
            f"{' ' + best if best else ''})" if ratio else "", why)


def e2e_targets(doc: dict, t: dict | None = None) -> list[dict]:
    """The end-to-end targets (targets.json "e2e"): fast path >= N x the reference path's img/s, >= a fraction of the
    floor's, peak memory <= the reference path's; judged on the GPU row of that pair, batch and size."""
    t = (t or TARGETS)["e2e"]
    row = next((e for e in doc.get("e2e") or [] if e["pair"] == t["pair"] and e.get("batch") == t["batch"]
                and e.get("img_size") == t["img_size"]), None)
    on_gpu = row is not None and str(row.get("device", "")).startswith("cuda")
    checks = [(f"fast path >= {t['min_fast_vs_reference']:g}x the reference path's img/s", ("fast", "reference"),
               "img_s", t["min_fast_vs_reference"], "x"),
              (f">= {100 * t['min_fast_vs_floor']:g} % of the floor's img/s", ("fast", "floor"), "img_s",
               t["min_fast_vs_floor"], "%"),
              ("peak memory <= the reference path's" if t["max_peak_vs_reference"] == 1 else
               f"peak memory <= {t['max_peak_vs_reference']:g}x the reference path's", ("reference", "fast"),
               "peak_gb", 1 / t["max_peak_vs_reference"], "GiB")]
    out = []
    for target, (a, b), unit_key, need, unit in checks:
        ka, kb = f"{a}_{unit_key}", f"{b}_{unit_key}"
        if not on_gpu or not row.get(ka) or not row.get(kb):
            paths = (row or {}).get("paths") or {}
            errors = [f"{p}: {paths[p]['error']}" for p in (a, b) if paths.get(p, {}).get("error")]
            if errors:
                out.append({"target": target, "figure": f"{FAILED}: " + "; ".join(errors), "verdict": FAILED})
                continue
            notes = [f"{p}: {paths[p]['note'].removeprefix('not measured: ')}" for p in (a, b)
                     if on_gpu and paths.get(p, {}).get("note")]
            why = ("no CUDA GPU in this run" if not doc["env"].get("gpu") else "the pair was not run" if row is None
                   else "; ".join(notes) if notes else (row.get("note") or "").removeprefix("not measured: ")
                   if on_gpu else "the pair ran on the CPU")
            out.append({"target": target, "figure": f"not measured ({why})", "verdict": "not measured"})
            continue
        ratio = row[ka] / row[kb]
        figure = {"x": f"{ratio:.2f}x", "%": f"{ratio:.0%}",
                  "GiB": f"{row['fast_peak_gb']:.2f} vs {row['reference_peak_gb']:.2f} GiB"}[unit]
        out.append({"target": target, "figure": figure, "verdict": "met" if ratio >= need else "not met"})
    return out


def data_target(data: dict, t: dict | None = None, e2e: list | None = None) -> str:
    """The data target (targets.json "data"): the gpu backend's img/s over the step rate of the COMPILED fast path
    (issue 15: the e2e step's "fast" figure for the same pair, batch and size, on a GPU); the data step's own
    uncompiled step rate (its 20 s budget leaves no time to compile) is shown beside it, not judged."""
    targets = t or TARGETS
    t = targets["data"]
    rows, step = data.get("rows") or [], data.get("step") or {}
    need = t["min_vs_step"]
    pair = str(step.get("pair", "")).replace(" ", "")
    fast = next((e for e in e2e or [] if str(e.get("pair", "")).replace(" ", "") == pair
                 and e.get("batch") == step.get("batch") and e.get("img_size") == step.get("img_size")
                 and str(e.get("device", "")).startswith("cuda") and e.get("fast_img_s")), None)
    what = f"Target ({t['backend']} backend >= {need:g}x the compiled fast path's step img/s"
    gpu_rows = [r for r in rows if r["backend"] == t["backend"] and r["img_s"] and r["device"].startswith("cuda")]
    if gpu_rows and fast:
        ratio = gpu_rows[0]["img_s"] / fast["fast_img_s"]
        return (f"{what} ({fast['fast_img_s']:.0f} img/s, e2e step), issue #{t['issue']}): {ratio:.2f}x, "
                f"**{'met' if ratio >= need else 'not met'}**")
    why = "no CUDA GPU in this run" if not gpu_rows else "no compiled fast-path step rate of this pair, batch and size"
    return f"{what}, on a GPU, issue #{t['issue']}): **not measured** ({why})"


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------


SECTIONS = ("env", "failures", "ceilings", "e2e", "kernels", "targets", "gpu_tests", "data", "steps")


def render_md(doc: dict, sections=SECTIONS) -> str:
    """The markdown of a document, most important first: what FAILED, the ceilings, the end-to-end step, the
    kernels and their targets, the GPU tests, the data loaders, the gpu_check.sh steps."""
    out: list[str] = []
    for name in sections:
        out += _SECTION[name](doc)
    return "\n".join(out)


def _env_section(doc: dict) -> list[str]:
    env = doc["env"]
    gpu = env.get("gpu")
    run = env.get("gpu_check") or {}
    title = gpu or "CPU, no CUDA GPU" + (" (gpu_check.sh --dry-run: tiny sizes, code paths only)"
                                         if run.get("dry_run") else "")
    out = [f"# patfast benchmarks: {title}", "",
           "Every figure was measured in this run, on this machine, each beside its baselines from the same run; "
           "what was not measured says so, with the reason; what raised says FAILED, with the exception.", "",
           "| | |", "|---|---|"]
    gpu_cell = gpu or "none (CPU)"
    if gpu and env.get("gpu_capability"):
        gpu_cell += f" (sm {env['gpu_capability']}, {env.get('gpu_sms')} SMs, {env.get('gpu_memory_gib')} GiB)"
    for name, value in (("GPU", gpu_cell), ("torch", env.get("torch")), ("triton", env.get("triton")),
                        ("CUDA", env.get("cuda")), ("python", env.get("python")),
                        ("patfast", env.get("patfast")), ("patfast imported from", run.get("patfast_import")),
                        ("timm", env.get("timm")), ("setuptools / wheel / pip",
                                                    " / ".join(str(env.get(k)) for k in ("setuptools", "wheel", "pip"))
                                                    if env.get("setuptools") else None),
                        ("CPU threads", env.get("cpu_threads")), ("date", env.get("date"))):
        out.append(f"| {name} | {value if value is not None else 'unknown'} |")
    return out + [""]


def _failures_section(doc: dict) -> list[str]:
    failed = doc.get("failures") or []
    if not failed:
        return []
    out = [f"## {FAILED} ({len(failed)})", "", "| section | what | error |", "|---|---|---|"]
    out += [f"| {f['section']} | {f['what']} | {f['error']} |" for f in failed]
    return out + [""]


def _ceilings_section(doc: dict) -> list[str]:
    ceilings = doc["ceilings"]
    out = ["## Ceilings (measured in this run)", ""]
    where = ceilings.get("device") or "device unknown"
    copy_how = ceilings.get("copy_error") and f"{FAILED}: {ceilings['copy_error']}" or "not measured"
    matmul_how = ceilings.get("matmul_error") and f"{FAILED}: {ceilings['matmul_error']}" or "not measured"
    if ceilings.get("copy_gbps") is not None:
        moved = ceilings.get("copy_bytes_moved")
        copy_how = (f"`dst.copy_(src)`: {moved / 2**30:.3f} GiB read + written" if moved else "`dst.copy_(src)`") \
            + (f" / median {fmt_ms(ceilings['copy_ms'])}" if ceilings.get("copy_ms") else "") + f" ({where})"
    if ceilings.get("bf16_tflops") is not None:
        n = ceilings.get("matmul_n", "n")
        matmul_how = f"{n}^3 `torch.mm` on random data: 2n^3" + (
            f" / median {fmt_ms(ceilings['matmul_ms'])}" if ceilings.get("matmul_ms") else "") + f" ({where})"
    copy, rate = ceilings.get("copy_gbps"), ceilings.get("bf16_tflops")
    out += ["| ceiling | value | how |", "|---|---|---|",
            f"| device-to-device copy | {num(copy) + ' GB/s' if copy is not None else num(copy)} | {copy_how} |",
            f"| bf16 matmul | {num(rate) + ' TFLOP/s' if rate is not None else num(rate)} | {matmul_how} |", ""]
    if ceilings.get("note"):
        out += [ceilings["note"], ""]
    if ceilings.get("timer"):
        out += [f"Timer: {ceilings['timer']}.", ""]
    return out


def _e2e_section(doc: dict) -> list[str]:
    out = ["## End-to-end train step (`patfast bench train`)", ""]
    if not doc.get("e2e"):
        return out + ["not measured (the e2e steps did not run or wrote nothing)", ""]
    from patfast.bench.train import render as render_e2e

    out += [render_e2e(doc["e2e"]), ""]
    out += [f"- {e['pair']}: {e['note']}" for e in doc["e2e"] if e.get("note")]
    t = TARGETS["e2e"]
    out += ["", f"| target (issue #{t['issue']}, {t['label']}, {t['img_size']}, B {t['batch']}, GPU) | measured | "
            "verdict |", "|---|---|---|"]
    out += [f"| {t['target']} | {t['figure']} | **{t['verdict']}** |" for t in e2e_targets(doc)]
    return out + [""]


def _targets_section(doc: dict) -> list[str]:
    issues = [f"#{n}" for n in sorted({TARGETS[k]["issue"] for k in ("hcl", "kd", "raa")})]
    named = issues[0] if len(issues) == 1 else f"s {', '.join(issues[:-1])} and {issues[-1]}"
    out = [f"## Targets (issue{named if len(issues) > 1 else ' ' + named})", "", "| target | measured | verdict |",
           "|---|---|---|"]
    out += [f"| {t['target']} | {t['figure']} | **{t['verdict']}** |" for t in targets(doc)]
    return out + [""]


def _gpu_tests_section(doc: dict) -> list[str]:
    out = ["## GPU tests (`pytest -m gpu`)", "", _gpu_tests_line(doc.get("gpu_tests")), ""]
    failed = (doc.get("gpu_tests") or {}).get("failures") or []
    out += [f"- {FAILED} ({f['when']}): `{f['test']}`: {f['message']}" for f in failed]
    return out + ([""] if failed else [])


def _data_section(doc: dict) -> list[str]:
    out = ["## Data loaders (`patfast bench data`)", ""]
    data = doc.get("data")
    if not data:
        return out + ["not measured (the data step did not run or wrote nothing)", ""]
    from patfast.bench.data import render

    out.append(render(data.get("rows") or [], data.get("step")))
    return out + ([data_target(data, e2e=doc.get("e2e"))] if data.get("step") else []) + [""]


def _steps_section(doc: dict) -> list[str]:
    run = doc["env"].get("gpu_check") or {}
    steps = run.get("steps")
    if not steps:
        return []
    out = ["## gpu_check.sh steps", "", "| step | status | seconds | limit s | run |", "|---|---|---|---|---|"]
    for s in steps:
        out.append(f"| {s['step']} | {s.get('status', s.get('rc'))} | {s.get('seconds', '-')} | "
                   f"{s.get('limit', '-')} | {s.get('run', '-')} |")
    runs = run.get("runs") or []
    if runs:
        out += ["", "Runs (the last column above): " + "; ".join(
            f"#{i} {r.get('date')} {r.get('mode')}{' --only ' + r['only'] if r.get('only') else ''}, budget "
            f"{r.get('budget_s')} s, patfast from {r.get('patfast_import')}" for i, r in enumerate(runs, 1))]
    return out + [""]


_SECTION = {"env": _env_section, "failures": _failures_section, "ceilings": _ceilings_section,
            "e2e": _e2e_section, "kernels": lambda doc: kernel_section(doc["kernels"]), "targets": _targets_section,
            "gpu_tests": _gpu_tests_section, "data": _data_section, "steps": _steps_section}


def _gpu_tests_line(t: dict | None) -> str:
    if not t:
        return "not run"
    if t.get("note"):
        return t["note"]
    if t.get("mode") == "collect-only":
        return (f"dry run: collected {t.get('collected', 'unknown')} GPU tests, none run (no CUDA); "
                f"collection exit status {t.get('rc')}")
    counts = ", ".join(f"{t[k]} {k}" for k in COUNTS if t.get(k) or k in ("passed", "failed"))
    ran = sum(t.get(k) or 0 for k in COUNTS)
    of = f" of {t['collected']} collected" if t.get("collected") is not None else ""
    if t.get("timed_out"):
        head = f"killed at the step's limit of {t.get('timeout_s')} s"
    elif not t.get("finished"):
        head = f"pytest ended early (exit status {t.get('rc')})"
    else:
        head = f"exit status {t.get('rc')}"
    if t.get("running"):
        head += f", while running `{t['running']}`"
    if t.get("collected") is not None and ran < t["collected"] and not t.get("finished"):
        head += f"; {t['collected'] - ran} not run"
    extra = f" in {t['seconds']:.1f} s" if t.get("seconds") is not None else ""
    return f"{counts}{of}{extra} ({head}; `{t.get('command') or 'pytest -m gpu'}`)"


# ----------------------------------------------------------------------------------------------------------------
# pytest -m gpu results
# ----------------------------------------------------------------------------------------------------------------

COUNTS = ("passed", "failed", "errors", "skipped", "xfailed", "xpassed")


def parse_gpu_tests(rc: int | None, report_path: str | None, collect_only: bool, timeout_s: float | None = None,
                    seconds: float | None = None) -> dict:
    """The GPU tests' outcome from the report benchmarks/pytest_report.py keeps (rewritten after every test, so it
    holds the counts of what ran, and the test that was running, even when pytest was killed), with the exit
    status ``rc`` of the step (124 / 137: killed at ``timeout_s``; None: the run ended without a record)."""
    out: dict = {"mode": "collect-only" if collect_only else "run", "rc": rc, "timed_out": rc in (124, 137),
                 "timeout_s": timeout_s, "collected": None, **dict.fromkeys(COUNTS), "running": None,
                 "failures": [], "finished": False, "seconds": seconds, "command": None}
    report = None
    if report_path and os.path.exists(report_path):
        try:
            with open(report_path) as f:
                report = json.load(f)
        except ValueError:
            report = None
    if report is None:
        out["note"] = (f"no counts: pytest was killed at the step's limit of {timeout_s} s before it wrote its report"
                       if out["timed_out"] else f"no report: pytest ended (exit status {rc}) before it started, or "
                       "could not load the benchmarks/pytest_report.py plugin")
        return out
    for key in ("collected", *COUNTS, "running", "failures", "finished", "command"):
        out[key] = report.get(key, out[key])
    if seconds is None:
        out["seconds"] = report.get("seconds")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/render_results.py", description=__doc__.split("\n")[0])
    parser.add_argument("json", metavar="RESULTS_JSON", help="a results.json, or the --json of `patfast bench kernels`")
    parser.add_argument("--md", default=None, metavar="PATH", help="write the markdown here (default: stdout)")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        got = json.load(f)
    doc = make_doc(got.get("env") or {}, got.get("ceilings"), got.get("kernels") or [], got.get("gpu_tests"),
                   got.get("e2e"), got.get("data"))
    text = render_md(doc)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    else:
        print(text)
    return 1 if doc["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
