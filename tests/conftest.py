"""Test setup: Triton runs through its interpreter when there is no CUDA GPU; fixed intra-op threads; a teacher
cache of the test process's own.

TRITON_INTERPRET (and OMP_NUM_THREADS) must be set before triton (torch) is first imported, hence at the top.
"""

import atexit
import os
import shutil
import tempfile

if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# 2-core CI machine: intra-op threads fixed so timings and results are stable; one per process when pytest-xdist
# runs two workers, so the workers together use the two cores. Through OMP_NUM_THREADS (before torch is imported)
# so that runs inside the tests, and the processes they start, keep it too instead of following the machine's load
# (train/threads.py; its own test clears the variable).
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
# Set, not defaulted: pytest-xdist workers inherit the controller's environment, which this file has already set.
os.environ["OMP_NUM_THREADS"] = str(THREADS)
# a teacher cache of this test process's own: never the user's ~/.cache, never shared by two pytest-xdist workers
os.environ["PATFAST_CACHE"] = tempfile.mkdtemp(prefix="patfast-test-cache-")
atexit.register(shutil.rmtree, os.environ["PATFAST_CACHE"], True)

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)



@pytest.fixture(autouse=True)
def _small_threads():
    torch.set_num_threads(THREADS)
    yield


@pytest.fixture
def one_thread_seeded(_small_threads):
    """One intra-op thread and seed 0 for the test, restored after it.

    Small models at 32-64 px gain nothing from a second intra-op thread, and on a busy 2-core machine waking it
    costs more than it saves.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """A small teacher checkpoint for subprocess and CLI runs (convnext_atto, 10 classes, 32 px): random weights,
    no training needed."""
    from patfast.models.create import create_model
    from patfast.models.weights import save_weights

    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    torch.manual_seed(0)
    save_weights(create_model("convnext_atto", 10, 32), str(path), {"model": "convnext_atto", "num_classes": 10,
                                                                    "img_size": 32})
    return str(path)


@pytest.fixture(scope="session")
def assert_config_reusable():
    """assert_config_reusable(args_yaml): `patfast <its command> --config args_yaml` resolves to the configuration
    the run recorded (apart from what the file says about the run itself: its command, config, out and resume)."""
    import yaml

    from patfast.cli import _token_student, build_parser
    from patfast.train.config import parse_args, resolve

    about_the_run = ("command", "config", "out", "resume")  # not defaults for a new run

    def check(path) -> None:
        with open(path) as f:
            saved = yaml.safe_load(f)
        parser = build_parser()
        args = parse_args(parser, [saved["command"], "--config", str(path)], parser.commands)
        cfg = resolve(args, saved["command"], student_is_tokens=_token_student)
        strip = [{k: v for k, v in c.items() if k not in about_the_run} for c in (cfg, saved)]
        assert strip[0] == strip[1], {k: (strip[0].get(k), strip[1].get(k)) for k in strip[0].keys() | strip[1].keys()
                                      if strip[0].get(k) != strip[1].get(k)}

    return check
