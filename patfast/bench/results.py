"""results.json and results.md: environment, ceilings, kernel rows beside their baselines, the issue's targets.

results.json, exactly these keys:
    {"env": {"gpu", "torch", "triton", "cuda", ...},
     "ceilings": {"copy_gbps", "bf16_tflops", ...},            (measured in the same run; null = not measured)
     "kernels": [{"op", "shape", "dtype", "mode", "provider", "ms", "gbps", ...}, ...],
     "data": {"rows": [...], "step": {...}} or null,          (patfast bench data: loader img/s, PAT step rate)
     "e2e": [{"pair", "batch", "img_size", "fast_img_s", "reference_img_s", "floor_img_s", "fast_peak_gb",
              "reference_peak_gb", "split": {...}}, ...],      (patfast bench train, one per pair)
     "gpu_tests": {"mode", "passed", "failed", ...} or null}  (pytest -m gpu, written by gpu_check.sh)
A figure that was not measured is null in the JSON and "not measured" in the markdown, with the reason.

    python -m patfast.bench.results env --json PATH                    print GPU + versions, write them
    python -m patfast.bench.results gpu-tests --log LOG --rc N [--junit XML] [--collect-only] --json PATH ...
    python -m patfast.bench.results merge --parts DIR --out OUTDIR [--dry-run] [--quiet]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys

from patfast.bench import num

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
    if r.get("launches_fwd") is None:
        reason = r.get("launches_note") or ("launches are counted on CUDA only" if r.get("device") != "cuda" else None)
        return "not measured" + (notes.ref(reason) if measured else "")
    return f"{r['launches_fwd']}/{r['launches_bwd']}"


def environment() -> dict:
    """patfast.train.report.environment() plus the GPU's details and the date."""
    import torch

    from patfast.train.report import environment as base

    env = base()
    env.setdefault("gpu", None)
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
    return doc


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


def write_json(doc: dict, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)  # a reader (or a kill mid-write) never sees half a file


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
        if value is None:
            out.append({"target": target, "figure": f"not measured ({why_missing})", "verdict": "not measured"})
        else:
            out.append({"target": target, "figure": figure, "verdict": "met" if ok else "not met"})

    def missing(row: dict | None, what: str) -> str:
        if row is None or row.get("device") != "cuda":
            return "case not in this run" if doc["env"].get("gpu") else "no CUDA GPU in this run"
        if row.get("ms") is None:
            return (row.get("note") or "not measured").removeprefix("not measured: ")
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
                f"{n} ({kernels})" if n is not None else "", missing(row, "launch count"))
        ms = cuda_row.get("ms_graph") if cuda_row else None
        stream = f"; {_fmt_ms(cuda_row['ms'])} per call on a stream (do_bench)" if cuda_row and cuda_row.get(
            "ms") else ""
        add(f"{name}: fwd+bwd <= 10 us (CUDA-graph replay: GPU time without host gaps)", ms,
            ms is not None and ms <= KD_TARGET_MS, f"{_fmt_ms(ms)}{stream}" if ms is not None else "",
            missing(row, "CUDA-graph time"))
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
        missing(both, "backward-alone time") if not (both and both.get("bwd_note")) else
        both["bwd_note"].removeprefix("backward alone not measured: "))
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


