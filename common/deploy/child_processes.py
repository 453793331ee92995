"""Child processes that are stopped completely: their own process group, plus a tag.

Flower's ``flower-superlink`` and ``flower-supernode`` start ``flower-superexec`` children,
which start ``flwr-serverapp``/``flwr-clientapp`` processes; the SuperLink's SuperExec even
starts a session of its own, and they can outlive a killed parent. So every child started
here gets

* its own session (``start_new_session``): its process group can be signalled at once;
* a tag in its environment (``FERRY_PROCESS_TAG``, appended to any tag the caller already
  carries), which every descendant inherits, whichever group it ends up in. Stopping a child
  signals its group, then every process whose environment carries its tag (Linux: read from
  ``/proc/<pid>/environ``; elsewhere only the group is signalled).

Only processes carrying a tag this process created (or was given) are ever signalled.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from ferry.common.errors import FerryError
from ferry.common.private_files import open_private, private_dir

TAG_VAR = "FERRY_PROCESS_TAG"


def tagged_pids(tag: str) -> list[int]:
    """Pids of live processes (not zombies) whose environment carries ``tag``."""
    needle = f"{TAG_VAR}=".encode()
    found = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            continue
        for var in env.split(b"\0"):
            if var.startswith(needle) and tag.encode() in var[len(needle) :].split(b" "):
                found.append(int(entry.name))
                break
    return found


def signal_tagged(tag: str, sig: int) -> list[int]:
    """Send ``sig`` to every process carrying ``tag`` and to its process group."""
    pids = tagged_pids(tag)
    for pid in pids:
        for kill in (os.killpg, os.kill):
            try:
                target = os.getpgid(pid) if kill is os.killpg else pid
                if kill is os.killpg and target == os.getpgrp():
                    continue  # never our own group
                kill(target, sig)
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def stop_tagged(tag: str, grace: float = 10.0) -> None:
    """SIGTERM everything carrying ``tag``; SIGKILL what is left after ``grace`` seconds."""
    if not signal_tagged(tag, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and tagged_pids(tag):
        time.sleep(0.1)
    signal_tagged(tag, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and tagged_pids(tag):
        time.sleep(0.05)


class ChildProcess:
    """One command in its own session; output appended to ``log_path`` (None: to ours)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: str | os.PathLike | None,
        env: dict[str, str] | None = None,
    ):
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path) if log_path is not None else None
        self.tag = f"ferry-{name}-{uuid.uuid4().hex[:12]}"
        base = dict(os.environ if env is None else env)
        base[TAG_VAR] = " ".join(filter(None, [base.get(TAG_VAR, ""), self.tag]))
        base.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        base.setdefault("PYTHONUNBUFFERED", "1")
        self.env = base
        self.proc: subprocess.Popen | None = None

    def start(self) -> ChildProcess:
        if self.log_path is None:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, env=self.env, start_new_session=True
            )
            return self
        private_dir(self.log_path.parent)
        # A log may quote what it ran on (an institution's refusals name its data): 0600.
        with os.fdopen(open_private(self.log_path, os.O_WRONLY | os.O_APPEND), "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None:
            return ""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> int | None:
        """Stop the child's group and every tagged descendant; return its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        stop_tagged(self.tag, grace)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            return self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - unkillable child
            print(f"ferry: warning: {self.name} (pid {self.pid}) did not exit", file=sys.stderr)
            return None


def flower_bin(name: str) -> str:
    """A Flower executable from this Python's environment (else from PATH)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FerryError(f"{name} not found: install Ferry's dependencies (flwr) in this Python")
    return found


def flower_env() -> dict[str, str]:
    """Environment for Flower processes: this Python's bin first on PATH (the SuperLink and
    SuperNode start ``flower-superexec`` by name), telemetry off."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    return env


def exit_on_signals() -> None:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt, so ``finally`` blocks stop children."""

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
