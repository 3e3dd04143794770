"""The fault-injection seam: armed once from PATFAST_TEST_KILL, it fires at the N-th time a point is reached, with
SIGKILL or (":term:R") SIGTERM on rank R only; unarmed it does nothing. (The kill/resume tests use it for real.)"""

import signal

import pytest

from patfast.train import faults


@pytest.fixture
def kills(monkeypatch):
    sent = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: sent.append(sig))
    yield sent
    faults.arm({})


def test_kill_at_the_nth_step(kills):
    faults.arm({"PATFAST_TEST_KILL": "step:3"})
    for _ in range(5):
        faults.reached("save")
        faults.reached("step")
    assert kills == [signal.SIGKILL]


def test_sigterm_only_on_the_named_rank(kills):
    faults.arm({"PATFAST_TEST_KILL": "step:2:term:1", "RANK": "0"})
    for _ in range(3):
        faults.reached("step")
    assert kills == []
    faults.arm({"PATFAST_TEST_KILL": "step:2:term:1", "RANK": "1"})
    for _ in range(3):
        faults.reached("step")
    assert kills == [signal.SIGTERM]


def test_unarmed_does_nothing_and_arming_is_read_once(kills, monkeypatch):
    faults.arm({})
    monkeypatch.setenv("PATFAST_TEST_KILL", "step:1")  # set after arming: not seen until the next run arms
    faults.reached("step")
    assert kills == []
