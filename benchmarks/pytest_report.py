"""A pytest plugin that keeps a JSON report of the run up to date after every test, so that a run killed by a
timeout still says how many tests passed or failed, and which test was running when it was killed.

    PYTHONPATH=benchmarks python -m pytest -p pytest_report --report-json PATH ...

PATH is rewritten atomically (patfast.bench.record.write_json) when collection ends, when each test starts and
after each of its phases: {"command", "collected", "passed", "failed", "errors", "skipped", "xfailed", "xpassed",
"running" (the test started and not finished, else null), "failures": [{"test", "when", "message"}], "seconds",
"finished" (the session ended), "exit_status"}. benchmarks/gpu_check.sh runs the GPU tests with it, and
benchmarks/render_results.py's parse_gpu_tests reads it.
"""

from __future__ import annotations

import time

from patfast.bench.record import write_json

COUNTS = ("passed", "failed", "errors", "skipped", "xfailed", "xpassed")


def pytest_addoption(parser) -> None:
    parser.addoption("--report-json", default=None, metavar="PATH",
                     help="keep counts and the running test in this JSON, rewritten after every test")


def pytest_configure(config) -> None:
    path = config.getoption("report_json")
    if path:
        config.pluginmanager.register(Report(path, " ".join(config.invocation_params.args)), "patfast_report")


class Report:
    """The hooks that keep the report file current."""

    def __init__(self, path: str, args: str):
        self.path, self.start = path, time.monotonic()
        self.state: dict = {"command": f"pytest {args}", "collected": None, **dict.fromkeys(COUNTS, 0),
                            "running": None, "failures": [], "seconds": 0.0, "finished": False, "exit_status": None}
        self.write()

    def write(self) -> None:
        self.state["seconds"] = round(time.monotonic() - self.start, 2)
        write_json(self.state, self.path)

    def pytest_collectreport(self, report) -> None:
        if report.failed:  # a file that does not import: an error, as pytest counts it
            self.state["errors"] += 1
            self._failure(report.nodeid or "<collection>", "collect", report)
            self.write()

    def pytest_collection_finish(self, session) -> None:
        self.state["collected"] = len(session.items)
        self.write()

    def pytest_runtest_logstart(self, nodeid, location) -> None:
        self.state["running"] = nodeid
        self.write()

    def pytest_runtest_logreport(self, report) -> None:
        outcome = _outcome(report)
        if outcome is None:
            return
        self.state[outcome] += 1
        if outcome in ("failed", "errors"):
            self._failure(report.nodeid, report.when, report)
        self.write()

    def pytest_runtest_logfinish(self, nodeid, location) -> None:
        self.state["running"] = None
        self.write()

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        self.state.update(finished=True, exit_status=int(exitstatus))
        self.write()

    def _failure(self, nodeid: str, when: str, report) -> None:
        crash = getattr(report.longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(report.longrepr or "")
        lines = text.strip().splitlines() or [""]
        first = lines[0] if crash is not None else lines[-1]  # a crash's first line; else the repr's last
        self.state["failures"].append({"test": nodeid, "when": when, "message": first[:300]})


def _outcome(report) -> str | None:
    """The count a phase report adds to, as pytest's summary counts it (one per test, plus teardown errors)."""
    if hasattr(report, "wasxfail"):
        return "xfailed" if report.skipped else "xpassed" if report.when == "call" else None
    if report.failed:
        return "failed" if report.when == "call" else "errors"
    if report.skipped:
        return "skipped"
    return "passed" if report.when == "call" else None
