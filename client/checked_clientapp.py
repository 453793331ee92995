"""One ClientApp task at the institution, run only after its bundle is checked.

Forked by :mod:`client.task_launcher` (never started by Flower) for one task the SuperNode
holds (:func:`run_forked_task`), this process does what Flower's ``flwr-clientapp`` does
(``flwr.supernode.runtime.run_clientapp`` in 1.41), with one difference that is the point:
it never installs the bundle. Flower's process unpacks the bundle into ``$FLWR_HOME/apps``,
puts that folder on ``sys.path`` and imports the component the bundle names, so whatever the
bundle carries runs here with the institution's data path in hand. This process

1. pulls the task input (message, context, run, bundle bytes) from the SuperNode's runtime
   API on loopback, with the task's token;
2. checks the bundle's bytes (:func:`client.bundle_check.check_bundle`): only Ferry's
   code-free ``pyproject.toml`` naming the Ferry apps, nothing else;
3. refused: writes ``ferry: refused ...`` to its log (the institution's ``supernode.log``)
   and replies to the server with an ``INVALID_FAB`` error that says why; nothing from the
   bundle is unpacked, imported or run;
4. accepted: runs the ClientApp *installed here* (``client.app.app``), imported from Ferry's
   own package, never from the bundle, and pushes its reply and context back.

The run config the ClientApp reads was parsed from the same checked ``pyproject.toml`` by the
SuperNode (data only). The task token never appears on a command line, where other local
users could read it from ``ps``.
"""

from __future__ import annotations

import sys
from logging import ERROR

import numpy as np
from flwr.app import Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore import log
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.exit import ExitCode, flwr_exit, register_signal_handlers
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.telemetry import EventType
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)

from ferry.client.bundle_check import BundleRefused, check_bundle


def run_task(runtime_api_address: str, token: str, parent_pid: int | None) -> None:
    """Run one task (see the module docstring); exits the process with Flower's exit codes."""
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    retry_invoker = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,  # the runtime API listens on 127.0.0.1 only (ferry client --runtime-port)
        root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=retry_invoker,
    )
    heartbeat = None
    message = context = reply = None
    sub_status, details = SubStatus.FAILED, "ClientApp task failed"
    exit_code = ExitCode.SUCCESS

    def on_exit() -> None:
        retry_invoker.max_tries = 1
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        if heartbeat is not None and heartbeat.is_running:
            heartbeat.stop()
        client.close()

    register_signal_handlers(
        event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE,
        exit_message="Task stopped.",
        exit_handlers=[on_exit],
    )
    try:
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        try:
            check_bundle(fab.content)
        except BundleRefused as refused:
            details = f"ferry: {refused} (run {run.run_id}, bundle {fab.hash_str[:12]})"
            print(details, file=sys.stderr, flush=True)
            reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=details), reply_to=message)
            exit_code = ExitCode.TASK_PROC_EXCEPTION
        else:
            # The installed ClientApp: the fork server has it imported already; this module
            # does not import it at the top because the task launcher, which must stay light
            # (no torch), imports this module.
            from ferry.client.app import app as installed_app

            reply = installed_app(message=message, context=context)
            sub_status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # what Flower's flwr-clientapp does: an error reply, not a crash
        log(ERROR, "ClientApp raised an exception", exc_info=exc)
        details = f"{type(exc)}:<'{exc}'>"
        if message is not None:
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reply = Message(Error(code=code, reason=details), reply_to=message)
        exit_code = ExitCode.TASK_PROC_EXCEPTION
    finally:
        if reply is not None and context is not None:
            try:
                push_message(client, reply, context)
            except Exception as exc:  # the SuperNode expires the task and tells the server
                log(ERROR, "Failed to push reply message", exc_info=exc)
                exit_code = ExitCode.CLIENTAPP_COMMUNICATION_ERROR
    flwr_exit(code=exit_code, event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE)


def run_forked_task(runtime_api_address: str, token: str, parent_pid: int) -> None:
    """:func:`run_task` in a process the task launcher forked from its fork server.

    A fork shares the server's imported modules, and also its random generators' states:
    Python's ``random`` reseeds itself in a forked child, NumPy's legacy global generator
    does not. Ferry's DP noise never uses either (it seeds a fresh generator per round from the
    OS); the global one is reseeded from the OS here all the same, so that no two tasks share a
    stream."""
    np.random.seed()
    _log_progress_to_stderr()
    run_task(runtime_api_address, token, parent_pid)


def _log_progress_to_stderr() -> None:
    """Ferry's progress lines (feature extraction: :mod:`common.progress`) into the
    institution's own log, which keeps this task's stderr."""
    import logging

    logger = logging.getLogger("ferry")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("ferry: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
