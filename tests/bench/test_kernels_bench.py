"""patfast.bench.kernels: the cases, the traffic model, and the GPU-side logic of the benchmark run on fakes.

There is no GPU here, so the CUDA branch of ``Bench`` (Triton provider, do_bench figures, launch counts, CUDA-graph
timing, the compile budget) runs on CPU tensors with the timers and the profiler replaced by fakes, and Triton
through its interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU).
"""

import json
import subprocess
import sys

import pytest
import torch

from patfast.bench import kernels as K
from patfast.bench.kernels import NO_CUDA, NO_CUDA_SDPA
from patfast.bench.tables import render as render_md
from patfast.cli import main

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (reference-only) behaviour")
ROW_KEYS = {"op", "shape", "dtype", "mode", "provider", "ms", "gbps"}


def assert_user_error(code, err, needle):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("patfast: error: "), err
    assert needle in lines[0], err


def test_cases_cover_pat_shapes_and_the_traffic_model():
    cases = K.build_cases("all", list(K.TEACHERS), list(K.KD_CLASSES), [64, 128, 256])
    # HCL same layout and as in the step (the 3 recorded pairs of these teachers), the logit losses (PAT's two,
    # DKD, DIST, OFA; the KD pair as in the step), RAA
    assert len(cases) == 3 * 3 + 3 * 3 + 5 * 2 * 3 + 1 * 3 + 2 * 3
    assert {c.op for c in K.build_cases("kd", [], [100], [64])} == set(K.KD_OPS)  # --op kd: PAT's KL ops
    swin = K.hcl_case("swin_t", 128)
    assert swin.shapes == ((128, 3136, 96), (128, 784, 192), (128, 196, 384), (128, 49, 768))
    assert swin.elements() == 72_253_440  # kernels/hcl.py's byte budget: 144.5 MB per bf16 tensor
    assert swin.traffic_bytes("fwd", 2) == 2 * 72_253_440 * 2
    assert swin.traffic_bytes("fwd+bwd", 2) == 6 * 72_253_440 * 2  # the 6-pass model
    assert K.hcl_case("resnet50", 64).shapes[-1] == (64, 2048, 7, 7)
    pair, kd = K.kd_case("kd_loss_pair", 1000, 256), K.kd_case("kd_loss", 100, 64)
    assert pair.shape == [256, 1000] and pair.traffic_bytes("fwd+bwd", 2) == 8 * 256_000 * 2
    assert kd.traffic_bytes("fwd", 4) == 2 * 6400 * 4 and kd.traffic_bytes("fwd+bwd", 4) == 5 * 6400 * 4
    for op in ("dkd_loss", "dist_loss", "ofa_loss"):  # the kd_loss floor: both logits read, the gradient written
        case = K.kd_case(op, 1000, 128)
        assert case.traffic_bytes("fwd", 2) == 2 * 128_000 * 2 and case.traffic_bytes("fwd+bwd", 2) == 5 * 128_000 * 2
    # the cases the targets are judged on run first (a GPU run cut short still has them)
    first = K.target_first(cases)[:3]
    assert first == [swin, K.kd_case("kd_loss_pair", 100, 256), pair]
    assert K.target_first(cases)[3:5] == [K.raa_case("raa_block", 128), K.raa_case("raa_core", 128)]
    # then their counterparts as in the recorded step, before every other case
    twins = K.target_first(cases)[5:7]
    assert [(c.op, c.batch, c.layout) for c in twins] == [("hcl_loss_stages", 128, K.STEP_LAYOUT),
                                                           ("kd_loss_pair", 256, K.STEP_LAYOUT)]
    assert twins[0].name.startswith("swin_t->")


