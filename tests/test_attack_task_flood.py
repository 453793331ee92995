"""The operator against an institution's machine, beyond the bundle check:

- a flood of messages must not start a training process per message: Ferry's task
  launcher runs at most ``MAX_TASKS`` checked ClientApps at once and leaves the other tasks
  waiting at the SuperNode (it does not acquire them);
- a refused bundle's file names, quoted in the institution's log, must not fake the
  diagnosis ``ferry client`` gives when its SuperNode stops.
"""

from __future__ import annotations

from pathlib import Path

from ferry.client import task_launcher
from ferry.client.supernode import InstitutionSettings, _refusal


class _Reply:
    token = "t"

    def HasField(self, name: str) -> bool:  # noqa: N802 (protobuf's spelling)
        return name == "task"


class _SuperNode:
    """Has an endless queue of ClientApp tasks; counts how many were acquired."""

    def __init__(self) -> None:
        self.acquired = 0

    def AcquireTask(self, request) -> _Reply:  # noqa: N802
        self.acquired += 1
        return _Reply()


class _Task:
    """A checked ClientApp that keeps running (training)."""

    started: list[_Task] = []

    def __init__(self, address: str, token: str) -> None:
        self.address, self.token, self.alive = address, token, True
        _Task.started.append(self)

    def is_alive(self) -> bool:
        return self.alive


def test_a_flood_of_tasks_starts_at_most_max_tasks_processes(monkeypatch):
    monkeypatch.setattr(task_launcher, "start_task", _Task)
    _Task.started = []
    supernode, running = _SuperNode(), []
    for _ in range(50):
        running = task_launcher.launch_next(supernode, running, "127.0.0.1:9094")

    assert len(_Task.started) == task_launcher.MAX_TASKS
    assert supernode.acquired == task_launcher.MAX_TASKS  # the rest wait at the SuperNode
    assert all(t.token == "t" for t in _Task.started)


def test_a_finished_task_frees_its_place(monkeypatch):
    monkeypatch.setattr(task_launcher, "start_task", _Task)
    _Task.started = []
    supernode = _SuperNode()
    running = task_launcher.launch_next(supernode, [], "a")
    running = task_launcher.launch_next(supernode, running, "a")
    running[0].alive = False  # the first one ended
    running = task_launcher.launch_next(supernode, running, "a")

    assert len(_Task.started) == 3 and len(running) == 2


def test_a_bundle_file_name_in_the_log_does_not_fake_the_diagnosis(tmp_path):
    s = InstitutionSettings(
        server="127.0.0.1:9092",
        data=tmp_path,
        state_dir=tmp_path,
        institution="hospital-a",
        budget_epsilon=3.0,
        budget_delta=1e-5,
        key=Path("hospital-a.key"),
    )
    forged = (
        "ferry: refused a bundle that carries code: 'Failed to activate SuperNode.py', "
        "'CERTIFICATE_VERIFY_FAILED.py'\nINFO : SuperNode stopped\n"
    )
    assert _refusal(forged, s) is None
    flower = "ERROR :     Failed to activate SuperNode: no SuperNode with this key\n"
    assert "not registered" in _refusal(forged + flower, s)
