"""results.json and results.md: environment, ceilings, kernel rows beside their baselines, the issue's targets.

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
code raised is null and "FAILED", with the exception. patfast/bench/gpu_check.py builds the document of a
gpu_check.sh run from its steps.
"""

from __future__ import annotations

import datetime
import json
import os

from patfast.bench import num
from patfast.bench.record import FAILED, row_failures

KERNEL_OPS = {
    "hcl_loss_stages": "HCL summed over the 4 stages of a teacher at 224 (PAT's loss_fd)",
    "kd_loss_pair": "PAT's KL pair: kd(s, t, T) and reg(pt, t, 1), T = 1",
    "kd_loss": "plain KD, T = 1",
    "raa_block": "region-aware attention, whole block: LayerNorm -> q / kv Linear -> +pos -> 8-head attention",
    "raa_core": "region-aware attention core alone: softmax(q k^T / sqrt(hd)) v, q, k, v (B, 8, 64, 64)",
}
RAA_OPS = ("raa_block", "raa_core")
SDPA_BASES = ("sdpa_flash", "sdpa_cudnn")
# The targets of issue #3 (items 6-7).
HCL_TARGET = {"op": "hcl_loss_stages", "case": "swin_t", "batch": 128, "mode": "fwd+bwd"}
KD_TARGET_BATCH = 256
KD_TARGET_MS = 0.010
# The targets of issue #4 (RAA), at B = 128.
RAA_TARGET_BATCH = 128
RAA_CORE_FWD_MS = 0.015
RAA_CORE_BWD_MS = 0.030
RAA_BLOCK_RATIOS = (("eager", 3.0), ("compiled", 1.3), ("sdpa", 1.2))  # sdpa: the faster of flash / cuDNN


# ----------------------------------------------------------------------------------------------------------------
# Building the document
# ----------------------------------------------------------------------------------------------------------------


def _launches_cell(r: dict, notes, measured: bool) -> str:
    """The "launches fwd/bwd" cell of a kernel row: "-" unless fwd+bwd, else the counts or why they are missing."""
    if r["mode"] != "fwd+bwd":
        return "-"
    if r.get("launches_error"):
        return FAILED + notes.ref(f"launch count {FAILED}: {r['launches_error']}")
    if r.get("launches_fwd") is None:
        reason = "launches are counted on CUDA only" if r.get("device") != "cuda" else None
        return "not measured" + (notes.ref(reason) if measured else "")
    return f"{r['launches_fwd']}/{r['launches_bwd']}"