def test_raa_cases_and_traffic_model():
    assert K.build_cases("raa", ["swin_t"], [100], [64, 128, 256]) == [
        K.raa_case(op, b) for op in K.RAA_OPS for b in (64, 128, 256)]
    core, block = K.raa_case("raa_core", 128), K.raa_case("raa_block", 128)
    assert core.shape == [128, 8, 64, 64] and block.shape == [128, 64, 512]
    # kernels/raa.py's byte budget: fwd 4 x 8,388,608 B + the fp32 LSE; bwd 7 tensors + LSE
    assert core.traffic_bytes("fwd", 2) == 33_816_576
    assert core.traffic_bytes("fwd+bwd", 2) == 33_816_576 + 58_982_400
    x, p = 128 * 64 * 512, 3 * 512 * 512 + 5 * 512 + 64 * 512
    assert block.traffic_bytes("fwd", 2) == (2 * x + p) * 2 and block.traffic_bytes("fwd+bwd", 2) == (5 * x + 3 * p) * 2
    assert K.PROVIDERS_OF["raa_block"] == ("eager", "compiled", "sdpa_flash", "sdpa_cudnn", "triton")
    assert "compiled" not in K.PROVIDERS_OF["raa_core"]
    args, grads = K.make_inputs(block, "fwd+bwd", torch.device("cpu"), torch.float32)
    assert args[-1] == 8 and len(grads) == 8 and all(g.is_leaf and g.requires_grad for g in grads)


def test_raa_providers_agree_on_the_cpu():
    """eager, SDPA (the CPU's own kernel here) and Triton (interpreter) compute the same block and core."""
    for op in K.RAA_OPS:
        case = K.raa_case(op, 2)
        args, _ = K.make_inputs(case, "fwd", torch.device("cpu"), torch.float32)
        want = K.op_function(case, "eager", amp=False)(*args)
        for provider in ("sdpa_flash", "triton"):
            got = K.op_function(case, provider, amp=False)(*args)
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (op, provider)


def test_inductor_sdpa_rewrite_is_read_from_the_generated_code(monkeypatch):
    assert K.sdpa_in_code([]).startswith("unknown")
    assert K.sdpa_in_code(["buf0 = torch.ops.aten._scaled_dot_product_flash_attention.default(a, b, c)"]) == \
        "yes (_scaled_dot_product_flash_attention)"
    assert K.sdpa_in_code(["extern_kernels.bmm(a, b, out=buf1)\ntriton_per_fused__softmax_0.run(buf1)"]) == "no"
    import torch._inductor.utils as U

    monkeypatch.setattr(U, "run_and_get_code", lambda fn: (fn(), ["aten._scaled_dot_product_cudnn_attention(q)"]))
    runner = K.Runner(lambda x: x * 2, (torch.ones(2),), [], "fwd")
    assert K.inspect_compiled(runner) == "yes (_scaled_dot_product_cudnn_attention)"


def test_inputs_are_fresh_random_and_require_the_right_grads():
    case = K.kd_case("kd_loss_pair", 41, 3)
    (s, pt, t, temp), grads = K.make_inputs(case, "fwd+bwd", torch.device("cpu"), torch.float32)
    assert s.requires_grad and pt.requires_grad and not t.requires_grad and grads == [s, pt]
    assert temp == K.TEMPERATURE and s.abs().min() > 0 and not torch.equal(s, pt)
    (s, t, target, *weights), grads = K.make_inputs(K.kd_case("dkd_loss", 41, 5), "fwd+bwd", torch.device("cpu"),
                                                     torch.float32)
    assert grads == [s] and not t.requires_grad and weights == list(K.DKD_ARGS)
    assert target.shape == (5,) and target.dtype == torch.int64 and 0 <= target.min() <= target.max() < 41
    (s, t, *weights), grads = K.make_inputs(K.kd_case("dist_loss", 41, 5), "fwd", torch.device("cpu"), torch.float32)
    assert grads == [s] and not s.requires_grad and weights == list(K.DIST_ARGS)
    (s, t, target, *weights), grads = K.make_inputs(K.kd_case("ofa_loss", 41, 5), "fwd+bwd", torch.device("cpu"),
                                                     torch.float32)
    assert grads == [s] and weights == list(K.OFA_ARGS) and target.dtype == torch.int64 and target.max() < 41
    (fs, ft), grads = K.make_inputs(K.hcl_case("convnext_t", 1), "fwd", torch.device("cpu"), torch.float32)
    assert [x.shape for x in fs] == [torch.Size(s) for s in K.hcl_case("convnext_t", 1).shapes]
    assert not any(x.requires_grad for x in fs + ft)


