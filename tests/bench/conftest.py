"""benchmarks/ (gpu_check.py, render_results.py, pytest_report.py: the developer side of the benchmarks, not part
of the package) importable by name, as gpu_check.sh runs them."""

import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)
