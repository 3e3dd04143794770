"""The Python side of benchmarks/gpu_check.sh: the run's store, results.json / results.md built from it, the summary.

Each step writes its output into OUTDIR/inflight/ as it measures (<step>.json, or <step>_<n>.json for the e2e steps,
one per pair; the GPU tests' report is inflight/gpu_tests.json). After every step `merge` moves that output, with the
step's record (exit status, seconds, limit, which run), into OUTDIR/parts.json, the store, and rebuilds
results.json and results.md from the whole store. So a step rerun with `gpu_check.sh --only` replaces its own part
and keeps every other step's, and OUTDIR never holds more than a few files (the GPU machine returns at most 8).
A merge also folds in what an earlier run killed mid-step left in inflight/ (its step then has no exit status).

Rows a step wrote as "not measured: not reached" and never reached are given the reason when the document is built:
the step's time limit, its exit status, or the run that ended during it.

    python benchmarks/gpu_check.py env --json PATH           print the GPU and versions; write them
    python benchmarks/gpu_check.py e2e-row --pair T,S [--pair ...] (--why TEXT | --failed TEXT) --json PATH
                                                         (PATH may hold {n}: the pair's number, from 1)
    python benchmarks/gpu_check.py merge --out OUTDIR [--step NAME --rc N --seconds S --limit L] [run options]
    python benchmarks/gpu_check.py summary --out OUTDIR   the steps' status and everything FAILED
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys

from render_results import make_doc, parse_gpu_tests, render_md

from patfast.bench.record import FAILED, NOT_REACHED, write_json

STORE = "parts.json"
INFLIGHT = "inflight"
KERNEL_STEPS = ("kernels_hcl", "kernels_raa", "kernels_kd")
E2E_STEPS = ("e2e_target", "e2e_others")
TIMED_OUT = (124, 137)  # timeout(1): SIGTERM at the limit; SIGKILL after the grace period


# ----------------------------------------------------------------------------------------------------------------
# The store
# ----------------------------------------------------------------------------------------------------------------


def load_store(out_dir: str) -> dict:
    path = os.path.join(out_dir, STORE)
    if os.path.exists(path):
        with open(path) as f:
            store = json.load(f)
    else:
        store = {}
    store.setdefault("runs", {})
    store.setdefault("steps", {})
    return store


def _load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def inflight_steps(out_dir: str) -> dict[str, list[str]]:
    """Step name -> its files in OUTDIR/inflight/ (<step>.json, <step>_<n>.json in pair order)."""
    folder = os.path.join(out_dir, INFLIGHT)
    found: dict[str, list[tuple[int, str]]] = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = re.fullmatch(r"([a-z0-9]+(?:_[a-z]+)*?)(?:_(\d+))?\.json", name)
        if m:
            found.setdefault(m.group(1), []).append((int(m.group(2) or 0), os.path.join(folder, name)))
    return {step: [p for _, p in sorted(files)] for step, files in found.items()}


def read_part(step: str, files: list[str], record: dict, dry_run: bool):
    """What a step wrote: one JSON, a list of pair rows (e2e), or the GPU tests' outcome (gpu_tests)."""
    if step == "gpu_tests":
        return parse_gpu_tests(record.get("rc"), files[0] if files else None, collect_only=dry_run,
                               timeout_s=record.get("limit"), seconds=record.get("seconds"))
    if step in E2E_STEPS:
        rows = []
        for path in files:
            rows += _load(path) or []
        return rows or None
    return _load(files[0]) if files else None