@pytest.fixture
def fake_gpu(monkeypatch):
    """do_bench, do_bench_cudagraph and the profiler replaced: fixed figures, one launch each way for Triton."""
    times = {"eager": 2.0, "compiled": 0.5, "triton": 0.1, "sdpa_flash": 0.4, "sdpa_cudnn": 0.3}
    calls = []

    def fake_bench_ms(fn, cuda, **kw):
        assert cuda
        provider = calls[-1]
        return times[provider], times[provider] * 0.9, times[provider] * 1.1, "fake do_bench"

    def fake_launches(runner, cuda):
        assert cuda
        n = 1 if calls[-1] == "triton" else 5
        return [f"k{i}" for i in range(n)], [f"b{i}" for i in range(n)]

    real_measure = K.Bench.measure

    def measure(self, case, mode, provider, fn=None):
        calls.append(provider)
        return real_measure(self, case, mode, provider, fn)

    monkeypatch.setattr(K, "bench_ms", fake_bench_ms)
    monkeypatch.setattr(K, "count_launches", fake_launches)
    monkeypatch.setattr(K, "graph_ms", lambda runner: (0.008, 0.007, 0.009))
    monkeypatch.setattr(K.Bench, "measure", measure)
    monkeypatch.setattr(K, "op_function", lambda case, provider, amp: _cpu_op(case, provider))
    return calls


REAL_OP_FUNCTION = K.op_function


def _cpu_op(case, provider):
    from patfast import ops

    if case.op in K.RAA_OPS:
        return REAL_OP_FUNCTION(case, provider, amp=False)
    op = getattr(ops, case.op)
    return lambda *args: op(*args, backend="triton" if provider == "triton" else "reference")


def test_gpu_logic_fills_every_row_and_keeps_the_budget(fake_gpu, tmp_path):
    cases = [K.hcl_case("swin_t", 1), K.kd_case("kd_loss_pair", 41, 3), K.kd_case("kd_loss", 41, 3)]
    bench = K.Bench(cases, cuda=True, compiled=True, compiled_batches={3}, quick=True, budget=None,
                    interpret_check=False, env={"gpu": "fake"}, ceilings={"copy_gbps": 1.0, "bf16_tflops": 1.0},
                    json_path=str(tmp_path / "k.json"), md_path=None, log=lambda line: None,
                    device=torch.device("cpu"), dtype=torch.float32)
    doc = bench.run()
    rows = {(r["op"], r["mode"], r["provider"]): r for r in doc["kernels"]}
    assert len(rows) == 3 * 2 * 3
    # eager and Triton everywhere first, then the compiled reference (only at the compiled batch, B=3)
    assert fake_gpu[:12] == ["eager", "triton"] * 6 and set(fake_gpu[12:]) == {"compiled"}
    hcl = rows[("hcl_loss_stages", "fwd+bwd", "triton")]
    assert hcl["ms"] == 0.1 and hcl["vs_eager"] == pytest.approx(20.0) and hcl["launches_fwd"] == 1
    assert "B=3 only" in rows[("hcl_loss_stages", "fwd", "compiled")]["note"]
    pair = rows[("kd_loss_pair", "fwd+bwd", "triton")]
    assert pair["vs_compiled"] == pytest.approx(5.0) and pair["ms_graph"] == 0.008
    assert pair["kernels_fwd"] == ["k0"] and pair["kernels_bwd"] == ["b0"]
    assert rows[("kd_loss_pair", "fwd+bwd", "compiled")]["ms_graph"] is None  # graphs: eager and Triton only
    assert rows[("hcl_loss_stages", "fwd", "eager")]["launches_fwd"] is None  # counted on fwd+bwd rows
    assert "| 41 | 3 | fwd+bwd | triton | 100.0 us (90.0-110.0) | 8.0 us (7.0-9.0) |" in render_md(doc["kernels"])

    fake_gpu.clear()
    bench = K.Bench(cases[1:], cuda=True, compiled=True, compiled_batches=None, quick=True, budget=0.0,
                    interpret_check=False, env={"gpu": "fake"}, ceilings={}, json_path=None, md_path=None,
                    log=lambda line: None, device=torch.device("cpu"), dtype=torch.float32)
    doc = bench.run()
    compiled = [r for r in doc["kernels"] if r["provider"] == "compiled"]
    assert "compiled" not in fake_gpu
    assert all(r["ms"] is None and "time budget" in r["note"] for r in compiled)


