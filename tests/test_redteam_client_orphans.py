"""Attack test: ``ferry client`` killed outright must not leave the institution taking part.

``ferry client`` starts the SuperNode and Ferry's task launcher in sessions of their own. When
``ferry client`` is killed with SIGKILL (by a user, the OOM killer, a supervisor), nothing it
would run on the way out runs; before the fix both children went on, the SuperNode connected
to the federation and the launcher running every ClientApp task it got, with the
institution's data, although the institution's own process had ended.

Real processes: ``ferry client`` against a loopback port where no server listens (the
SuperNode keeps retrying, as it does while a server restarts). Also as a script's background
job (``ferry client ... &`` in a non-interactive shell), which starts with SIGINT ignored:
before the second fix the launcher inherited that, its watchers' SIGINT did nothing, and both
children outlived ``ferry client`` again.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ferry.common.deploy.child_processes import ChildProcess, flower_env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _live_processes() -> dict[int, list[str]]:
    """Every live (non-zombie) process: pid -> its /proc stat fields after the name."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            if fields[0] != "Z":
                found[int(entry.name)] = fields
    return found


def children_of(pid: int) -> list[int]:
    return [p for p, fields in _live_processes().items() if int(fields[1]) == pid]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2] != "Z"


def session_members(sid: int) -> list[int]:
    """Live processes in session ``sid`` (the launcher's fork server and its tasks stay in it)."""
    return [p for p, fields in _live_processes().items() if int(fields[3]) == sid]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# `sh -c 'ferry client ... &'` starts it with SIGINT ignored; exec keeps that disposition.
BACKGROUND_JOB = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "os.execv(sys.argv[1], sys.argv[1:])",
]


@pytest.mark.slow
@pytest.mark.parametrize("started", ["foreground", "background-job"])
def test_killed_ferry_client_leaves_no_supernode_or_launcher(tmp_path, started):
    data = tmp_path / "records.csv"
    data.write_text("a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(20)))
    env = flower_env() | {"FLWR_HOME": str(tmp_path / "flwr-home")}
    argv = [
        *(BACKGROUND_JOB if started == "background-job" else []),
        sys.executable,
        "-m",
        "ferry.cli",
        "client",
        "--server",
        f"127.0.0.1:{free_port()}",  # nothing listens: the SuperNode keeps retrying
        "--insecure",
        "--data",
        str(data),
        "--state-dir",
        str(tmp_path / "state"),
        "--budget-epsilon",
        "1",
        "--budget-delta",
        "1e-5",
        "--institution",
        "hospital-a",
        "--runtime-port",
        str(free_port()),
    ]
    client = ChildProcess("ferry-client", argv, tmp_path / "client.log", env).start()
    try:
        children: list[int] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and client.poll() is None:
            children = children_of(client.pid)
            names = " ".join(cmdline(pid) for pid in children)
            if "flower-supernode" in names and "ferry.client.task_launcher" in names:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"ferry client did not start both children: {client.log_tail()}")
        time.sleep(2)  # the launcher is polling the SuperNode's runtime API
        os.kill(client.pid, signal.SIGKILL)
        client.proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(alive(pid) for pid in children):
            time.sleep(0.5)
        survivors = {pid: cmdline(pid) for pid in children if alive(pid)}
        assert not survivors, f"still running after ferry client was killed: {survivors}"
        log = (tmp_path / "state" / "supernode.log").read_text(errors="replace")
        assert "ferry client is gone; stopping the SuperNode" in log
    finally:
        client.stop(grace=5)  # every tagged descendant, whatever the outcome


@pytest.mark.slow
def test_a_launcher_whose_ferry_client_died_while_it_started_stops_the_supernode(tmp_path):
    """``ferry client`` killed while its launcher is still importing: the launcher, once
    running, finds its parent already replaced. It must know ``ferry client``'s pid from
    the start (``--ferry-pid``) rather than read its parent then, or it never notices."""
    supernode = subprocess.Popen(  # stands for the SuperNode: a session of its own
        [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True
    )
    log = tmp_path / "launcher.log"
    short_lived = (  # starts the launcher the way ferry client does, then dies at once
        "import os, subprocess, sys\n"
        f"out = open({str(log)!r}, 'w')\n"
        "p = subprocess.Popen([sys.executable, '-P', '-m', 'ferry.client.task_launcher',"
        f" '--supernode-pid', '{supernode.pid}', '--ferry-pid', str(os.getpid()),"
        f" '--runtime-api-address', '127.0.0.1:{free_port()}'], stdout=out, stderr=out,"
        " start_new_session=True)\n"
        "print(p.pid)\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", short_lived], capture_output=True, text=True, timeout=30
        )
        launcher = int(done.stdout)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (alive(launcher) or supernode.poll() is None):
            time.sleep(0.5)
        assert supernode.poll() is not None, "the SuperNode outlived ferry client"
        assert not alive(launcher), cmdline(launcher)
        assert "ferry client is gone; stopping the SuperNode" in log.read_text()
        deadline = time.monotonic() + 20  # its fork server goes with it
        while time.monotonic() < deadline and session_members(launcher):
            time.sleep(0.5)
        assert {p: cmdline(p) for p in session_members(launcher)} == {}
    finally:
        if supernode.poll() is None:
            os.killpg(supernode.pid, signal.SIGKILL)
        supernode.wait()