def merge(out_dir: str, step: str | None = None, record: dict | None = None, run: dict | None = None,
          order: list[str] | None = None) -> dict:
    """Move ``step``'s output (and any left by a killed earlier run) from inflight/ into the store, with ``record``;
    rebuild results.json and results.md from the store. Returns the document."""
    store = load_store(out_dir)
    if run:
        run = dict(run)
        run_id = run.pop("id")
        entry = store["runs"].setdefault(run_id, {"n": len(store["runs"]) + 1, "date": run.get("date")})
        entry.update({k: v for k, v in run.items() if k != "date"})
        store["latest_run"] = run_id
    if order:
        store["order"] = order
    files = inflight_steps(out_dir)
    if step is not None:
        record = dict(record or {}, run=store["runs"].get(store.get("latest_run"), {}).get("n"))
        store["steps"][step] = {"record": record, "part": None}
        files.setdefault(step, [])
    dry_run = (store["runs"].get(store.get("latest_run")) or {}).get("mode") == "dry-run"
    for name, paths in files.items():
        if name != step:  # left by a run that ended during this step: no exit status
            store["steps"][name] = {"record": {"rc": None, "note": "the gpu_check run ended during this step"},
                                    "part": None}
        entry = store["steps"][name]
        entry["part"] = read_part(name, paths, entry["record"], dry_run)
    write_json(store, os.path.join(out_dir, STORE))
    for paths in files.values():
        for path in paths:
            os.remove(path)
    folder = os.path.join(out_dir, INFLIGHT)
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.endswith(".tmp"):  # half a write of a killed step: its previous version was read above
            os.remove(os.path.join(folder, name))
    doc = build_doc(store)
    write_json(doc, os.path.join(out_dir, "results.json"))
    with open(os.path.join(out_dir, "results.md.tmp"), "w") as f:
        f.write(render_md(doc))
    os.replace(os.path.join(out_dir, "results.md.tmp"), os.path.join(out_dir, "results.md"))
    return doc


# ----------------------------------------------------------------------------------------------------------------
# The document
# ----------------------------------------------------------------------------------------------------------------


def step_status(record: dict) -> str:
    rc = record.get("rc")
    if rc is None:
        return f"{FAILED} (no exit status: {record.get('note', 'unknown')})"
    if rc in TIMED_OUT:
        return f"{FAILED} (timed out at its limit of {record.get('limit')} s, exit {rc})"
    return "ok" if rc == 0 else f"{FAILED} (exit status {rc})"


def unreached_reason(step: str, record: dict) -> str:
    rc = record.get("rc")
    if rc is None:
        return f"{NOT_REACHED}: the gpu_check run ended during the {step} step, before this"
    if rc in TIMED_OUT:
        return f"{NOT_REACHED}: the {step} step was stopped at its time limit ({record.get('limit')} s) before this"
    return f"{NOT_REACHED}: the {step} step ended with exit status {rc} before this"


def _explain_unreached(rows, reason: str) -> None:
    """Give every "not reached" note in ``rows`` (dicts, nested one level: e2e paths) the step's reason."""
    for row in rows:
        if row.get("note") == NOT_REACHED:
            row["note"] = reason
        for sub in (row.get("paths") or {}).values():
            if sub.get("note") == NOT_REACHED:
                sub["note"] = reason


def build_doc(store: dict) -> dict:
    """results.json's document from the store (steps in the script's order)."""
    steps = store["steps"]

    def part(name):
        entry = steps.get(name)
        return (entry or {}).get("part")

    def reason(name):
        record = steps[name]["record"]
        return unreached_reason(name, record) if record.get("rc") != 0 else NOT_REACHED

    env = part("env") or next((part(n)["env"] for n in (*KERNEL_STEPS, "data") if (part(n) or {}).get("env")),
                              {"gpu": None, "torch": None, "triton": None, "cuda": None})
    env = dict(env)  # (without the env step: the environment a kernel or data step recorded)
    kernels, ceilings = [], part("ceilings")
    for name in KERNEL_STEPS:
        rows = (part(name) or {}).get("kernels") or []
        if rows:
            _explain_unreached(rows, reason(name))
        kernels += rows
        ceilings = ceilings or (part(name) or {}).get("ceilings")
    data = None
    if part("data"):
        data = {"rows": part("data").get("data") or [], "step": part("data").get("step")}
        _explain_unreached(data["rows"] + ([data["step"]] if data["step"] else []), reason("data"))
    e2e = []
    for name in E2E_STEPS:
        rows = part(name) or []
        if rows:
            _explain_unreached(rows, reason(name))
        e2e += rows
    runs = sorted(store["runs"].values(), key=lambda r: r["n"])
    latest = store["runs"].get(store.get("latest_run")) or {}
    order = store.get("order") or list(steps)
    records = []
    for name in order + [n for n in steps if n not in order]:
        record = (steps.get(name) or {}).get("record")
        if record is None:
            records.append({"step": name, "status": "not run", "rc": None})
        else:
            records.append({"step": name, **record, "status": step_status(record)})
    env["gpu_check"] = {"dry_run": latest.get("mode") == "dry-run", "patfast_import": latest.get("patfast_import"),
                        "steps": records, "runs": runs}
    doc = make_doc(env, ceilings, kernels, part("gpu_tests"), e2e, data)
    doc["failures"] = [{"section": "steps", "what": r["step"], "error": r["status"]} for r in records
                       if r["status"].startswith(FAILED)] + doc["failures"]
    return doc