def test_gpu_logic_for_the_baselines_logit_losses(fake_gpu):
    # DKD, DIST and OFA ride on the KD rows' logic: eager and Triton timed, CUDA-graph figures, launches counted
    cases = [K.kd_case("dkd_loss", 41, 3), K.kd_case("dist_loss", 41, 3), K.kd_case("ofa_loss", 41, 3)]
    bench = K.Bench(cases, cuda=True, compiled=False, compiled_batches=None, quick=True, budget=None,
                    interpret_check=False, env={"gpu": "fake"}, ceilings={"copy_gbps": 1.0, "bf16_tflops": 1.0},
                    json_path=None, md_path=None, log=lambda line: None, device=torch.device("cpu"),
                    dtype=torch.float32)
    rows = {(r["op"], r["mode"], r["provider"]): r for r in bench.run()["kernels"]}
    assert len(rows) == 3 * 2 * 3
    for op in ("dkd_loss", "dist_loss", "ofa_loss"):
        tri = rows[(op, "fwd+bwd", "triton")]
        assert tri["ms"] == 0.1 and tri["vs_eager"] == pytest.approx(20.0) and tri["ms_graph"] == 0.008
        assert tri["launches_fwd"] == 1 and tri["bytes"] == 5 * 3 * 41 * 4
        assert "error" not in tri and rows[(op, "fwd", "eager")]["ms"] == 2.0


