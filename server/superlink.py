"""``ferry server``: run the federation's Flower SuperLink and submit the Ferry run to it.

Steps, each checked before the next (bad input fails first, with one line, exit 2):

1. Read ``server.toml`` (sections ``[server]``, ``[institutions]``, ``[run]``; relative paths
   are relative to the file) and check it (:mod:`server.server_settings`): the TLS files (the
   server certificate signed by the CA, not expired, matching its key, valid for the address
   the SuperLink's own processes use), every institution's public key, the run settings and
   the backbone.
2. Start ``flower-superlink`` in its own process group with TLS, SuperNode authentication, a
   persistent database and a log file in the state directory, and runtime dependency
   installation off (nothing is ever pip-installed on the server). It listens on the loopback
   interface only (``127.0.0.1:[server] internal-port``, picked when unset): Flower serves its
   Control API, which authenticates nobody, on that same port.
3. Register every institution's public key (``flwr supernode register``), keeping the node
   id Flower assigns to each in ``<state-dir>/institutions.json``. A key registered before
   (same database) keeps its node id. Then start the public proxy on ``[server] address``
   (:mod:`server.proxy`: nginx forwarding the Fleet API and nothing else).
4. Submit the run: a Flower app bundle that holds *no code*, only a ``pyproject.toml`` naming
   Ferry's apps and the run config (``mode = "deployment"``). Each side therefore runs the
   Ferry installed on its own machine; the institution's ClientApp is its own code.
5. Stream the run's progress until it ends; stop every child process group on exit, on
   Ctrl-C, SIGTERM and on failure.

``--insecure`` (no TLS, no node authentication, no proxy: the SuperLink itself on the
address) is refused unless the address is a loopback one, for local trials.

Before step 2, runs that a killed server left unfinished in the database are stopped (see
:func:`stop_stale_runs`), so that no institution trains for a run nobody listens to.

With ``--resume RUN_DIR`` the same SuperLink database and keys are reused and the run
continues after its last checkpointed round (:mod:`server.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from ferry.common.deploy.child_processes import (
    ChildProcess,
    exit_on_signals,
    flower_bin,
    flower_env,
)
from ferry.common.deploy.tls import parse_address
from ferry.common.errors import FerryError
from ferry.common.metrics import headline_metric
from ferry.server.ledger import LEDGER_FILE
from ferry.server.proxy import start_proxy
from ferry.server.server_settings import (
    ServerSettings,
    free_port,
)

CONNECTION = "ferry"  # the Flower CLI connection name ferry server writes
INSECURE_WARNING = (
    "ferry: WARNING: --insecure: TLS is OFF and SuperNode authentication is OFF: any process "
    "that reaches this port can join the federation, and model updates, metrics and privacy "
    "reports cross the network in the clear. Use it for local trials only."
)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_app(app_dir: Path, run: dict) -> Path:
    """A code-free Flower app: ``pyproject.toml`` naming Ferry's apps, holding the run config."""
    app_dir.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f"{k} = {_toml_value(v)}" for k, v in sorted(run.items()))
    (app_dir / "pyproject.toml").write_text(
        f"""# Written by `ferry server`: this bundle carries no code. Each side runs the Ferry
# installed on its own machine (server.app / client.app); only this config travels.
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "ferry-deployment"
version = "1.0.0"
description = "A Ferry federated run (configuration only)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "ferry"

[tool.flwr.app.components]
serverapp = "ferry.server.app:app"
clientapp = "ferry.client.app:app"

[tool.flwr.app.config]
{config}
"""
    )
    return app_dir