def environment() -> dict:
    """patfast.train.report.environment() plus the GPU's details, the packaging tools' versions (the GPU image's
    setuptools / wheel decide whether the editable install works) and the date."""
    from importlib import metadata

    import torch

    from patfast.train.report import environment as base

    env = base()
    env.setdefault("gpu", None)
    for name in ("pip", "setuptools", "wheel"):
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = "not installed"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_capability=f"{props.major}.{props.minor}", gpu_sms=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
    env["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return env


def make_doc(env: dict, ceilings: dict | None, kernels: list[dict], gpu_tests: dict | None = None,
             e2e: list | None = None, data: dict | None = None) -> dict:
    ceilings = dict(ceilings or {})
    ceilings.setdefault("copy_gbps", None)
    ceilings.setdefault("bf16_tflops", None)
    doc = {"env": env, "ceilings": ceilings, "kernels": [dict(r) for r in kernels], "data": data,
           "e2e": list(e2e or []), "gpu_tests": gpu_tests}
    derive(doc)
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


def derive(doc: dict) -> None:
    """Add to each kernel row: vs_eager / vs_compiled (baseline ms / this ms, same op, shape, mode, dtype and
    device, same run) and frac_copy (GB/s over the copy bandwidth measured in this run, same kind of device).
    RAA rows also get vs_sdpa_flash, vs_sdpa_cudnn and vs_sdpa (against the faster measured SDPA backend,
    named in sdpa_best)."""
    times = {}
    for r in doc["kernels"]:
        times[(_key(r), r["provider"])] = r.get("ms")
    copy = doc["ceilings"].get("copy_gbps")
    copy_on_cpu = str(doc["ceilings"].get("device", "")).startswith("CPU")
    for r in doc["kernels"]:
        for base in ("eager", "compiled"):
            b = times.get((_key(r), base))
            r[f"vs_{base}"] = b / r["ms"] if b and r.get("ms") else None
        if r["op"] in RAA_OPS:
            for base in SDPA_BASES:
                b = times.get((_key(r), base))
                r[f"vs_{base}"] = b / r["ms"] if b and r.get("ms") else None
            measured = [(times[(_key(r), base)], base) for base in SDPA_BASES if times.get((_key(r), base))]
            best = min(measured) if measured else None
            r["sdpa_best"] = best[1] if best else None
            r["vs_sdpa"] = best[0] / r["ms"] if best and r.get("ms") else None
        same_device = copy_on_cpu == (r.get("device") == "cpu")
        r["frac_copy"] = r["gbps"] / copy if copy and r.get("gbps") and same_device else None


def _key(r: dict) -> tuple:
    return r["op"], r.get("case"), r.get("batch"), json.dumps(r["shape"]), r["mode"], r["dtype"], r.get("device")


# ----------------------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------------------


def _find(doc: dict, provider: str, **match) -> dict | None:
    for r in doc["kernels"]:
        if r["provider"] == provider and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def targets(doc: dict) -> list[dict]:
    """The issue's targets, each {"target", "figure", "verdict": "met" | "not met" | "not measured"}."""
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

    hcl = "HCL fwd+bwd, Swin-T 4 stages, B=128, bf16"
    tri = _find(doc, "triton", **HCL_TARGET)
    cuda_tri = tri if tri and tri.get("device") == "cuda" else None
    frac = cuda_tri.get("frac_copy") if cuda_tri else None
    add(f"{hcl}: >= 75% of measured copy bandwidth (6-pass model)", frac, frac is not None and frac >= 0.75,
        f"{100 * frac:.1f}% ({num(cuda_tri['gbps'])} GB/s of {num(doc['ceilings']['copy_gbps'])})" if frac else "",
        missing(tri, "copy bandwidth"))
    for base, need in (("eager", 5.0), ("compiled", 1.5)):
        ratio = cuda_tri.get(f"vs_{base}") if cuda_tri else None
        base_row = _find(doc, base, **HCL_TARGET)
        add(f"{hcl}: >= {need:g}x the {'eager' if base == 'eager' else 'torch.compile'} reference", ratio,
            ratio is not None and ratio >= need,
            f"{ratio:.2f}x ({_fmt_ms(cuda_tri['ms'])} vs {_fmt_ms(base_row['ms'])})" if ratio else "",
            missing(tri, "") if tri is None or tri.get("ms") is None or tri.get("device") != "cuda"
            else missing(base_row, "baseline"))
    for k in (100, 1000):
        match = {"op": "kd_loss_pair", "case": f"K={k}", "batch": KD_TARGET_BATCH, "mode": "fwd+bwd"}
        row = _find(doc, "triton", **match)
        cuda_row = row if row and row.get("device") == "cuda" else None
        name = f"KD pair, B={KD_TARGET_BATCH}, K={k}"
        for way in ("fwd", "bwd"):
            n = cuda_row.get(f"launches_{way}") if cuda_row else None
            kernels = ", ".join(cuda_row.get(f"kernels_{way}") or []) if cuda_row else ""
            add(f"{name}: one launch {'forward' if way == 'fwd' else 'backward'}", n, n == 1,
                f"{n} ({kernels})" if n is not None else "", missing(row, "launch count", "launches_error"))
        ms = cuda_row.get("ms_graph") if cuda_row else None
        stream = f"; {_fmt_ms(cuda_row['ms'])} per call on a stream (do_bench)" if cuda_row and cuda_row.get(
            "ms") else ""
        add(f"{name}: fwd+bwd <= 10 us (CUDA-graph replay: GPU time without host gaps)", ms,
            ms is not None and ms <= KD_TARGET_MS, f"{_fmt_ms(ms)}{stream}" if ms is not None else "",
            missing(row, "CUDA-graph time", "graph_error"))
    out += _raa_targets(doc, add, missing)
    return out


def _raa_targets(doc: dict, add, missing) -> list[dict]:
    """Issue #4 at B = 128: core fwd <= 15 us, bwd <= 30 us; block fwd+bwd >= 3x eager, >= 1.3x compiled,
    >= 1.2x the faster SDPA composition. Appends through ``add`` (which writes into the caller's list)."""
    b = RAA_TARGET_BATCH
    core = "RAA core, q/k/v (128, 8, 64, 64), bf16"
    fwd = _find(doc, "triton", op="raa_core", batch=b, mode="fwd")
    ms = fwd.get("ms") if fwd and fwd.get("device") == "cuda" else None
    add(f"{core}: forward <= {RAA_CORE_FWD_MS * 1e3:g} us (issue #4)", ms, ms is not None and ms <= RAA_CORE_FWD_MS,
        _fmt_range(fwd) if ms is not None else "", missing(fwd, "forward time"))
    both = _find(doc, "triton", op="raa_core", batch=b, mode="fwd+bwd")
    ms = both.get("ms_bwd") if both and both.get("device") == "cuda" else None
    add(f"{core}: backward <= {RAA_CORE_BWD_MS * 1e3:g} us (backward alone, issue #4)", ms,
        ms is not None and ms <= RAA_CORE_BWD_MS, _fmt_range(both, "ms_bwd") if ms is not None else "",
        missing(both, "backward-alone time", "bwd_error"))
    block = "RAA whole block fwd+bwd, tokens (128, 64, 512), bf16"
    tri = _find(doc, "triton", op="raa_block", batch=b, mode="fwd+bwd")
    cuda_tri = tri if tri and tri.get("device") == "cuda" and tri.get("ms") is not None else None
    for base, need in RAA_BLOCK_RATIOS:
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
        add(f"{block}: >= {need:g}x the {name} (issue #4)", ratio, ratio is not None and ratio >= need,
            f"{ratio:.2f}x ({_fmt_ms(cuda_tri['ms'])} vs {_fmt_ms(base_row['ms'])}"
            f"{' ' + best if best else ''})" if ratio else "", why)
    return []


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "not measured"
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.3f} ms"


