"""A performance model of the Triton kernels at a shape, no GPU needed: what each launch must move, how many programs
it runs and how many fit on an SM, and the time floor and estimate that follow (issue 15).

    launches = kd_launches(256, 1000, torch.bfloat16, pair=True)       # [Launch, ...], forward then backward
    launches = with_resources(launches)                                 # registers / spills from compile-only builds
    report(launches, copy_gbps=4300, matmul_tflops=700)                 # {"bytes", "flops", "floor_us", ...}

The model (stated assumptions, not measurements; the H200 figures are its data sheet's):
    floor     max(bytes / copy bandwidth, dot FLOPs / matmul rate), bytes = what every launch must read and write
              at least once (inputs, outputs, the small statistics passed between launches).
    estimate  sum over launches of LAUNCH_US + max(bytes / (copy bandwidth * fill), waves x serial steps / depth x
              DRAM_LATENCY_US, FLOPs / matmul rate) (depth: the loop iterations whose loads a software pipeline
              keeps in flight at once; 1 without one), where
              fill = min(1, bytes in flight / (copy bandwidth * DRAM_LATENCY_US)) (Little's law: a GPU reaches its
              copy bandwidth only with about bandwidth x latency bytes outstanding, ~3 MB on an H200) and bytes in
              flight = the programs resident at once (min(programs, SMs * resident per SM)) x the bytes one program
              has outstanding (depth tiles of loads).
    resident per SM  min(by registers: 65536 per SM, allocated per warp in units of 256; by threads: 2048; by
              shared memory: 228 KiB, 1 KiB reserved per block; 32 blocks).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import triton

from . import dist, dkd, hcl, kd, ofa, raa

__all__ = ["GPU", "H200", "Launch", "resident_per_sm", "kd_launches", "single_program_forward", "logit_launches",
           "hcl_launches", "hcl_launches_for", "hcl_build", "raa_core_launches", "with_resources", "report"]


@dataclass(frozen=True)
class GPU:
    name: str
    sms: int
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    arch: int = 90


H200 = GPU("H200 (sm_90)", sms=132)
DRAM_LATENCY_US = 0.7  # assumed: HBM load latency under load
LAUNCH_US = 1.0  # assumed: one kernel node of a CUDA graph, launch to launch


@dataclass(frozen=True)
class Launch:
    """One kernel launch of an op. Bytes: the minimum it must move; inflight: bytes one program has outstanding."""

    name: str
    programs: int
    num_warps: int
    read_bytes: int
    write_bytes: int
    inflight_bytes: int  # per program: the loads it has outstanding at once (depth loop iterations' worth)
    steps: int = 1  # serial loop iterations per program
    depth: int = 1  # loop iterations whose loads are in flight at once (a software pipeline's stages - 1)
    flops: int = 0  # tl.dot FLOPs
    build: dict | None = field(default=None, compare=False, repr=False)  # a kernels._compile_check build
    regs: int | None = None  # per thread, from the compile-only build
    spills: int | None = None  # bytes of stack (spills) per thread
    smem: int = 0  # bytes of shared memory per program


def resident_per_sm(regs: int | None, num_warps: int, smem: int = 0, gpu: GPU = H200) -> int:
    """Programs of ``num_warps`` warps at ``regs`` registers per thread that one SM holds at once."""
    by_threads = gpu.threads_per_sm // (32 * num_warps)
    by_regs = by_threads if regs is None else gpu.regs_per_sm // (math.ceil(regs * 32 / 256) * 256 * num_warps)
    by_smem = gpu.smem_per_sm // (smem + 1024) if smem else gpu.blocks_per_sm
    return max(0, min(by_threads, by_regs, by_smem, gpu.blocks_per_sm))


def _estimate_us(launch: Launch, copy_gbps: float, matmul_tflops: float, gpu: GPU) -> float:
    resident = max(1, resident_per_sm(launch.regs, launch.num_warps, launch.smem, gpu))
    in_flight = min(launch.programs, gpu.sms * resident) * launch.inflight_bytes
    bw = copy_gbps * 1e3  # bytes per us
    fill = min(1.0, in_flight / (bw * DRAM_LATENCY_US))
    memory_us = (launch.read_bytes + launch.write_bytes) / (bw * fill)
    # a program's serial steps wait at least one latency per ``depth`` of them, however few programs there are
    waves = math.ceil(launch.programs / (gpu.sms * resident))
    serial_us = waves * math.ceil(launch.steps / launch.depth) * DRAM_LATENCY_US
    return LAUNCH_US + max(memory_us, serial_us, launch.flops / (matmul_tflops * 1e6))


def report(launches: list[Launch], copy_gbps: float, matmul_tflops: float, gpu: GPU = H200) -> dict:
    """The model's figures for an op's launches at the given copy bandwidth (GB/s) and matmul rate (TFLOP/s)."""
    total_bytes = sum(x.read_bytes + x.write_bytes for x in launches)
    flops = sum(x.flops for x in launches)
    floor_us = max(total_bytes / (copy_gbps * 1e3), flops / (matmul_tflops * 1e6))
    rows = [{"name": x.name, "programs": x.programs, "num_warps": x.num_warps, "regs": x.regs, "spills": x.spills,
             "resident_per_sm": resident_per_sm(x.regs, x.num_warps, x.smem, gpu),
             "programs_per_sm": x.programs / gpu.sms, "steps": x.steps, "bytes": x.read_bytes + x.write_bytes,
             "estimate_us": _estimate_us(x, copy_gbps, matmul_tflops, gpu)} for x in launches]
    return {"gpu": gpu.name, "bytes": total_bytes, "flops": flops, "floor_us": floor_us,
            "estimate_us": sum(r["estimate_us"] for r in rows), "launches": rows}


# ----------------------------------------------------------------------------------------------------------------
# Launch plans, from the kernels' own configuration functions
# ----------------------------------------------------------------------------------------------------------------

_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _build(kernel, constexprs: dict, num_warps: int, pointer_types: dict, floats=(), maxnreg=None,
           arch: int = 90) -> dict:
    """A compile-only build of ``kernel`` as the launcher specialises it for contiguous aligned inputs: every
    pointer marked 16-byte aligned, pointers not in ``pointer_types`` fp32, scalars i32 unless in ``floats``."""
    constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_types.get(name, "fp32")
        else:
            signature[name] = "fp32" if name in floats else "i32"
    aligned = [n for n in kernel.arg_names if n.endswith("_ptr")]
    return dict(kernel=kernel, signature=signature, constexprs=constexprs, arch=arch, num_warps=num_warps,
                aligned=aligned, maxnreg=maxnreg)


def kd_launches(b: int, k: int, dtype: torch.dtype, pair: bool = True, temperature: float = 1.0,
                grads: int = 1) -> list[Launch]:
    """kd.kd_loss (pair False) or kd.pat_kl_pair (pair True) on contiguous (B, K) logits of ``dtype``: the two
    forward launches and the backward, writing ``grads`` gradients (PAT's pair: 2, to s and pt)."""
    isz, n_in = dtype.itemsize, 3 if pair else 2
    nterm = 2 * kd._NSTAT if pair else kd._NSTAT
    ptrs = dict.fromkeys(("s_ptr", "t_ptr", "p_ptr", "ds_ptr", "dt_ptr", "dp_ptr"), _TRITON_TYPE[dtype])
    align = 16 // isz if k % (16 // isz) == 0 else 1
    layout = {"ALIGN": align, "s_stride_k": 1, "t_stride_k": 1, "p_stride_k": 1}
    flags = {"PAIR": pair, "T_IS_ONE": pair and temperature == 1.0}
    part, merge, bwd = kd._partial_config(b, k), kd._merge_config(b, k), kd._bwd_config(b, k)
    chunks = merge["N_CHUNKS"]
    tile = part["BLOCK_B"] * part["BLOCK_K"]
    grid_bwd = triton.cdiv(b, bwd["BLOCK_B"]) * triton.cdiv(k, bwd["BLOCK_K"])
    stats = (2 if pair else 1) * kd._NSTAT * b * 4
    return [
        Launch("kd fwd: per-chunk statistics", triton.cdiv(b, part["BLOCK_B"]) * chunks, part["num_warps"],
               n_in * b * k * isz, chunks * nterm * b * 4, n_in * tile * isz,
               build=_build(kd._kl_partial_kernel, {**flags, **layout, "BLOCK_B": part["BLOCK_B"],
                                                    "BLOCK_K": part["BLOCK_K"]}, part["num_warps"], ptrs,
                            floats=("temperature",))),
        Launch("kd fwd: merge (one program)", 1, merge["num_warps"], chunks * nterm * b * 4, stats + 8,
               merge["BLOCK_B"] * chunks * nterm * 4, steps=triton.cdiv(b, merge["BLOCK_B"]),
               build=_build(kd._kl_merge_kernel, {"PAIR": pair, "N_CHUNKS": chunks, "BLOCK_B": merge["BLOCK_B"]},
                            merge["num_warps"], ptrs, floats=("temperature",))),
        Launch("kd bwd", grid_bwd, bwd["num_warps"], n_in * b * k * isz + stats, grads * b * k * isz,
               n_in * bwd["BLOCK_B"] * bwd["BLOCK_K"] * isz,
               build=_build(kd._kl_bwd_kernel, {**flags, **layout, "GRAD_S": True, "GRAD_T": False,
                                                "GRAD_P": pair and grads > 1, "BLOCK_B": bwd["BLOCK_B"],
                                                "BLOCK_K": bwd["BLOCK_K"]}, bwd["num_warps"], ptrs,
                            floats=("temperature",))),
    ]


def single_program_forward(name: str, b: int, k: int, dtype: torch.dtype, n_in: int = 2, walks: int = 1) -> Launch:
    """The forward every logit loss had before issue 15, for comparison: ONE program walking the batch (dist.py's
    twice) in tiles of up to 4096 elements per input, BLOCK_K = min(next_pow2(K), kd.MAX_BLOCK_K) classes."""
    block_k = min(triton.next_power_of_2(k), kd.MAX_BLOCK_K)
    block_b = max(1, min(4096 // block_k, triton.next_power_of_2(b)))
    tiles = triton.cdiv(b, block_b) * triton.cdiv(k, block_k)
    return Launch(name, 1, max(1, min(16, block_b * block_k // 256)), walks * n_in * b * k * dtype.itemsize, 4 * 5 * b,
                  n_in * block_b * block_k * dtype.itemsize, steps=walks * tiles)


def logit_launches(op: str, b: int, k: int, dtype: torch.dtype) -> list[Launch]:
    """dkd_loss / dist_loss / ofa_loss on (B, K) logits of ``dtype``, gradient to the student. DKD, OFA: a per-chunk
    launch, a one-program merge, the backward. DIST: the six forward launches of dist.forward_plan, the backward a
    1-D grid over row tiles, each program walking its rows' class chunks (twice when K is over one chunk)."""
    if op in ("dkd_loss", "ofa_loss"):
        return _two_stage_launches(op, b, k, dtype)
    if op != "dist_loss":
        raise ValueError(f"logit_launches: unknown op {op!r}")
    return _dist_launches(b, k, dtype)


def _dist_launches(b: int, k: int, dtype: torch.dtype) -> list[Launch]:
    isz = dtype.itemsize
    ptrs = dict.fromkeys(("s_ptr", "t_ptr", "p_ptr", "ds_ptr", "dt_ptr"), _TRITON_TYPE[dtype])
    floats = ("temperature", "beta", "gamma", "eps")
    unit = {"s_stride_k": 1, "t_stride_k": 1, "p_stride_k": 1}
    out = []
    for plan in dist.forward_plan(b, k, dtype):
        logits = plan["read_bytes_per_elem_pass"] * 2 * b * k * isz
        tile_bytes = plan["tile"] * (2 * isz if plan["read_bytes_per_elem_pass"] else 4)
        out.append(Launch(plan["name"], plan["programs"], plan["num_warps"], logits + plan["stat_read_bytes"],
                          plan["stat_write_bytes"], tile_bytes, steps=plan["steps"],
                          build=_build(plan["kernel"], {**unit, **plan["constexprs"]}, plan["num_warps"], ptrs,
                                       floats=floats)))
    cfg = kd._bwd_config(b, k)
    one_chunk = dist._one_chunk(k)
    walks = 1 if one_chunk else 2
    align = 16 // isz if k % (16 // isz) == 0 else 1
    stats = 4 * (dist._NROW * b + dist._NCOL * k)
    out.append(Launch("dist bwd (row tiles, whole rows)", triton.cdiv(b, cfg["BLOCK_B"]), cfg["num_warps"],
                      walks * 2 * b * k * isz + stats, b * k * isz, 2 * cfg["BLOCK_B"] * cfg["BLOCK_K"] * isz,
                      steps=walks * triton.cdiv(k, cfg["BLOCK_K"]),
                      build=_build(dist._dist_bwd_kernel, {**unit, "ONE_CHUNK": one_chunk, "GRAD_S": True,
                                                           "GRAD_T": False, "ALIGN": align,
                                                           "BLOCK_B": cfg["BLOCK_B"], "BLOCK_K": cfg["BLOCK_K"]},
                                   cfg["num_warps"], ptrs, floats=floats)))
    return out


def _two_stage_launches(op: str, b: int, k: int, dtype: torch.dtype) -> list[Launch]:
    """DKD (kd.py's per-chunk kernel over the non-target classes, 5 statistics per chunk) or OFA (its own per-chunk
    kernel, 6): the per-chunk launch, the one-program merge (which also reads each row's two target logits), the
    backward writing the student's gradient."""
    isz = dtype.itemsize
    ptrs = dict.fromkeys(("s_ptr", "t_ptr", "p_ptr", "ds_ptr", "dt_ptr"), _TRITON_TYPE[dtype])
    ptrs["y_ptr"] = "i64"
    align = 16 // isz if k % (16 // isz) == 0 else 1
    layout = {"ALIGN": align, "s_stride_k": 1, "t_stride_k": 1, "p_stride_k": 1, "y_stride": 1}
    part, merge, bwd = kd._partial_config(b, k), kd._merge_config(b, k), kd._bwd_config(b, k)
    chunks = merge["N_CHUNKS"]
    tile = part["BLOCK_B"] * part["BLOCK_K"]
    if op == "dkd_loss":
        name, nslot, nstat = "dkd", 5, dkd._NSTAT
        partial = kd._kl_partial_kernel
        merge_kernel, bwd_kernel = dkd._dkd_merge_kernel, dkd._dkd_bwd_kernel
        flags = {"PAIR": False, "T_IS_ONE": False, "EXCLUDE_TARGET": True}
    else:
        name, nslot, nstat = "ofa", 6, ofa._NSTAT
        partial, merge_kernel, bwd_kernel = ofa._ofa_partial_kernel, ofa._ofa_merge_kernel, ofa._ofa_bwd_kernel
        flags = {}
    floats = ("temperature", "alpha", "beta", "mask_value", "eps")
    stats = nstat * b * 4
    merge_cx = {"N_CHUNKS": chunks, "BLOCK_B": merge["BLOCK_B"], "s_stride_k": 1, "t_stride_k": 1, "y_stride": 1}
    return [
        Launch(f"{name} fwd: per-chunk statistics", triton.cdiv(b, part["BLOCK_B"]) * chunks, part["num_warps"],
               2 * b * k * isz + 8 * b, chunks * nslot * b * 4, 2 * tile * isz,
               build=_build(partial, {**flags, **layout, "BLOCK_B": part["BLOCK_B"], "BLOCK_K": part["BLOCK_K"]},
                            part["num_warps"], ptrs, floats=floats)),
        Launch(f"{name} fwd: merge (one program)", 1, merge["num_warps"],
               chunks * nslot * b * 4 + 8 * b + 2 * b * isz, stats + 4, merge["BLOCK_B"] * chunks * nslot * 4,
               steps=triton.cdiv(b, merge["BLOCK_B"]),
               build=_build(merge_kernel, merge_cx, merge["num_warps"], ptrs, floats=floats)),
        Launch(f"{name} bwd", triton.cdiv(b, bwd["BLOCK_B"]) * triton.cdiv(k, bwd["BLOCK_K"]), bwd["num_warps"],
               2 * b * k * isz + 8 * b + stats, b * k * isz, 2 * bwd["BLOCK_B"] * bwd["BLOCK_K"] * isz,
               build=_build(bwd_kernel, {**layout, "GRAD_S": True, "GRAD_T": False, "BLOCK_B": bwd["BLOCK_B"],
                                         "BLOCK_K": bwd["BLOCK_K"]}, bwd["num_warps"], ptrs, floats=floats)),
    ]

def hcl_launches(stages: list[tuple[int, ...]], b: int, dtype: torch.dtype) -> list[Launch]:
    """hcl_loss_stages over ``stages`` (per sample: (L, C) tokens or (C, H, W) NCHW maps), both sides contiguous in
    ``dtype``, at batch ``b``: see hcl_launches_for."""
    feats = [torch.empty((b, *shape), device="meta", dtype=dtype) for shape in stages]
    return hcl_launches_for(feats, feats)


def hcl_launches_for(feats_s: list[torch.Tensor], feats_t: list[torch.Tensor]) -> list[Launch]:
    """hcl_loss_stages(feats_s, feats_t) (tensors of any strides and dtypes; device="meta" will do) as on a GPU,
    both gradients: per stage one forward and one backward launch (plus the sum of the partials, not modelled: one
    tiny launch). Each program walks its planes row by row, one [BLOCK_C, BLOCK_W] tile of each input per step, the
    loads of NUM_STAGES - 1 rows ahead in flight; each gradient is written in its input's layout."""
    out = []
    for fs, ft in zip(feats_s, feats_t):
        programs, c, h, w, block_c, block_w, stages, warps, _ = hcl._plan(fs, fill=True)
        elems = fs.numel()
        isz = fs.element_size() + ft.element_size()
        coef = fs.shape[0] * hcl._NUM_COEFS * c * 4
        steps = triton.cdiv(w, block_w) * h
        depth = max(1, min(stages - 1, h))  # rows whose loads the pipelined row loop has in flight
        tile = depth * block_c * block_w * isz
        same = fs.stride() == ft.stride() and fs.dtype == ft.dtype
        kind = "tokens" if fs.dim() == 3 else "map"
        name = f"hcl {kind} {tuple(fs.shape[1:])}" + ("" if same else " (mixed)")
        out += [Launch(f"{name} fwd", programs, warps, elems * isz, coef + programs * 4, tile, steps=steps,
                       depth=depth, build=hcl_build("_hcl_fwd_kernel", fs, ft)),
                Launch(f"{name} bwd", programs, warps, elems * isz + coef, elems * isz, tile, steps=steps,
                       depth=depth, build=hcl_build("_hcl_bwd_kernel", fs, ft))]
    return out


def hcl_build(kernel_name: str, fs: torch.Tensor, ft: torch.Tensor, write_s: bool = True, write_t: bool = True,
              arch: int = 90) -> dict:
    """A compile-only build of an HCL kernel as the launcher specialises it for ``fs``, ``ft`` on a GPU (their
    dtypes, strides, the tile of hcl._plan; gradients in the inputs' layouts) and as the JIT does: int arguments
    equal to 1 become constexprs, multiples of 16 (and every pointer) are marked 16-divisible."""
    kernel = getattr(hcl, kernel_name)
    _, c, h, w, block_c, block_w, stages, warps, _ = hcl._plan(fs, fill=True)
    layouts = {p: hcl._layout(x) for p, x in (("s", fs), ("t", ft), ("gs", fs), ("gt", ft))}
    values = {"C": c, "H": h, "W": w // hcl._w_align(w)}
    constexprs = {"BLOCK_C": block_c, "BLOCK_W": block_w, "NUM_STAGES": stages, "WRITE_S": write_s, "WRITE_T": write_t,
                  "W_ALIGN": hcl._w_align(w)}
    for prefix, (strides, layout) in layouts.items():
        values.update({f"{prefix}_s{axis}": st for axis, st in zip("bchw", strides)})
        constexprs[f"{prefix.upper()}_LAYOUT"] = layout
    types = {"s_ptr": fs.dtype, "t_ptr": ft.dtype, "gs_ptr": fs.dtype, "gt_ptr": ft.dtype}
    pointer_types = {k: _TRITON_TYPE[v] for k, v in types.items()}
    constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
    signature, aligned = {}, []
    for name in kernel.arg_names:
        if name.endswith("_ptr"):
            signature[name] = "*" + pointer_types.get(name, "fp32")
            aligned.append(name)
        elif name in constexprs:
            signature[name] = "constexpr"
        elif name.startswith("scale"):
            signature[name] = "fp32"
        elif values[name] == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if values[name] % 16 == 0:
                aligned.append(name)
    maxnreg = hcl.fwd_maxnreg(block_c, warps) if kernel_name == "_hcl_fwd_kernel" else None
    return dict(kernel=kernel, signature=signature, constexprs=constexprs, arch=arch, num_warps=warps,
                aligned=aligned, maxnreg=maxnreg)


def raa_core_launches(b: int, heads: int, n: int, head_dim: int, dtype: torch.dtype) -> list[Launch]:
    """raa.raa_core on (B, H, N, hd) q, k, v of ``dtype``: forward (O, LSE) and backward (dQ, dK, dV)."""
    isz, t = dtype.itemsize, b * heads * n * head_dim
    lse = b * heads * n * 4
    fwd, bwd = raa._fwd_config(n, head_dim, dtype), raa._bwd_config(n, head_dim, dtype)
    ptrs = dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr"),
                         _TRITON_TYPE[dtype])
    ptrs["lse_ptr"] = "fp32"

    def cx(cfg):
        return {"HEAD_DIM": head_dim, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": cfg["BLOCK_D"]}

    return [
        Launch("raa fwd", b * heads, fwd["num_warps"], 3 * t * isz, t * isz + lse,
               (fwd["BLOCK_M"] + 2 * n) * head_dim * isz, steps=triton.cdiv(n, fwd["BLOCK_M"]),
               flops=4 * b * heads * n * n * head_dim,
               build=_build(raa._raa_fwd_kernel, cx(fwd), fwd["num_warps"], ptrs, floats=("scale",),
                            maxnreg=fwd["maxnreg"])),
        Launch("raa bwd", b * heads, bwd["num_warps"], 4 * t * isz + lse, 3 * t * isz,
               (2 * bwd["BLOCK_M"] + 2 * n) * head_dim * isz, steps=triton.cdiv(n, bwd["BLOCK_M"]),
               flops=10 * b * heads * n * n * head_dim,
               build=_build(raa._raa_bwd_kernel, cx(bwd), bwd["num_warps"], ptrs, floats=("scale",),
                            maxnreg=bwd["maxnreg"])),
    ]


def with_resources(launches: list[Launch]) -> list[Launch]:
    """The launches with ``regs`` / ``spills`` / ``smem`` read from compile-only builds of their kernels for the
    model GPU's arch (launches without a build, or where Triton's cuobjdump is missing, keep None), and ``depth``
    1 where the build's PTX has no cp.async (the loop the launch plan assumed pipelined was not)."""
    from ._compile_check import compile_kernels, resource_usage

    todo = [i for i, x in enumerate(launches) if x.build is not None]
    out = list(launches)
    for i, asm in zip(todo, compile_kernels([launches[i].build for i in todo])):
        usage = resource_usage(asm["cubin"])
        if usage:
            u = usage[0]
            smem = max(u.get("SHARED", 0), asm.get("shared", 0))  # Triton launches with its dynamic allocation
            out[i] = dataclasses.replace(out[i], regs=u["REG"], spills=u["STACK"], smem=smem)
        if out[i].depth > 1 and "cp.async" not in asm["ptx"]:  # the compiler did not pipeline the loop
            out[i] = dataclasses.replace(out[i], depth=1, inflight_bytes=out[i].inflight_bytes // out[i].depth)
    return out