def write_flower_home(home: Path, s: ServerSettings) -> Path:
    """``$FLWR_HOME/config.toml`` with one connection, :data:`CONNECTION`, to this SuperLink."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    conn = {"address": s.local_address}
    if s.insecure:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(s.ca_cert)
    lines = [f"{k} = {_toml_value(v)}" for k, v in conn.items()]
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        + "\n".join(lines)
        + "\n"
    )
    return home


def superlink_argv(s: ServerSettings) -> list[str]:
    """With TLS the SuperLink listens on 127.0.0.1 only; the proxy is its public face."""
    argv = [
        flower_bin("flower-superlink"),
        "--host",
        s.superlink_host,
        "--port",
        str(s.superlink_port),
        "--database",
        str(s.state_dir / "superlink.db"),
        "--log-file",
        str(s.state_dir / "superlink.log"),
        "--disable-runtime-dependency-installation",
        "--isolation",
        "subprocess",
    ]
    if s.insecure:
        return argv + ["--insecure"]
    return argv + [
        "--ssl-certfile",
        str(s.server_cert),
        "--ssl-keyfile",
        str(s.server_key),
        "--ssl-ca-certfile",
        str(s.ca_cert),
        "--enable-supernode-auth",
    ]


def _wait_until_listening(s: ServerSettings, superlink: ChildProcess, timeout: float) -> None:
    host, port = parse_address(s.local_address, "local address")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if superlink.poll() is not None:
            raise FerryError(
                f"flower-superlink exited with code {superlink.poll()} at start-up; see "
                f"{superlink.log_path}: {superlink.log_tail(1)}"
            )
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise FerryError(f"flower-superlink did not listen on {host}:{port} within {timeout:.0f}s")


def _flwr(s: ServerSettings, *args: str, home: Path | None = None) -> subprocess.CompletedProcess:
    home = home or s.state_dir / "flwr-home"
    env = flower_env() | {"FLWR_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run(
        [flower_bin("flwr"), *args], capture_output=True, text=True, env=env, timeout=120
    )


def register_institutions(s: ServerSettings, log) -> dict[int, str]:
    """Register every institution's public key; return {node id: institution}."""
    known_path = s.state_dir / "institutions.json"
    known = json.loads(known_path.read_text()) if known_path.exists() else {}
    for name, key in s.institutions.items():
        res = _flwr(s, "supernode", "register", str(key), CONNECTION, "--format", "json")
        try:
            node_id = int(json.loads(res.stdout[res.stdout.index("{") :])["node-id"])
        except (ValueError, KeyError, TypeError):
            if "already in use" in res.stdout + res.stderr and name in known:
                log(f"  {name}: already registered as node {known[name]}")
                continue
            detail = " ".join((res.stdout + res.stderr).split())[-300:]
            raise FerryError(f"registering {name}'s key {key} failed: {detail}") from None
        known[name] = node_id
        log(f"  {name}: registered as node {node_id}")
    known_path.write_text(json.dumps(known, indent=1, sort_keys=True))
    return {int(node): name for name, node in known.items() if name in s.institutions}


def stop_stale_runs(s: ServerSettings, log) -> None:
    """Stop runs that a killed server left unfinished in the SuperLink's database.

    Such a run's pending instructions would otherwise still be handed to SuperNodes when they
    reconnect, and an institution would train (and spend privacy) for a run whose ServerApp
    is gone. So before the SuperLink opens its real port, it is started once on a private
    port (no ServerApp launcher), the stale runs are stopped through the Control API,
    and it is shut down again. Instructions of a stopped run are no longer served.
    """
    if not (s.state_dir / "superlink.db").exists():
        return
    host = parse_address(s.local_address, "local address")[0]  # covered by server.pem
    port = free_port(host)
    private = dataclasses.replace(s, host=host, port=port, internal_port=port)
    home = write_flower_home(s.state_dir / "flwr-home-maintenance", private)
    argv = superlink_argv(private)
    argv[argv.index("subprocess")] = "process"  # start no ServerApp for a pending run
    env = flower_env() | {"FLWR_HOME": str(home)}
    superlink = ChildProcess("superlink-maintenance", argv, s.state_dir / "superlink.out", env)
    try:
        superlink.start()
        _wait_until_listening(private, superlink, timeout=60)
        res = _flwr(private, "list", CONNECTION, "--format", "json", home=home)
        try:
            runs = json.loads(res.stdout[res.stdout.index("{") :])["runs"]
        except (ValueError, KeyError):
            detail = " ".join((res.stdout + res.stderr).split())[-300:]
            raise FerryError(f"cannot list the SuperLink's runs: {detail}") from None
        for run in runs:
            if not str(run.get("status", "")).startswith("finished"):
                _flwr(private, "stop", str(run["run-id"]), CONNECTION, home=home)
                log(f"  stopped run {run['run-id']} left {run['status']} by the last server")
    finally:
        superlink.stop()