def _fmt_range(r: dict, prefix: str = "ms") -> str:
    med, lo, hi = r.get(prefix), r.get(f"{prefix}_p20"), r.get(f"{prefix}_p80")
    if med is None:
        return "not measured"
    if lo is None or hi is None:
        return _fmt_ms(med)
    scale, unit = (1e3, "us") if med < 1 else (1.0, "ms")
    digits = 1 if unit == "us" else 3
    return f"{med * scale:.{digits}f} {unit} ({lo * scale:.{digits}f}-{hi * scale:.{digits}f})"


def _ratio(x) -> str:
    return "not measured" if x is None else f"{x:.2f}x"


class _Notes:
    """Footnotes: each distinct reason once, cells point at it as [n]."""

    def __init__(self):
        self.items: list[str] = []

    def ref(self, text: str | None) -> str:
        if not text:
            return ""
        if text not in self.items:
            self.items.append(text)
        return f" [{self.items.index(text) + 1}]"

    def render(self) -> list[str]:
        return [f"[{i}] {t}  " for i, t in enumerate(self.items, 1)]


def _time_cell(r: dict, notes: _Notes) -> str:
    """A row's time: measured, else "FAILED" or "not measured", each with its footnote."""
    if r.get("ms") is not None:
        return _fmt_range(r)
    return (FAILED if r.get("error") else "not measured") + notes.ref(r.get("note"))


