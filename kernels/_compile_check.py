"""Compile-only builds of Triton kernels for a CUDA target on a machine without a GPU (for tests).

``compile_kernels([build, ...])`` -> one ``asm`` dict per build ({"ttir", "ttgir", "llir", "ptx", "cubin", ...,
"shared": bytes of shared memory a program is launched with, Triton's dynamic allocation}),
from ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))``.
``resource_usage(cubin)`` -> {"REG": registers, "STACK": spill bytes, "SHARED": ..., "LOCAL": ...} per kernel of a
cubin, from Triton's bundled cuobjdump (None when it is not there).
A build is a dict:

    kernel      a @triton.jit kernel, or "module:name" of one (the module must be importable)
    signature   {arg name: "*fp32" | "*fp16" | "*bf16" | "i32" | "i64" | "fp32" | "constexpr", ...}, every argument
    constexprs  {arg name: value} for the "constexpr" arguments
    arch        80, 90, ... (default 90);  num_warps (default 4);  num_stages (default 3);  maxnreg (default: none,
                ptxas decides; as the launch option of that name, a cap on registers per thread)
    aligned     names of arguments to mark 16-divisible ("tt.divisibility" 16: 16-byte aligned pointers, ints that
                are multiples of 16), as the JIT does at launch time for such values

TRITON_INTERPRET=1 (tests/conftest.py sets it on machines without a GPU) cannot be switched off inside a process:
at import time every @triton.jit object, triton.language's own helpers (tl.sum, tl.max, ...) included, became an
interpreter object that triton.compile cannot lower. So when the interpreter is on, all builds run in one fresh
Python subprocess with TRITON_INTERPRET removed (a few seconds of imports); otherwise they run in this process.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence

__all__ = ["compile_kernels", "resource_usage"]


def _kernel_path(kernel) -> str:
    if isinstance(kernel, str):
        return kernel
    fn = getattr(kernel, "fn", kernel)  # JITFunction and the interpreter's InterpretedFunction both keep .fn
    return f"{fn.__module__}:{fn.__name__}"


def _compile_one(build: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, _, name = build["kernel"].partition(":")
    kernel = getattr(importlib.import_module(module_name), name)
    arg_names = list(build["signature"])
    attrs = {(arg_names.index(a),): [["tt.divisibility", 16]] for a in build.get("aligned", ())}
    src = ASTSource(fn=kernel, signature=dict(build["signature"]), constexprs=dict(build.get("constexprs", {})),
                    attrs=attrs)
    options = {"num_warps": build.get("num_warps", 4), "num_stages": build.get("num_stages", 3)}
    if build.get("maxnreg"):
        options["maxnreg"] = build["maxnreg"]
    compiled = triton.compile(src, target=GPUTarget("cuda", build.get("arch", 90), 32), options=options)
    return {**compiled.asm, "shared": compiled.metadata.shared}


def compile_kernels(builds: Sequence[dict]) -> list[dict]:
    """Compile every build (see the module docstring) for its CUDA target; returns their asm dicts, in order."""
    builds = [{**b, "kernel": _kernel_path(b["kernel"])} for b in builds]
    if os.environ.get("TRITON_INTERPRET", "0") in ("0", "", "false", "False"):
        return [_compile_one(b) for b in builds]
    with tempfile.TemporaryDirectory() as tmp:
        job, out = os.path.join(tmp, "job.pkl"), os.path.join(tmp, "out.pkl")
        with open(job, "wb") as f:
            pickle.dump(builds, f)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        code = f"import sys; from {__name__} import _subprocess_main; _subprocess_main(sys.argv[1], sys.argv[2])"
        proc = subprocess.run([sys.executable, "-c", code, job, out], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compile-only subprocess failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        with open(out, "rb") as f:
            return pickle.load(f)


def _subprocess_main(job_path: str, out_path: str) -> None:
    with open(job_path, "rb") as f:
        builds = pickle.load(f)
    results = [_compile_one(b) for b in builds]
    with open(out_path, "wb") as f:
        pickle.dump(results, f)


def resource_usage(cubin: bytes) -> list[dict[str, int]] | None:
    """Per kernel of ``cubin``: {"REG", "STACK", "SHARED", "LOCAL", ...} as ``cuobjdump -res-usage`` prints them
    (registers per thread; bytes), from the cuobjdump bundled with Triton's NVIDIA backend; None without it."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.access(tool, os.X_OK):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    usage = [{k: int(v) for k, v in re.findall(r"([A-Z]+):(\d+)", line)} for line in out.splitlines()
             if "REG:" in line]
    return usage or None
