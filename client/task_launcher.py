"""Ferry's launcher at the institution: the SuperNode's only executor, ClientApp tasks only.

Why this hook. ``flower-supernode --isolation subprocess`` (Flower 1.41) starts
``flower-superexec``, which acquires each task from the SuperNode and starts
``flwr-clientapp`` (or ``flwr-agentapp``, ``flwr-model``, ..., whatever the run's task type
asks for); those unpack the run's bundle and import the code it names. Flower offers no hook
between "bundle received" and "bundle imported", and ``--trusted-entities`` refuses every
bundle submitted from a local folder. Two other hooks were weighed:

* a ``flwr-clientapp`` shim first on ``PATH``: it relies on Flower finding its executables
  by name, and fails open (Flower's own process runs the bundle) if a later Flower resolves
  them another way; it would also have to shadow every other task executable;
* checking inside Flower's ``flwr-clientapp`` (patching ``install_from_fab``): it patches a
  private call site.

So ``ferry client`` runs the SuperNode with ``--isolation process`` (the SuperNode then
starts no executor of its own) and runs this launcher beside it. It polls the SuperNode's
runtime API on loopback (``AcquireTask``, the call ``flower-superexec`` makes), asks only for
``flwr-clientapp`` tasks (another task type is never acquired and expires at the
SuperNode), and starts :mod:`client.checked_clientapp` for each, an explicit module of the
installed Ferry run with ``python -P`` (no current folder on ``sys.path``). If this launcher
is not running, nothing runs: it fails closed. It exits when the SuperNode does.

It also watches ``ferry client``, its parent. The SuperNode and this launcher run in sessions
of their own (``common.deploy.child_processes``), so when ``ferry client`` is killed outright
(``kill -9``, the OOM killer) nothing stops them: the institution would go on taking part in
rounds, with its data, after its own process ended. So when its parent is gone this launcher
stops the SuperNode's process group, and then itself.

Output (its own and its tasks') goes to the institution's ``supernode.log``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient

from ferry.client.checked_clientapp import TOKEN_VAR

POLL_SECONDS = 0.5
MAX_TASKS = 2  # checked ClientApps running at once (Flower's own executor has no limit)


def task_argv(runtime_api_address: str) -> list[str]:
    """The command that runs one checked ClientApp task (its token goes in the environment)."""
    return [
        sys.executable,
        "-P",
        "-m",
        "ferry.client.checked_clientapp",
        "--runtime-api-address",
        runtime_api_address,
        "--parent-pid",
        str(os.getpid()),
    ]


def _stop_supernode(supernode_pid: int) -> None:
    """SIGTERM the SuperNode's process group (ferry client starts it in a session of its own,
    so its group id is its pid; a pid reused by another group is left alone)."""
    try:
        if os.getpgid(supernode_pid) == supernode_pid:
            os.killpg(supernode_pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def _watch_parent(ferry_pid: int) -> None:
    """SIGINT here (KeyboardInterrupt) once this process's parent is no longer ``ferry_pid``:
    the kernel reparents a child the moment its parent dies, even before the dead parent is
    reaped (a pid check would still see the unreaped zombie)."""

    def watch() -> None:
        while os.getppid() == ferry_pid:
            time.sleep(0.2)
        signal.raise_signal(signal.SIGINT)

    threading.Thread(target=watch, daemon=True).start()


def launch_next(client, running: list[subprocess.Popen], address: str) -> list[subprocess.Popen]:
    """One poll: unless :data:`MAX_TASKS` checked ClientApps are still running (each loads
    torch; a flood of messages must not exhaust the institution's memory: tasks not acquired
    wait at the SuperNode), acquire one ClientApp task and start its checked process. Returns
    the processes still running."""
    running = [p for p in running if p.poll() is None]
    if len(running) >= MAX_TASKS:
        return running
    try:
        reply = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    except Exception as exc:  # the SuperNode is starting or restarting: poll again
        print(f"ferry: task launcher: {type(exc).__name__}: {exc}", file=sys.stderr)
        return running
    if reply.HasField("task") and reply.token:
        env = dict(os.environ) | {TOKEN_VAR: reply.token}
        running.append(subprocess.Popen(task_argv(address), env=env))
    return running


def serve(runtime_api_address: str, supernode_pid: int | None) -> None:
    """Acquire ClientApp tasks and start a checked process for each, until the SuperNode ends
    or ``ferry client`` (this process's parent) is gone; in the latter case stop the SuperNode."""
    ferry_pid = os.getppid()
    running: list[subprocess.Popen] = []
    client = None
    # Both watchers below end this loop by raising SIGINT here. A process started as a
    # script's background job (`ferry client ... &`) inherits SIGINT *ignored*, and Python
    # then installs no KeyboardInterrupt handler: restore it, or nothing would stop.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _watch_parent(ferry_pid)
        if supernode_pid is not None:
            start_parent_process_monitor(supernode_pid)  # SIGINT here when it is gone
        client = RuntimeHttpClient.from_server_address(
            server_address=runtime_api_address,
            insecure=True,  # loopback only, as ferry client binds it
            root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker(),
        )
        print(
            f"ferry: task launcher on {runtime_api_address}: runs checked ClientApps only",
            file=sys.stderr,
            flush=True,
        )
        while True:
            running = launch_next(client, running, runtime_api_address)
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        pass
    finally:
        if os.getppid() != ferry_pid and supernode_pid is not None:
            gone = "ferry: task launcher: ferry client is gone; stopping the SuperNode"
            print(gone, file=sys.stderr, flush=True)
            _stop_supernode(supernode_pid)
        if client is not None:
            client.close()
        for proc in running:
            proc.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description="Ferry's ClientApp launcher for a SuperNode")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--supernode-pid", type=int, default=None)
    args = parser.parse_args()
    serve(args.runtime_api_address, args.supernode_pid)


if __name__ == "__main__":
    main()