def summary(out_dir: str) -> str:
    """The steps' status and every FAILED item, for the end of the script's output."""
    doc = _load(os.path.join(out_dir, "results.json"))
    if doc is None:
        return f"gpu_check: no results.json in {out_dir}"
    records = doc["env"]["gpu_check"]["steps"]
    lines = [f"gpu_check summary ({os.path.join(out_dir, 'results.md')}):",
             f"  {'step':<12} {'seconds':>7} {'limit s':>7}  status"]
    lines += [f"  {r['step']:<12} {r.get('seconds', '-'):>7} {r.get('limit', '-'):>7}  {r['status']}"
              for r in records]
    failed = doc.get("failures") or []
    lines.append(f"  {FAILED}: {len(failed)}" if failed else "  nothing FAILED")
    lines += [f"  {FAILED}: {f['section']}: {f['what']}: {f['error']}" for f in failed]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def e2e_row(pair: str, why: str | None, failed: str | None) -> dict:
    """The row of a pair that produced none itself: not started (``why``) or died before writing (``failed``)."""
    teacher, _, student = pair.partition(",")
    row = {"pair": f"{teacher} -> {student}", "batch": None, "img_size": None, "fast_img_s": None,
           "reference_img_s": None, "floor_img_s": None, "fast_peak_gb": None, "reference_peak_gb": None,
           "split": {}, "paths": {}}
    if failed:
        row.update(error=failed, note=f"{FAILED}: {failed}")
    else:
        row["note"] = f"not measured: {why}"
    return row


def print_env(json_path: str | None) -> None:
    from patfast.bench import environment

    env = environment()
    print(f"GPU     {env.get('gpu') or 'none (no CUDA device visible)'}"
          + (f" (sm {env['gpu_capability']}, {env['gpu_sms']} SMs, {env['gpu_memory_gib']} GiB)"
             if env.get("gpu_capability") else ""))
    for key in ("torch", "triton", "cuda", "python", "patfast", "timm", "setuptools", "wheel", "pip"):
        print(f"{key:<10} {env.get(key)}")
    if json_path:
        write_json(env, json_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env", help="print the GPU and versions; write them as JSON")
    p.add_argument("--json", default=None)
    p = sub.add_parser("e2e-row", help="the row of a pair that was not started or died before writing one")
    p.add_argument("--pair", required=True, action="append", help="TEACHER,STUDENT (repeatable)")
    reason = p.add_mutually_exclusive_group(required=True)
    reason.add_argument("--why", help="why it was not run (not measured)")
    reason.add_argument("--failed", help="what went wrong (FAILED)")
    p.add_argument("--json", required=True, help="where to write it; {n} in it: the pair's number (from 1)")
    p = sub.add_parser("merge", help="move a step's output into the store; rewrite results.json and results.md")
    p.add_argument("--out", required=True)
    p.add_argument("--step", default=None)
    p.add_argument("--rc", type=int, default=None)
    p.add_argument("--seconds", type=int, default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--order", default=None, help="every step of the script, in order (comma list)")
    p.add_argument("--run-id", default=None)
    p.add_argument("--mode", choices=("gpu", "dry-run"), default=None)
    p.add_argument("--only", default=None)
    p.add_argument("--budget", type=int, default=None, help="the run's budget in seconds")
    p.add_argument("--patfast-import", default=None, help="where patfast was imported from in this run")
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("summary", help="print the steps' status and everything FAILED")
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    if args.command == "env":
        print_env(args.json)
    elif args.command == "e2e-row":
        if len(args.pair) > 1 and "{n}" not in args.json:
            parser.error("e2e-row: several --pair need {n} in --json")
        for n, pair in enumerate(args.pair, 1):
            write_json([e2e_row(pair, args.why, args.failed)], args.json.replace("{n}", str(n)))
    elif args.command == "merge":
        record = None
        if args.step:
            record = {"rc": args.rc, "seconds": args.seconds, "limit": args.limit,
                      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
        run = None
        if args.run_id:
            run = {"id": args.run_id, "mode": args.mode, "only": args.only, "budget_s": args.budget,
                   "patfast_import": args.patfast_import,
                   "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
            run = {k: v for k, v in run.items() if v is not None}
        doc = merge(args.out, args.step, record, run, args.order.split(",") if args.order else None)
        if not args.quiet:
            print(render_md(doc))
    else:
        print(summary(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