def _table(rows: list[dict], kd: bool, notes: _Notes) -> list[str]:
    first = "K" if kd else "teacher"
    head = [first, "B", "mode", "provider", "time (p20-p80)"] + (["CUDA graph"] if kd else []) + \
        ["GB/s", "% of copy", "vs eager", "vs compiled", "launches fwd/bwd"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        measured = r.get("ms") is not None
        cells = [str(r["case"]).removeprefix("K="), str(r["batch"]), r["mode"], r["provider"], _time_cell(r, notes)]
        if kd:
            graph = _fmt_range(r, "ms_graph")
            if r.get("graph_error"):
                graph = FAILED + notes.ref(f"CUDA-graph timing {FAILED}: {r['graph_error']}")
            elif r.get("ms_graph") is None and measured:
                graph += notes.ref("CUDA-graph timing: CUDA only, eager and Triton providers"
                                   if r.get("device") == "cuda" else "CUDA-graph timing needs CUDA")
            cells.append(graph)
        cells += [
            num(r.get("gbps")),
            "not measured" if r.get("frac_copy") is None else f"{100 * r['frac_copy']:.1f}%",
            _ratio(r.get("vs_eager")), _ratio(r.get("vs_compiled")),
        ]
        cells.append(_launches_cell(r, notes, measured))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


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
            + (f" / median {_fmt_ms(ceilings['copy_ms'])}" if ceilings.get("copy_ms") else "") + f" ({where})"
    if ceilings.get("bf16_tflops") is not None:
        n = ceilings.get("matmul_n", "n")
        matmul_how = f"{n}^3 `torch.mm` on random data: 2n^3" + (
            f" / median {_fmt_ms(ceilings['matmul_ms'])}" if ceilings.get("matmul_ms") else "") + f" ({where})"
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
    out += ["", "| target (issue #6, Swin-T -> ResNet18, 224, B 128, GPU) | measured | verdict |", "|---|---|---|"]
    out += [f"| {t['target']} | {t['figure']} | **{t['verdict']}** |" for t in e2e_targets(doc)]
    return out + [""]


def _targets_section(doc: dict) -> list[str]:
    out = ["## Targets (issues #3 and #4)", "", "| target | measured | verdict |", "|---|---|---|"]
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

    return out + [render(data.get("rows") or [], data.get("step")), ""]


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
            "e2e": _e2e_section, "kernels": lambda doc: _kernel_sections(doc), "targets": _targets_section,
            "gpu_tests": _gpu_tests_section, "data": _data_section, "steps": _steps_section}


def _kernel_sections(doc: dict) -> list[str]:
    rows = doc["kernels"]
    out = ["## Kernels", ""]
    if not rows:
        return out + ["not measured (the kernel step did not run)", ""]
    dtypes = sorted({r["dtype"] for r in rows})
    devices = sorted({r.get("device", "?") for r in rows})
    timers = sorted({r["timer"] for r in rows if r.get("timer")})
    out += [
        f"Inputs: {', '.join(dtypes)} on {', '.join(devices)}"
        + ("; every provider under torch.autocast(bf16), as a training step runs" if "cuda" in devices else "")
        + ". Providers: eager = `backend=\"reference\"` (stock PyTorch), compiled = `torch.compile` of the same "
        "call (dynamic=False, compiled once per shape, warmed up), triton = `backend=\"triton\"`.",
        f"Timer: {'; '.join(timers) or 'none (nothing measured)'}; time = median (p20-p80) per call.",
        "GB/s counts the traffic model's bytes: HCL fwd 2 tensor passes (read fs, ft), fwd+bwd 6 (fwd 2, bwd reads 2 "
        "and writes 2 grads); KD the logits read and grads written: kd_loss fwd 2 / fwd+bwd 5, kd_loss_pair fwd 3 / "
        "fwd+bwd 8 passes of B x K. '% of copy' = GB/s over the copy measured above; 'vs X' = X's time / this "
        "row's time (same shape, same run). Launches: GPU kernels (incl. memsets) in one forward / one backward "
        "(torch.profiler).",
        ""]
    notes = _Notes()
    for op, title in KERNEL_OPS.items():
        op_rows = [r for r in rows if r["op"] == op]
        if not op_rows:
            continue
        if op in RAA_OPS:
            out += [f"### {op}: {title}", "", _RAA_TEXT[op], ""] + _raa_table(op_rows, notes) + [""]
            continue
        kd = op != "hcl_loss_stages"
        out += [f"### {op}: {title}", ""]
        if not kd:
            out += [f"- {case}: {' '.join('(' + ','.join(map(str, s)) + ')' for s in shape)} (at the first B)"
                    for case, shape in _first_shapes(op_rows).items()] + [""]
        out += _table(op_rows, kd, notes) + [""]
    checked = [r["interpreter_rel_err"] for r in rows if r.get("interpreter_rel_err") is not None]
    if checked:
        out += [f"Triton through the interpreter (no CUDA; untimed, a check of this harness only): {len(checked)} "
                f"(case, mode) pairs ran; largest rel. error of their outputs vs the reference {max(checked):.1e}.",
                ""]
    if notes.items:
        out += ["Notes:", ""] + notes.render() + [""]
    return out