def _table(rows: list[dict], kd: bool, notes: _Notes) -> list[str]:
    first = "K" if kd else "teacher"
    head = [first, "B", "mode", "provider", "time (p20-p80)"] + (["CUDA graph"] if kd else []) + \
        ["GB/s", "% of copy", "vs eager", "vs compiled", "launches fwd/bwd"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        measured = r.get("ms") is not None
        time_cell = _fmt_range(r) + ("" if measured else notes.ref(r.get("note")))
        cells = [str(r["case"]).removeprefix("K="), str(r["batch"]), r["mode"], r["provider"], time_cell]
        if kd:
            graph = _fmt_range(r, "ms_graph")
            if r.get("ms_graph") is None and measured:
                reason = r.get("note") if (r.get("note") or "").startswith("CUDA-graph") else (
                    "CUDA-graph timing: CUDA only, eager and Triton providers" if r.get("device") == "cuda"
                    else "CUDA-graph timing needs CUDA")
                graph += notes.ref(reason)
            cells.append(graph)
        cells += [
            num(r.get("gbps")),
            "not measured" if r.get("frac_copy") is None else f"{100 * r['frac_copy']:.1f}%",
            _ratio(r.get("vs_eager")), _ratio(r.get("vs_compiled")),
        ]
        cells.append(_launches_cell(r, notes, measured))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_md(doc: dict, sections=("env", "ceilings", "gpu_tests", "kernels", "targets", "later", "steps")) -> str:
    env, ceilings = doc["env"], doc["ceilings"]
    gpu = env.get("gpu")
    out: list[str] = []
    if "env" in sections:
        dry = (env.get("gpu_check") or {}).get("dry_run")
        title = gpu or "CPU, no CUDA GPU" + (" (gpu_check.sh --dry-run: tiny sizes, code paths only)" if dry else "")
        out += [f"# patfast benchmarks: {title}", "",
                "Every figure was measured in this run, on this machine, each beside its baselines from the same run; "
                "what was not measured says so, with the reason.", "",
                "| | |", "|---|---|"]
        gpu_cell = gpu or "none (CPU)"
        if gpu and env.get("gpu_capability"):
            gpu_cell += f" (sm {env['gpu_capability']}, {env.get('gpu_sms')} SMs, {env.get('gpu_memory_gib')} GiB)"
        for name, value in (("GPU", gpu_cell), ("torch", env.get("torch")), ("triton", env.get("triton")),
                            ("CUDA", env.get("cuda")), ("python", env.get("python")),
                            ("patfast", env.get("patfast")), ("timm", env.get("timm")),
                            ("CPU threads", env.get("cpu_threads")), ("date", env.get("date"))):
            out.append(f"| {name} | {value if value is not None else 'unknown'} |")
        out.append("")
    if "ceilings" in sections:
        out += ["## Ceilings (measured in this run)", ""]
        where = ceilings.get("device") or "device unknown"
        copy_how = matmul_how = "not measured"
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
        if ceilings.get("timer"):
            out += [f"Timer: {ceilings['timer']}.", ""]
    if "gpu_tests" in sections:
        out += ["## GPU tests (`pytest -m gpu`)", "", _gpu_tests_line(doc.get("gpu_tests")), ""]
        failures = (doc.get("gpu_tests") or {}).get("failures") or []
        out += [f"- failed: `{name}`" for name in failures] + ([""] if failures else [])
    if "kernels" in sections:
        out += _kernel_sections(doc)
    if "targets" in sections:
        out += ["## Targets (issues #3 and #4)", "", "| target | measured | verdict |", "|---|---|---|"]
        out += [f"| {t['target']} | {t['figure']} | **{t['verdict']}** |" for t in targets(doc)]
        out.append("")
    if "later" in sections:
        out += ["## Data loaders (`patfast bench data`)", ""]
        data = doc.get("data")
        if data:
            from patfast.bench.data import render

            out += [render(data.get("rows") or [], data.get("step")), ""]
        else:
            out += ["not measured (the data step did not run or wrote nothing)", ""]
        out += ["## End-to-end train step (`patfast bench train`)", ""]
        if doc.get("e2e"):
            from patfast.bench.train import render as render_e2e

            out += [render_e2e(doc["e2e"]), ""]
            out += [f"- {e['pair']}: {e['note']}" for e in doc["e2e"] if e.get("note")]
            out += ["", "| target (issue #6, Swin-T -> ResNet18, 224, B 128, GPU) | measured | verdict |",
                    "|---|---|---|"]
            out += [f"| {t['target']} | {t['figure']} | **{t['verdict']}** |" for t in e2e_targets(doc)]
        else:
            out += ["not measured (the e2e step did not run or wrote nothing)"]
        out.append("")
    steps = (env.get("gpu_check") or {}).get("steps")
    if "steps" in sections and steps:
        out += ["## gpu_check.sh steps", "", "| step | exit status | seconds |", "|---|---|---|"]
        out += [f"| {s['step']} | {s['rc']}{' (timed out)' if s['rc'] == 124 else ''} | {s['seconds']} |"
                for s in steps]
        out.append("")
    return "\n".join(out)


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
        cells = [str(r["batch"]), r["mode"], r["provider"],
                 _fmt_range(r) + ("" if measured else notes.ref(r.get("note")))]
        if r["mode"] != "fwd+bwd":
            cells.append("-")
        else:
            cells.append(_fmt_range(r, "ms_bwd") + (notes.ref(r.get("bwd_note")) if measured else ""))
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
    if t.get("mode") == "collect-only":
        return (f"dry run: collected {t.get('collected', 'unknown')} GPU tests, none run (no CUDA); "
                f"collection exit status {t.get('rc')}")
    if t.get("timed_out"):
        head = f"timed out after {t.get('timeout_s')} s"
    else:
        head = f"exit status {t.get('rc')}"
    counts = ", ".join(f"{t[k]} {k}" for k in ("passed", "failed", "errors", "skipped") if t.get(k) is not None)
    extra = f" in {t['seconds']:.1f} s" if t.get("seconds") is not None else ""
    return f"{counts or 'no counts found in the output'}{extra} ({head}; `{t.get('command', 'pytest -m gpu')}`)"


# ----------------------------------------------------------------------------------------------------------------
# pytest -m gpu results
# ----------------------------------------------------------------------------------------------------------------


def parse_gpu_tests(rc: int, log_path: str | None, junit_path: str | None, collect_only: bool,
                    timeout_s: float | None = None, command: str | None = None) -> dict:
    """Counts of a `pytest -m gpu` run from its JUnit XML (else the summary line of its log)."""
    text = ""
    if log_path and os.path.exists(log_path):
        with open(log_path, errors="replace") as f:
            text = f.read()
    out: dict = {"mode": "collect-only" if collect_only else "run", "rc": rc, "command": command,
                 "timed_out": rc in (124, 137), "timeout_s": timeout_s}
    if collect_only:
        m = re.search(r"(\d+)(?:/\d+)? tests? collected", text)
        out["collected"] = int(m.group(1)) if m else None
        return out
    if junit_path and os.path.exists(junit_path) and os.path.getsize(junit_path):
        import xml.etree.ElementTree as ET

        try:
            root = ET.parse(junit_path).getroot()
            suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
            total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            out.update(passed=total["tests"] - total["failures"] - total["errors"] - total["skipped"],
                       failed=total["failures"], errors=total["errors"], skipped=total["skipped"],
                       seconds=sum(float(s.get("time", 0)) for s in suites))
            out["failures"] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                               if c.find("failure") is not None or c.find("error") is not None]
            return out
        except ET.ParseError:
            pass
    for key, pattern in (("passed", r"(\d+) passed"), ("failed", r"(\d+) failed"), ("errors", r"(\d+) errors?\b"),
                         ("skipped", r"(\d+) skipped")):
        found = re.findall(pattern, text[-4000:])
        out[key] = int(found[-1]) if found else (0 if re.search(r"\d+ (passed|failed)", text[-4000:]) else None)
    out["failures"] = re.findall(r"^FAILED (\S+)", text, flags=re.M)
    return out


