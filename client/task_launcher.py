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
SuperNode), and runs :func:`client.checked_clientapp.run_forked_task` for each, code of the
installed Ferry. If this launcher is not running, nothing runs: it fails closed. It exits
when the SuperNode does.

Each task is a process of its own, forked from a warm *fork server* (Python's
``multiprocessing`` forkserver, started with ``python -P``: no current folder on
``sys.path``) that imported Ferry's checked ClientApp and everything it loads (torch, Opacus,
Flower) once, when this launcher started. A task therefore starts in a fraction of a second
instead of importing torch and Opacus anew (about 3 of the 4 CPU-seconds a small round's task
took). Every task is forked from the server, never from another task, so no task inherits
another's state; the server itself only imports (no task, no data, no thread), and it exits
with this launcher.

It also watches ``ferry client``, its parent. The SuperNode and this launcher run in sessions
of their own (``common.deploy.child_processes``), so when ``ferry client`` is killed outright
(``kill -9``, the OOM killer) nothing stops them: the institution would go on taking part in
rounds, with its data, after its own process ended. So when its parent is gone this launcher
stops the SuperNode's process group, and then itself.

Output (its own and its tasks') goes to the institution's ``supernode.log``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing import forkserver
from multiprocessing.process import BaseProcess

from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient

from ferry.client.checked_clientapp import run_forked_task

POLL_SECONDS = 0.5
MAX_TASKS = 2  # checked ClientApps running at once (Flower's own executor has no limit)
# What the fork server imports once: the checked ClientApp, the installed one (torch), and what a
# task would otherwise import on first use (Ferry imports these lazily, for `ferry --help`).
PRELOAD = [
    "ferry.client.checked_clientapp",
    "ferry.client.app",
    "ferry.client.linear_dp",
    "opacus",
    "safetensors.numpy",
    "PIL.Image",
    "torchvision.models",
    "pandas",
]
FORKS = multiprocessing.get_context("forkserver")


def warm_up() -> None:
    """Start the fork server now, so that it imports :data:`PRELOAD` while no task waits."""
    FORKS.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()


def start_task(runtime_api_address: str, token: str) -> BaseProcess:
    """Fork one checked ClientApp task; its token travels to it over the fork server's
    private socket (never on a command line or in an environment)."""
    task = FORKS.Process(
        target=run_forked_task,
        args=(runtime_api_address, token, os.getpid()),
        name="ferry-clientapp-task",
    )
    task.start()
    return task


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


def launch_next(client, running: list[BaseProcess], address: str) -> list[BaseProcess]:
    """One poll: unless :data:`MAX_TASKS` checked ClientApps are still running (each loads
    torch; a flood of messages must not exhaust the institution's memory: tasks not acquired
    wait at the SuperNode), acquire one ClientApp task and start its checked process. Returns
    the processes still running."""
    running = [p for p in running if p.is_alive()]
    if len(running) >= MAX_TASKS:
        return running
    try:
        reply = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    except Exception as exc:  # the SuperNode is starting or restarting: poll again
        print(f"ferry: task launcher: {type(exc).__name__}: {exc}", file=sys.stderr)
        return running
    if reply.HasField("task") and reply.token:
        running.append(start_task(address, reply.token))
    return running


def serve(
    runtime_api_address: str, supernode_pid: int | None, ferry_pid: int | None = None
) -> None:
    """Acquire ClientApp tasks and start a checked process for each, until the SuperNode ends
    or ``ferry client`` (this process's parent) is gone; in the latter case stop the SuperNode."""
    # Given by ferry client: had it died while this process was still starting, the parent
    # read here would already be its successor, and the watcher below would never fire.
    ferry_pid = os.getppid() if ferry_pid is None else ferry_pid
    running: list[BaseProcess] = []
    client = None
    # Both watchers below end this loop by raising SIGINT here. A process started as a
    # script's background job (`ferry client ... &`) inherits SIGINT *ignored*, and Python
    # then installs no KeyboardInterrupt handler: restore it, or nothing would stop.
    # (Before the fork server starts: it and every task inherit what is set here.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        warm_up()
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
    parser.add_argument("--ferry-pid", type=int, default=None, help="ferry client's pid")
    args = parser.parse_args()
    serve(args.runtime_api_address, args.supernode_pid, args.ferry_pid)


if __name__ == "__main__":
    main()
