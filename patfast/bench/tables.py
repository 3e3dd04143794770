"""The kernel rows' ratios and markdown: what `patfast bench kernels` prints and writes (--json, --md), and the
Kernels section of benchmarks/render_results.py's results.md.

    derive(rows, ceilings)  add vs_<baseline> (baseline ms / this ms, same op, shape, mode, dtype, device, same run)
                            and frac_copy (GB/s over the copy bandwidth measured in the same run) to each row
    render(rows)            the "## Kernels" section: one table per op, reasons as numbered notes (--md)
    render_text(rows)       plain text, what `patfast bench kernels` prints without --md: one aligned line per
                            (op, case, B, mode) with each provider's time, and a short summary
A row whose code raised is "FAILED" with its exception (a note), never "not measured" (record.py).
"""

from __future__ import annotations

import json

from patfast.bench.measure import num
from patfast.bench.record import FAILED

KERNEL_OPS = {
    "hcl_loss_stages": "HCL summed over the 4 stages of a teacher at 224 (PAT's loss_fd)",
    "kd_loss_pair": "PAT's KL pair: kd(s, t, T) and reg(pt, t, 1), T = 1",
    "kd_loss": "plain KD, T = 1",
    "dkd_loss": "Decoupled KD (the dkd baseline): alpha = 1, beta = 8, T = 4",
    "dist_loss": "DIST (the dist baseline): beta = gamma = 1, T = 1",
    "ofa_loss": "OFA's loss at the logits and at each branch (the ofa baseline): eps = 1, T = 1",
    "raa_block": "region-aware attention, whole block: LayerNorm -> q / kv Linear -> +pos -> 8-head attention",
    "raa_core": "region-aware attention core alone: softmax(q k^T / sqrt(hd)) v, q, k, v (B, 8, 64, 64)",
}
RAA_OPS = ("raa_block", "raa_core")
SDPA_BASES = ("sdpa_flash", "sdpa_cudnn")


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

def derive(rows: list[dict], ceilings: dict) -> list[dict]:
    """Add to each kernel row: vs_eager / vs_compiled (baseline ms / this ms, same op, shape, mode, dtype and
    device, same run) and frac_copy (GB/s over the copy bandwidth measured in this run, same kind of device).
    RAA rows also get vs_sdpa_flash, vs_sdpa_cudnn and vs_sdpa (against the faster measured SDPA backend,
    named in sdpa_best)."""
    times = {}
    for r in rows:
        times[(_key(r), r["provider"])] = r.get("ms")
    copy = ceilings.get("copy_gbps")
    copy_on_cpu = str(ceilings.get("device", "")).startswith("CPU")
    for r in rows:
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
    return rows


def _key(r: dict) -> tuple:
    return r["op"], r.get("case"), r.get("batch"), json.dumps(r["shape"]), r["mode"], r["dtype"], r.get("device")

def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "not measured"
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.3f} ms"


def fmt_range(r: dict, prefix: str = "ms") -> str:
    med, lo, hi = r.get(prefix), r.get(f"{prefix}_p20"), r.get(f"{prefix}_p80")
    if med is None:
        return "not measured"
    if lo is None or hi is None:
        return fmt_ms(med)
    scale, unit = (1e3, "us") if med < 1 else (1.0, "ms")
    digits = 1 if unit == "us" else 3
    return f"{med * scale:.{digits}f} {unit} ({lo * scale:.{digits}f}-{hi * scale:.{digits}f})"


def _ratio(x) -> str:
    return "not measured" if x is None else f"{x:.2f}x"


class Notes:
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


def _time_cell(r: dict, notes: Notes) -> str:
    """A row's time: measured, else "FAILED" or "not measured", each with its footnote."""
    if r.get("ms") is not None:
        return fmt_range(r)
    return (FAILED if r.get("error") else "not measured") + notes.ref(r.get("note"))