# ----------------------------------------------------------------------------------------------------------------
# CLI (benchmarks/gpu_check.sh)
# ----------------------------------------------------------------------------------------------------------------


def e2e_targets(doc: dict) -> list[dict]:
    """Issue #6's GPU targets for Swin-T -> ResNet18: fast >= 3x reference, >= 80 % of the floor, peak <= reference."""
    row = next((e for e in doc.get("e2e") or [] if e["pair"].startswith("swin_tiny")
                and e.get("batch") == 128 and e.get("img_size") == 224), None)
    on_gpu = row is not None and str(row.get("device", "")).startswith("cuda")
    checks = [("fast path >= 3x the reference path's img/s", "fast_img_s", "reference_img_s", 3.0, "x"),
              (">= 80 % of the floor's img/s", "fast_img_s", "floor_img_s", 0.8, "%"),
              ("peak memory <= the reference path's", "reference_peak_gb", "fast_peak_gb", 1.0, "GiB")]
    out = []
    for target, a, b, need, unit in checks:
        if not on_gpu or not row.get(a) or not row.get(b):
            out.append({"target": target, "figure": "not measured", "verdict": "not measured"})
            continue
        ratio = row[a] / row[b]
        figure = {"x": f"{ratio:.2f}x", "%": f"{ratio:.0%}",
                  "GiB": f"{row['fast_peak_gb']:.2f} vs {row['reference_peak_gb']:.2f} GiB"}[unit]
        out.append({"target": target, "figure": figure, "verdict": "met" if ratio >= need else "not met"})
    return out