def test_a_failing_row_is_recorded_and_the_rest_still_run(fake_gpu, monkeypatch):
    def broken(case, provider):
        if provider == "triton":
            def fail(*args):
                raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
            return fail
        return _cpu_op(case, provider)

    monkeypatch.setattr(K, "op_function", lambda case, provider, amp: broken(case, provider))
    bench = K.Bench([K.kd_case("kd_loss", 41, 3)], cuda=True, compiled=False, compiled_batches=None, quick=True,
                    budget=None, interpret_check=False, env={}, ceilings={}, json_path=None, md_path=None,
                    log=lambda line: None, device=torch.device("cpu"), dtype=torch.float32)
    rows = bench.run()["kernels"]
    tri = [r for r in rows if r["provider"] == "triton"]
    assert len(tri) == 2
    for r in tri:  # FAILED, with the exception: never "not measured"
        assert r["ms"] is None and r["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
        assert r["note"] == f"FAILED: {r['error']}"
    assert all(r["ms"] == 2.0 for r in rows if r["provider"] == "eager")


@cpu_only
def test_an_interpreter_run_that_raises_is_failed_and_the_bench_exits_1(tmp_path, monkeypatch, capsys):
    from patfast import ops

    real = ops.kd_loss

    def broken(*args, backend="auto", **kwargs):
        if backend == "triton":
            raise RuntimeError("injected: the Triton KD kernel broke")
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(ops, "kd_loss", broken)
    path = tmp_path / "kernels.json"
    code = main(["bench", "kernels", "--op", "kd", "--classes", "41", "--interpret-check", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 1
    rows = {(r["op"], r["mode"], r["provider"]): r for r in json.loads(path.read_text())["kernels"]}
    assert {r["case"] for r in rows.values()} == {"K=41"}  # the KD pair as in the step has K = 100: not selected
    for mode in K.MODES:
        failed = rows[("kd_loss", mode, "triton")]
        assert failed["error"] == "interpreter check: RuntimeError: injected: the Triton KD kernel broke"
        assert failed["note"] == f"FAILED: {failed['error']}"
        assert rows[("kd_loss_pair", mode, "triton")]["interpreter_rel_err"] < 1e-4  # the others still ran
        assert rows[("kd_loss", mode, "eager")]["ms"] > 0
    assert "bench kernels: FAILED: kd_loss K=41 B=1 fwd triton: interpreter check: RuntimeError: injected" in out


@cpu_only
def test_an_interpreter_result_off_the_reference_is_failed(tmp_path, monkeypatch):
    from patfast import ops

    real = ops.kd_loss
    monkeypatch.setattr(ops, "kd_loss", lambda *a, backend="auto", **k: real(*a, backend=backend, **k)
                        * (1.01 if backend == "triton" else 1.0))
    path = tmp_path / "kernels.json"
    assert main(["bench", "kernels", "--op", "kd", "--classes", "41", "--interpret-check", "--json", str(path)]) == 1
    rows = {(r["op"], r["mode"], r["provider"]): r for r in json.loads(path.read_text())["kernels"]}
    off = rows[("kd_loss", "fwd", "triton")]
    assert off["error"] == ("interpreter check: AssertionError: interpreter outputs differ from the reference: rel. "
                            "error 1.00e-02 > 1e-03")
    assert off["interpreter_rel_err"] == pytest.approx(0.01, rel=1e-3)
    assert "error" not in rows[("kd_loss_pair", "fwd", "triton")]


def test_raa_gpu_logic_records_every_provider_and_an_unavailable_sdpa_backend(fake_gpu, tmp_path):
    # The CUDA branch on CPU tensors: sdpa_flash runs (the CPU's flash kernel stands in), sdpa_cudnn has no kernel
    # on the CPU, which is what an unavailable backend on a GPU looks like: recorded as not measured, with the reason.
    cases = [K.raa_case("raa_block", 2), K.raa_case("raa_core", 2)]
    bench = K.Bench(cases, cuda=True, compiled=False, compiled_batches=None, quick=True, budget=None,
                    interpret_check=False, env={"gpu": "fake"}, ceilings={}, json_path=None,
                    md_path=str(tmp_path / "k.md"), log=lambda line: None, device=torch.device("cpu"),
                    dtype=torch.float32)
    doc = bench.run()
    rows = {(r["op"], r["mode"], r["provider"]): r for r in doc["kernels"]}
    assert len(rows) == 2 * 5 + 2 * 4
    for op in K.RAA_OPS:
        tri = rows[(op, "fwd+bwd", "triton")]
        assert tri["ms"] == 0.1 and tri["ms_bwd"] == 0.1 and tri["vs_eager"] == pytest.approx(20.0)
        assert tri["vs_sdpa_flash"] == pytest.approx(4.0) and tri["launches_fwd"] == 1
        cudnn = rows[(op, "fwd", "sdpa_cudnn")]
        assert cudnn["ms"] is None and cudnn["note"].startswith("not measured: RuntimeError"), cudnn
        assert tri["vs_sdpa_cudnn"] is None and tri["sdpa_best"] == "sdpa_flash"
        assert tri["vs_sdpa"] == pytest.approx(4.0)
    assert "not measured: torch.compile(reference) not requested" in rows[("raa_block", "fwd", "compiled")]["note"]
    md = (tmp_path / "k.md").read_text()
    assert "### raa_block" in md and "### raa_core" in md and "| 2 | fwd+bwd | triton | 100.0 us (90.0-110.0) |" in md


def test_raa_on_the_cpu_is_reference_only_and_says_why(tmp_path):
    bench = K.Bench([K.raa_case("raa_core", 1)], cuda=False, compiled=False, compiled_batches=None, quick=True,
                    budget=None, interpret_check=False, env={"gpu": None}, ceilings={}, json_path=None, md_path=None,
                    log=lambda line: None)
    rows = bench.run()["kernels"]
    assert {r["provider"] for r in rows if r["ms"] is not None} == {"eager"}
    sdpa = [r for r in rows if r["provider"] in K.SDPA_PROVIDERS]
    assert len(sdpa) == 4 and all(r["note"] == f"not measured: {K.NO_CUDA_SDPA}" for r in sdpa)
    assert all(r["note"] == f"not measured: {K.NO_CUDA}" for r in rows if r["provider"] == "triton")


# ----------------------------------------------------------------------------------------------------------------
# patfast bench kernels
# ----------------------------------------------------------------------------------------------------------------


@cpu_only
def test_bench_kernels_quick_on_cpu_is_reference_only(tmp_path, capsys):
    path = tmp_path / "kernels.json"
    code = main(["bench", "kernels", "--quick", "--json", str(path), "--md", str(tmp_path / "k.md")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert NO_CUDA in out  # says reference-only, and why
    doc = json.loads(path.read_text())
    for row in doc["kernels"]:
        assert ROW_KEYS <= set(row), row
        assert (row["ms"] is None) == (row["gbps"] is None), row
    assert {r["case"] for r in doc["kernels"] if r["op"] == "hcl_loss_stages"} == {
        "swin_t", "swin_t->resnet18 (as in the step)"}  # --quick: the first teacher, both layouts
    assert "cases as in the step: K=100 (as in the step), swin_t->resnet18 (as in the step)" in out
    assert {r["batch"] for r in doc["kernels"]} == {1}
    for r in doc["kernels"]:
        assert (r["ms"] is not None) == (r["provider"] == "eager"), r
    assert "not measured" in (tmp_path / "k.md").read_text()
    # the performance model alone, of the cases a GPU run would time (B = 128 with --quick, bf16), said to be one
    model = doc["model"]
    assert model["assumed"] and "a MODEL of an H200" in model["about"] and model["about"] in out
    assert "## Performance model" in (tmp_path / "k.md").read_text()
    pair = next(e for e in model["rows"] if e["op"] == "kd_loss_pair" and e["mode"] == "fwd+bwd")
    assert (pair["batch"], pair["dtype"], pair["ms"], pair["frac_floor"]) == (128, "bfloat16", None, None)
    assert len(pair["launches"]) == 3 and pair["estimate_ms"] > pair["floor_ms"] > 0


@cpu_only
def test_bench_kernels_op_raa_on_cpu(tmp_path, capsys):
    path = tmp_path / "kernels.json"
    code = main(["bench", "kernels", "--op", "raa", "--json", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert NO_CUDA in out and NO_CUDA_SDPA in out
    rows = json.loads(path.read_text())["kernels"]
    assert {r["op"] for r in rows} == {"raa_block", "raa_core"} and {r["batch"] for r in rows} == {1}
    assert {r["provider"] for r in rows if r["ms"] is not None} == {"eager"}
    assert all(r["ms_bwd"] > 0 for r in rows if r["provider"] == "eager" and r["mode"] == "fwd+bwd")


@pytest.mark.parametrize("argv, needle", [
    (["bench", "kernels", "--op", "nope"], "invalid choice: 'nope'"),
    (["bench", "kernels", "--op", "raa", "--batch", "-1"], "--batch must be comma-separated positive integers"),
    (["bench", "kernels", "--batch", "64,x"], "--batch must be comma-separated positive integers"),
    (["bench", "kernels", "--batch", "0"], "--batch must be comma-separated positive integers"),
    (["bench", "kernels", "--teacher", "vit"], "unknown teacher vit"),
    (["bench", "nothing"], "invalid choice: 'nothing'"),
    (["bench", "kernels", "--ceilings", "/nonexistent/ceilings.json", "--op", "kd"], "cannot read ceilings"),
])
def test_bench_mistakes_are_one_line_errors(capsys, argv, needle):
    code = main(argv)
    _, err = capsys.readouterr()
    assert_user_error(code, err, needle)


def test_bench_bad_op_from_the_command_line_exits_2():
    proc = subprocess.run([sys.executable, "-m", "patfast", "bench", "kernels", "--op", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("patfast: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