def run_server(s: ServerSettings, log=None) -> int:
    """Start the SuperLink, register institutions, run; return the exit code."""
    log = log or (lambda line: print(line, flush=True))
    if s.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    exit_on_signals()
    home = write_flower_home(s.state_dir / "flwr-home", s)
    children: list[ChildProcess] = []
    try:
        stop_stale_runs(s, log)
        env = flower_env() | {"FLWR_HOME": str(home)}  # apps unpack here, not in ~/.flwr
        superlink = ChildProcess(
            "superlink", superlink_argv(s), s.state_dir / "superlink.out", env
        ).start()
        children.append(superlink)
        listening = (
            f"{s.host}:{s.port} (TLS off, insecure)"
            if s.insecure
            else f"{s.local_address} (loopback only; TLS, SuperNode authentication on)"
        )
        log(f"SuperLink listening on {listening}; state in {s.state_dir}")
        _wait_until_listening(s, superlink, timeout=60)
        watched = [superlink]
        if not s.insecure:
            proxy = start_proxy(s.proxy, env)
            children.append(proxy)
            watched.append(proxy)
            log(f"public address {s.host}:{s.port}: the Fleet API only (nginx proxy)")
        names = register_institutions(s, log) if not s.insecure else {}
        run = dict(s.run, institutions=json.dumps({str(k): v for k, v in names.items()}))
        app = write_app(s.state_dir / "app", run)
        verb = "resuming" if s.run["resume"] else "starting"
        log(f"{verb} the run: {s.run['rounds']} rounds, outputs in {s.out}")
        argv = [flower_bin("flwr"), "run", str(app), CONNECTION, "--stream"]
        runner = ChildProcess("flwr-run", argv, None, env).start()  # output: ours
        children.append(runner)
        while runner.poll() is None:
            for child in watched:
                if child.poll() is not None:
                    what, where = {
                        "superlink": ("flower-superlink", "superlink.log"),
                        "proxy": ("the proxy (nginx)", "proxy/error.log"),
                    }[child.name]
                    raise FerryError(
                        f"{what} stopped (exit code {child.poll()}); see {s.state_dir / where}"
                    )
            time.sleep(0.5)
        return _report(s, log)
    except KeyboardInterrupt:
        print("ferry: interrupted; stopping the SuperLink", file=sys.stderr)
        return 130
    finally:
        for child in reversed(children):
            child.stop()


def _failure(s: ServerSettings) -> str:
    """Why a run ended without a summary: the ledger's last word, else where to look."""
    where = f"see {s.out / LEDGER_FILE} and {s.state_dir / 'superlink.log'}"
    try:
        last = json.loads((s.out / LEDGER_FILE).read_text().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return f"the ServerApp ended before writing its ledger; {where}"
    if last.get("event") == "run_finished":
        return f"{last.get('reason')}; {where}"
    record = f"{last.get('seq')} ({last.get('event')})"
    return f"the ServerApp stopped after ledger record {record}; {where}"


def _report(s: ServerSettings, log) -> int:
    summary_path = s.out / "summary.json"
    if not summary_path.exists():
        print(f"ferry: error: the run failed: {_failure(s)}", file=sys.stderr)
        return 1
    summary = json.loads(summary_path.read_text())
    final = summary["final"]
    headline = headline_metric(final.get("task", "classification"))
    log(
        f"done: {summary['rounds_completed']} rounds ({summary['end_reason']}), final "
        f"{headline} {final.get(headline)}, max ε {summary['privacy']['max_epsilon']}; "
        f"outputs in {s.out}/"
    )
    return 0