def _e2e_parts(parts: str) -> list[dict]:
    """The e2e rows the e2e step wrote (e2e_1.json, e2e_2.json, ... in order; each a list)."""
    names = sorted((f for f in os.listdir(parts) if re.fullmatch(r"e2e_\d+\.json", f)),
                   key=lambda f: int(f[4:-5]))
    rows = []
    for name in names:
        rows += _load(os.path.join(parts, name)) or []
    return rows


def _load(path: str):
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:
        return None


def merge(parts: str, out_dir: str, dry_run: bool = False) -> dict:
    """results.json + results.md in ``out_dir`` from what the steps wrote into ``parts`` (missing steps: not run)."""
    kernels_doc = _load(os.path.join(parts, "kernels.json")) or {}
    env = _load(os.path.join(parts, "env.json")) or kernels_doc.get("env")
    if env is None:
        env = environment()
    ceilings = _load(os.path.join(parts, "ceilings.json")) or kernels_doc.get("ceilings")
    steps = []
    steps_path = os.path.join(parts, "steps.tsv")
    if os.path.exists(steps_path):
        with open(steps_path) as f:
            for line in f:
                name, rc, seconds = line.rstrip("\n").split("\t")
                steps.append({"step": name, "rc": int(rc), "seconds": int(seconds)})
    env = dict(env, gpu_check={"dry_run": dry_run, "steps": steps})
    data_doc = _load(os.path.join(parts, "data.json"))
    data = {"rows": data_doc.get("data", []), "step": data_doc.get("step")} if data_doc else None
    doc = make_doc(env, ceilings, kernels_doc.get("kernels", []), _load(os.path.join(parts, "gpu_tests.json")),
                   _e2e_parts(parts), data)
    os.makedirs(out_dir, exist_ok=True)
    write_json(doc, os.path.join(out_dir, "results.json"))
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(render_md(doc))
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m patfast.bench.results", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env", help="print the GPU and versions; write them as JSON")
    p.add_argument("--json", default=None)
    p = sub.add_parser("gpu-tests", help="counts of a pytest -m gpu run -> JSON")
    p.add_argument("--rc", type=int, required=True)
    p.add_argument("--log", default=None)
    p.add_argument("--junit", default=None)
    p.add_argument("--collect-only", action="store_true")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--pytest-command", default=None, help="the pytest command line, for the record")
    p.add_argument("--json", required=True)
    p = sub.add_parser("e2e-skipped", help="an e2e row for a pair that was not run -> JSON (a one-row list)")
    p.add_argument("--pair", required=True, help="TEACHER,STUDENT")
    p.add_argument("--why", required=True)
    p.add_argument("--json", required=True)
    p = sub.add_parser("merge", help="write results.json and results.md from the steps' parts")
    p.add_argument("--parts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "env":
        env = environment()
        print(f"GPU     {env.get('gpu') or 'none (no CUDA device visible)'}"
              + (f" (sm {env['gpu_capability']}, {env['gpu_sms']} SMs, {env['gpu_memory_gib']} GiB)"
                 if env.get("gpu_capability") else ""))
        for key in ("torch", "triton", "cuda", "python", "patfast", "timm"):
            print(f"{key:<7} {env.get(key)}")
        if args.json:
            write_json(env, args.json)
    elif args.command == "gpu-tests":
        t = parse_gpu_tests(args.rc, args.log, args.junit, args.collect_only, args.timeout, args.pytest_command)
        write_json(t, args.json)
        print(_gpu_tests_line(t))
    elif args.command == "e2e-skipped":
        teacher, _, student = args.pair.partition(",")
        row = {"pair": f"{teacher} -> {student}", "batch": None, "img_size": None, "fast_img_s": None,
               "reference_img_s": None, "floor_img_s": None, "fast_peak_gb": None, "reference_peak_gb": None,
               "split": {}, "note": f"not measured: {args.why}"}
        write_json([row], args.json)
    else:
        doc = merge(args.parts, args.out, args.dry_run)
        if not args.quiet:
            print(render_md(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