def _table(rows: list[dict], kd: bool, notes: Notes) -> list[str]:
    first = "K" if kd else "teacher"
    head = [first, "B", "mode", "provider", "time (p20-p80)"] + (["CUDA graph"] if kd else []) + \
        ["GB/s", "% of copy", "vs eager", "vs compiled", "launches fwd/bwd"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        measured = r.get("ms") is not None
        cells = [str(r["case"]).removeprefix("K="), str(r["batch"]), r["mode"], r["provider"], _time_cell(r, notes)]
        if kd:
            graph = fmt_range(r, "ms_graph")
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


def render(rows: list[dict]) -> str:
    """The "## Kernels" section of ``rows`` (derived: see derive)."""
    return "\n".join(section(rows))


def section(rows: list[dict]) -> list[str]:
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
    notes = Notes()
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


def _raa_table(rows: list[dict], notes: Notes) -> list[str]:
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
            cells.append(fmt_range(r, "ms_bwd"))
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


TEXT_PROVIDERS = ("eager", "compiled", "sdpa_flash", "sdpa_cudnn", "triton")


def render_text(rows: list[dict]) -> str:
    """Plain text of the kernel rows (derived: see derive): one aligned line per (op, case, B, mode) with each
    provider's median time per call ("-": not measured, "FAILED": raised; providers never measured anywhere are
    left out) and Triton's speed-ups, then a summary: what was measured, what was not and why, where the full
    tables are (--md, --json)."""
    if not rows:
        return "nothing measured (no kernel cases)"
    lines_of: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        lines_of.setdefault((r["op"], str(r["case"]), r["batch"], r["mode"]), {})[r["provider"]] = r
    shown = [p for p in TEXT_PROVIDERS if any(r["provider"] == p and (r.get("ms") is not None or r.get("error"))
                                              for r in rows)]
    speedups = [(f"triton vs {base}", f"vs_{base}") for base in ("eager", "compiled", "sdpa")
                if "triton" in shown and (base in shown or base == "sdpa" and set(SDPA_BASES) & set(shown))]
    head = ["op", "case", "B", "mode", *shown, *(title for title, _ in speedups)]
    table = [head]
    for (op, case, batch, mode), by_provider in lines_of.items():
        cells = [op, case, str(batch), mode]
        for p in shown:
            r = by_provider.get(p)
            cells.append("" if r is None else fmt_ms(r["ms"]) if r.get("ms") is not None
                         else FAILED if r.get("error") else "-")
        tri = by_provider.get("triton") or {}
        cells += ["-" if tri.get(key) is None else f"{tri[key]:.2f}x" for _, key in speedups]
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i in (0, 1, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
           .rstrip() for line in table]

    measured = [r for r in rows if r.get("ms") is not None]
    timers = sorted({r["timer"] for r in measured if r.get("timer")})
    out += ["", f"{len(measured)} of {len(rows)} rows (case x mode x provider) measured; time = median per call"
            + (f"; timer: {'; '.join(timers)}" if timers else "") + "."]
    reasons: dict[str, list[str]] = {}
    for r in rows:
        if r.get("ms") is None and not r.get("error"):
            why = str(r.get("note") or "no reason recorded").removeprefix("not measured: ")
            if r["provider"] not in reasons.setdefault(why, []):
                reasons[why].append(r["provider"])
    if reasons:
        out.append("Not measured ('-', or no column):")
        out += [f"  {', '.join(providers)}: {why}" for why, providers in reasons.items()]
    failed = sum(1 for r in rows if r.get("error"))
    if failed:
        out.append(f"{failed} row{'s' * (failed != 1)} {FAILED} (listed below, with the exception)")
    checked = [r["interpreter_rel_err"] for r in rows if r.get("interpreter_rel_err") is not None]
    if checked:
        out.append(f"Triton through the interpreter (untimed, a check of the harness): {len(checked)} (case, mode) "
                   f"pairs ran, largest rel. error vs the reference {max(checked):.1e}")
    out.append("GB/s, % of the copy bandwidth, launch counts and every note: --md PATH (markdown tables); every "
               "figure: --json PATH")
    return "\n".join(out)
