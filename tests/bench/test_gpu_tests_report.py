"""The GPU tests' report (benchmarks/pytest_report.py) keeps counts as tests run: pytest killed by a timeout still
gives passed / failed counts of what ran and the test it was running; parse_gpu_tests and results.md read it."""

import json
import os
import signal
import subprocess
import sys
import time

from render_results import make_doc, parse_gpu_tests, render_md

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TESTS = '''
import time

import pytest


def test_passes():
    pass


def test_fails():
    assert 1 == 2, "one is not two"


@pytest.mark.skip(reason="not here")
def test_skipped():
    pass


@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")


def test_errors(broken):
    pass


def test_hangs():
    time.sleep(600)


def test_never_reached():
    pass
'''


def run_pytest_until_hang(tmp_path, report):
    """pytest over TESTS with the plugin; SIGTERM (what timeout(1) sends) once test_hangs has started."""
    (tmp_path / "test_sample.py").write_text(TESTS)
    path = [os.path.join(ROOT, "benchmarks"), ROOT, os.environ.get("PYTHONPATH", "")]  # the plugin, patfast
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p",
                             "pytest_report", "--report-json", str(report), "test_sample.py"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            state = json.loads(report.read_text()) if report.exists() else {}
            if (state.get("running") or "").endswith("test_hangs"):
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        else:
            raise AssertionError("test_hangs never started")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM, out
    return out


def test_killed_pytest_still_gives_counts_and_the_running_test(tmp_path):
    report = tmp_path / "report.json"
    out = run_pytest_until_hang(tmp_path, report)
    assert "test_sample.py::test_passes PASSED" in out  # -v: a line per test in the log as it runs
    t = parse_gpu_tests(124, str(report), collect_only=False, timeout_s=55, seconds=55)
    assert t["timed_out"] and not t["finished"]
    assert (t["collected"], t["passed"], t["failed"], t["errors"], t["skipped"]) == (6, 1, 1, 1, 1)
    assert t["running"] == "test_sample.py::test_hangs"
    assert [(f["test"], f["when"]) for f in t["failures"]] == [("test_sample.py::test_fails", "call"),
                                                                ("test_sample.py::test_errors", "setup")]
    assert t["failures"][0]["message"] == "AssertionError: one is not two"
    doc = make_doc({"gpu": "fake"}, None, [], gpu_tests=t)
    md = render_md(doc, sections=("failures", "gpu_tests"))
    assert "1 passed, 1 failed, 1 errors, 1 skipped of 6 collected in 55.0 s" in md
    assert "killed at the step's limit of 55 s, while running `test_sample.py::test_hangs`; 2 not run" in md
    assert "| gpu_tests | test_sample.py::test_fails | call: AssertionError: one is not two |" in md


def test_a_finished_run_and_a_run_without_a_report(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"command": "pytest -m gpu", "collected": 3, "passed": 3, "failed": 0, "errors": 0,
                                  "skipped": 0, "xfailed": 0, "xpassed": 0, "running": None, "failures": [],
                                  "seconds": 12.5, "finished": True, "exit_status": 0}))
    t = parse_gpu_tests(0, str(report), collect_only=False, timeout_s=55)
    assert (t["passed"], t["failed"], t["finished"], t["seconds"]) == (3, 0, True, 12.5)
    line = render_md(make_doc({"gpu": "fake"}, None, [], gpu_tests=t), sections=("gpu_tests",))
    assert "3 passed, 0 failed of 3 collected in 12.5 s (exit status 0; `pytest -m gpu`)" in line
    t = parse_gpu_tests(4, str(tmp_path / "missing.json"), collect_only=False, timeout_s=55)
    assert t["passed"] is None and "no report" in t["note"]
    assert t["note"] in render_md(make_doc({"gpu": "fake"}, None, [], gpu_tests=t), sections=("gpu_tests",))
