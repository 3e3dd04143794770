"""The kernels' performance model (patfast.kernels.perf_model): occupancy arithmetic, floor and estimate, the launch
plans at PAT's shapes, and (compile-only, slow) the registers, spills and programs per SM they imply on an H200."""

import pytest
import torch

from patfast.bench.kernels import CUDA_BATCHES, PASSES, TEACHERS
from patfast.kernels import kd, perf_model

PAT_KD = [(256, 100), (256, 1000), (128, 1000)]  # (B, K): the KD target's batch, CIFAR-100 and ImageNet classes


@pytest.mark.parametrize(("regs", "warps", "want"), [
    (128, 8, 2),  # 128 x 32 x 8 = 32768 registers: two programs fill the SM's 65536
    (129, 8, 1),  # 129 -> 4352 per warp (rounded up to 256): 34816 per program, one fits
    (255, 4, 2),
    (32, 1, 32),  # the 32-blocks-per-SM limit
    (None, 4, 16),  # unknown registers: the thread limit only (2048 / 128)
])
def test_resident_programs_per_sm(regs, warps, want):
    assert perf_model.resident_per_sm(regs, warps) == want


def test_shared_memory_limits_residency():
    assert perf_model.resident_per_sm(32, 1, smem=100 * 1024) == 2  # 228 KiB / (100 + 1 KiB)


def test_floor_and_estimate_of_a_hand_made_launch():
    # 4.3 MB at 4300 GB/s = 1 us; enough in flight (132 * 4 programs x 64 KiB >> 3 MB): fill 1
    big = perf_model.Launch("x", programs=1056, num_warps=4, read_bytes=3_000_000, write_bytes=1_300_000,
                            inflight_bytes=65536, regs=64)
    r = perf_model.report([big], copy_gbps=4300, matmul_tflops=700)
    assert r["floor_us"] == pytest.approx(1.0)
    assert r["estimate_us"] == pytest.approx(perf_model.LAUNCH_US + 1.0)
    # one program walking 64 serial steps waits at least 64 latencies
    serial = perf_model.Launch("y", programs=1, num_warps=4, read_bytes=64 * 64, write_bytes=0, inflight_bytes=64,
                               steps=64, regs=64)
    r = perf_model.report([serial], copy_gbps=4300, matmul_tflops=700)
    assert r["estimate_us"] == pytest.approx(perf_model.LAUNCH_US + 64 * perf_model.DRAM_LATENCY_US)
    # FLOPs bound: 7e8 dot FLOPs at 700 TFLOP/s = 1 us
    dots = perf_model.Launch("z", programs=1056, num_warps=4, read_bytes=43, write_bytes=0, inflight_bytes=65536,
                             flops=700_000_000, regs=64)
    assert perf_model.report([dots], 4300, 700)["floor_us"] == pytest.approx(1.0)


@pytest.mark.parametrize(("b", "k"), PAT_KD)
@pytest.mark.parametrize("pair", [True, False])
def test_kd_plan_bytes_match_the_bench_traffic_model(b, k, pair):
    # the bench's passes (of B x K elements) are the floor; the model adds only the O(B) statistics between launches
    launches = perf_model.kd_launches(b, k, torch.bfloat16, pair=pair, grads=2 if pair else 1)
    passes = PASSES["kd_loss_pair" if pair else "kd_loss"][1]
    floor = passes * b * k * 2
    total = sum(x.read_bytes + x.write_bytes for x in launches)
    assert floor <= total <= floor + 8 * kd.MAX_CHUNKS * 10 * b * 4


@pytest.mark.parametrize("op", ["kd", "dkd_loss", "ofa_loss"])
@pytest.mark.parametrize(("b", "k"), PAT_KD)
def test_two_stage_forwards_run_at_least_4_programs_per_sm_and_merge_in_one_step(b, k, op):
    launches = (perf_model.kd_launches(b, k, torch.bfloat16) if op == "kd"
                else perf_model.logit_launches(op, b, k, torch.bfloat16))
    part, merge = launches[:2]
    assert part.programs >= 4 * perf_model.H200.sms and part.steps == 1
    assert merge.programs == 1 and merge.steps == 1


def test_the_single_program_forward_it_replaced_walks_serially():
    old = perf_model.single_program_forward("before", 256, 1000, torch.bfloat16, n_in=3)
    assert old.programs == 1 and old.steps == 64  # 256 rows in tiles of 4, K in one 1024-chunk
    new = perf_model.kd_launches(256, 1000, torch.bfloat16)[:2]
    model = {name: perf_model.report(x, 4300, 700)["estimate_us"] for name, x in (("old", [old]), ("new", new))}
    assert model["new"] < model["old"] / 5


@pytest.mark.slow
def test_compile_only_resources_at_pat_shapes():
    pytest.importorskip("triton.backends.nvidia")
    cases = [perf_model.kd_launches(b, k, torch.bfloat16, pair=True, grads=2) for b, k in PAT_KD]
    cases += [perf_model.logit_launches(op, b, k, torch.bfloat16) for b, k in PAT_KD
              for op in ("dkd_loss", "ofa_loss", "dist_loss")]
    cases.append(perf_model.raa_core_launches(128, 8, 64, 64, torch.bfloat16))
    flat = [x for launches in cases for x in launches]
    resolved = perf_model.with_resources(flat)
    if all(x.regs is None for x in resolved):
        pytest.skip("Triton's cuobjdump is not there: no register counts")
    for x in resolved:
        assert x.spills == 0, f"{x.name}: {x.spills} bytes of spills"
        assert x.regs <= 255
        per_sm = perf_model.resident_per_sm(x.regs, x.num_warps, x.smem)
        if x.programs > 1:  # every multi-program launch: its programs all fit on the chip in one wave or are >= 4/SM
            assert per_sm >= 2, f"{x.name}: {x.regs} registers x {x.num_warps} warps"
        if x.name.startswith("raa"):
            assert x.regs <= 128, f"{x.name}: {x.regs} registers"
        if x.name.endswith("fwd: per-chunk statistics"):
            assert per_sm >= 4 and x.regs <= 128, f"{x.name}: {x.regs} registers"


@pytest.mark.parametrize("b", CUDA_BATCHES)
@pytest.mark.parametrize("teacher", sorted(TEACHERS))
def test_hcl_launches_at_least_4_programs_per_sm_at_the_bench_shapes(teacher, b):
    launches = perf_model.hcl_launches(list(TEACHERS[teacher]), b, torch.bfloat16)
    assert min(x.programs for x in launches) >= 4 * perf_model.H200.sms


def test_dist_launches_follow_its_forward_plan():
    from patfast.kernels import dist

    launches = perf_model.logit_launches("dist_loss", 256, 1000, torch.bfloat16)
    plan = dist.forward_plan(256, 1000, torch.bfloat16)
    assert [x.name for x in launches[:-1]] == [p["name"] for p in plan] and launches[-1].name.startswith("dist bwd")
    streaming = [x for x, p in zip(launches, plan) if p["read_bytes_per_elem_pass"]]
    assert len(streaming) == 3 and all(x.programs >= 4 * perf_model.H200.sms and x.steps == 1 for x in streaming)
    old = perf_model.single_program_forward("before", 256, 1000, torch.bfloat16, walks=2)
    new_fwd = perf_model.report(launches[:-1], 4300, 700)["estimate_us"]
    assert new_fwd < perf_model.report([old], 4300, 700)["estimate_us"] / 3