_RAA_TEXT = {
    "raa_block": (
        "Tokens (B, 64, 512), pos (1, 64, 512), 8 heads; every tensor in the input dtype (params too); fwd+bwd "
        "differentiates tokens, every parameter and pos. Providers: eager = `ops.raa_attention(backend=\"reference\")`"
        ", compiled = `torch.compile` of it (column 'SDPA rewrite': whether Inductor's generated code calls an SDPA "
        "op), sdpa_flash / sdpa_cudnn = the same LayerNorm / Linear / +pos front then `F.scaled_dot_product_attention` "
        "under `sdpa_kernel(FLASH_ATTENTION)` / `sdpa_kernel(CUDNN_ATTENTION)`, triton = "
        "`ops.raa_attention(backend=\"triton\")`. Traffic model (the floor of a fully fused block; X = B*N*D, "
        "P = params + pos = 3D^2 + 5D + N*D): fwd 2X + P (tokens, params read; output written), fwd+bwd 5X + 3P "
        "(+ dOut, tokens, params read; dTokens, param grads written)."),
    "raa_core": (
        "q, k, v (B, 8, 64, 64), scale 1/8. Providers: eager = softmax(q k^T * scale) v in stock PyTorch, "
        "sdpa_flash / sdpa_cudnn = `F.scaled_dot_product_attention` with that backend pinned, triton = "
        "`patfast.kernels.raa.raa_core`. Traffic model (T = B*H*N*hd, L = B*H*N fp32 LSE values): fwd reads q, k, v, "
        "writes O and LSE = 4T + L; bwd reads q, k, v, dO, LSE, writes dQ, dK, dV = 7T + L; fwd+bwd = 11T + 2L."),
}


def _raa_table(rows: list[dict], notes: _Notes) -> list[str]:
    block = rows[0]["op"] == "raa_block"
    head = ["B", "mode", "provider", "time (p20-p80)", "bwd alone", "GB/s", "% of copy", "vs eager"] + \
        (["vs compiled"] if block else []) + ["vs sdpa_flash", "vs sdpa_cudnn", "launches fwd/bwd"] + \
        (["SDPA rewrite"] if block else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        measured = r.get("ms") is not None
        cells = [str(r["batch"]), r["mode"], r["provider"], _time_cell(r, notes)]
        if r["mode"] != "fwd+bwd":
            cells.append("-")
        elif r.get("bwd_error"):
            cells.append(FAILED + notes.ref(f"backward alone {FAILED}: {r['bwd_error']}"))
        else:
            cells.append(_fmt_range(r, "ms_bwd"))
        cells += [num(r.get("gbps")),
                  "not measured" if r.get("frac_copy") is None else f"{100 * r['frac_copy']:.1f}%",
                  _ratio(r.get("vs_eager"))]
        if block:
            cells.append(_ratio(r.get("vs_compiled")))
        cells += [_ratio(r.get("vs_sdpa_flash")), _ratio(r.get("vs_sdpa_cudnn"))]
        cells.append(_launches_cell(r, notes, measured))
        if block:
            cells.append(r.get("inductor_sdpa") or "-" if r["provider"] == "compiled" else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _first_shapes(rows: list[dict]) -> dict:
    seen: dict = {}
    for r in rows:
        seen.setdefault(r["case"], r["shape"])
    return seen


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
    """The GPU tests' outcome from the report patfast.bench.pytest_report keeps (rewritten after every test, so it
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
                       "could not load the patfast.bench.pytest_report plugin")
        return out
    for key in ("collected", *COUNTS, "running", "failures", "finished", "command"):
        out[key] = report.get(key, out[key])
    if seconds is None:
        out["seconds"] = report.get("seconds")
    return out


def e2e_targets(doc: dict) -> list[dict]:
    """Issue #6's GPU targets for Swin-T -> ResNet18: fast >= 3x reference, >= 80 % of the floor, peak <= reference."""
    row = next((e for e in doc.get("e2e") or [] if e["pair"].startswith("swin_tiny")
                and e.get("batch") == 128 and e.get("img_size") == 224), None)
    on_gpu = row is not None and str(row.get("device", "")).startswith("cuda")
    checks = [("fast path >= 3x the reference path's img/s", ("fast", "reference"), "img_s", 3.0, "x"),
              (">= 80 % of the floor's img/s", ("fast", "floor"), "img_s", 0.8, "%"),
              ("peak memory <= the reference path's", ("reference", "fast"), "peak_gb", 1.0, "GiB")]
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
