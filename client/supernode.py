"""``ferry client``: check one institution's inputs, then run its Flower SuperNode.

Everything is checked before a process starts, and each problem is one line (exit 2): the
server address, the CA certificate (present, a CA, current; and, when the server answers,
that the server's certificate verifies against it), the institution's private key (OpenSSH
EC key that only its owner can read), the data (a readable image folder with at least two
classes, or a readable CSV/Parquet table: :mod:`client.data_preflight`), the state directory
(created if missing, and writable), the budget.

Then ``flower-supernode`` starts in its own process group with TLS (``--root-certificates``),
SuperNode authentication (``--auth-supernode-private-key``), its runtime API on
``127.0.0.1:--runtime-port`` and ``--isolation process``: the SuperNode starts no executor;
Ferry's :mod:`client.task_launcher` runs beside it and starts, for each ClientApp task, a
process that checks the run's bundle carries no code (:mod:`client.bundle_check`) and then
runs the ClientApp installed here, never the bundle's. The institution's settings go
to the ClientApp as Flower node config (a TOML file in the state directory, read by
:func:`client.institution_settings.settings_for_deployment`): the server never sees the data
path and cannot change the budget. ``ferry client`` waits on the SuperNode and stops its whole group
on exit, Ctrl-C or SIGTERM.

What leaves this machine: the SuperNode's authentication (a signature with the private key;
the key itself never leaves), and per round the trained head's arrays, train/evaluation
metrics and the privacy report. Data, features, gradients and the key stay here.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ferry.client.data_preflight import check_data
from ferry.client.held_out import check_test_fraction, pin_data_settings, pin_split
from ferry.common.deploy.child_processes import (
    ChildProcess,
    exit_on_signals,
    flower_bin,
    flower_env,
)
from ferry.common.deploy.names import check_institution_name
from ferry.common.deploy.tls import (
    check_ca_certificate,
    check_private_key_file,
    check_server_identity,
    parse_address,
)
from ferry.common.errors import FerryError
from ferry.common.private_files import write_private

NODE_CONFIG_FILE = "node-config.toml"
INSECURE_WARNING = (
    "ferry: WARNING: --insecure: TLS is OFF: the server is not authenticated and this "
    "institution's model updates, metrics and privacy reports cross the network in the clear. "
    "Use it for local trials only."
)


@dataclass(frozen=True)
class InstitutionSettings:
    server: str
    data: Path
    state_dir: Path
    institution: str
    budget_epsilon: float
    budget_delta: float
    root_cert: Path | None = None
    key: Path | None = None
    cache_dir: Path | None = None
    runtime_port: int = 9094
    insecure: bool = False
    # The institution's held-out fraction, pinned on first start with a secret salt
    # (client.held_out); None: the pinned one (0.2 on first start).
    test_fraction: float | None = None
    # The run's public class list and held-out cutoff, as this institution pins them up front
    # (client.held_out.pin_data_settings): "" = pinned by the first run that reads its data.
    classes: str = ""
    test_from: str = ""


def check_state_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = path / ".ferry-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise FerryError(
            f"--state-dir {path} is not writable ({exc.strerror}): it holds this institution's "
            "privacy spend; give a writable directory"
        ) from None


def _check_runtime_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise FerryError(f"--runtime-port {port} is not a port: use 1 to 65535 (default 9094)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise FerryError(
                f"--runtime-port {port} is in use on 127.0.0.1 (another SuperNode?): "
                "choose a free port"
            ) from None


def check_settings(s: InstitutionSettings) -> tuple[list[str], int]:
    """Check every input (see the module docstring); return the data's classes and size."""
    host, port = parse_address(s.server)
    check_institution_name(s.institution)
    if not (s.budget_epsilon > 0 and math.isfinite(s.budget_epsilon)):
        raise FerryError(f"--budget-epsilon {s.budget_epsilon!r} is invalid: use a positive ε")
    if not 0 < s.budget_delta < 1:
        raise FerryError(f"--budget-delta {s.budget_delta!r} is invalid: use 0 < δ < 1")
    if not s.insecure:
        if s.root_cert is None or s.key is None:
            raise FerryError(
                "--root-cert CA.pem and --key INSTITUTION.key are required (or --insecure, "
                "for a local trial only)"
            )
        check_ca_certificate(s.root_cert)
    if s.key is not None:
        check_private_key_file(s.key)
    classes, count = check_data(s.data)
    check_state_dir(s.state_dir)
    if s.cache_dir is not None:
        check_state_dir(s.cache_dir)
    if s.test_fraction is not None:
        check_test_fraction(s.test_fraction)
    check_pinned_flags(s)
    _check_runtime_port(s.runtime_port)
    if not s.insecure and not check_server_identity(host, port, s.root_cert):
        print(
            f"ferry: note: the server {host}:{port} is not reachable yet; the SuperNode keeps "
            "trying",
            file=sys.stderr,
        )
    return classes, count


def pinned_flags(s: InstitutionSettings) -> dict[str, object]:
    """The data settings this institution gives itself (``--classes``, ``--test-from``)."""
    out: dict[str, object] = {}
    if s.classes:
        out["classes"] = [c.strip() for c in s.classes.split(",") if c.strip()]
    if s.test_from:
        out["test-from"] = s.test_from.strip()
    return out


def check_pinned_flags(s: InstitutionSettings) -> None:
    """``--classes`` lists two distinct names at least; ``--test-from`` is a date."""
    flags = pinned_flags(s)
    names = flags.get("classes", ["a", "b"])
    if len(set(names)) < 2 or len(set(names)) != len(names):
        raise FerryError(f"--classes {s.classes!r} is invalid: list two or more distinct names")
    if "test-from" in flags:
        try:
            np.datetime64(flags["test-from"], "ns")
        except ValueError:
            raise FerryError(
                f"--test-from {s.test_from!r} is not a date: give one like 2024-01-01"
            ) from None


def write_node_config(s: InstitutionSettings) -> Path:
    """The node config the ClientApp reads (all paths absolute), as a TOML file."""
    values = {
        "institution": s.institution,
        "data-path": str(s.data.resolve()),
        "state-dir": str(s.state_dir.resolve()),
        "cache-dir": str((s.cache_dir or s.state_dir / "cache").resolve()),
        "budget-epsilon": float(s.budget_epsilon),
        "budget-delta": float(s.budget_delta),
        # Its own held-out split (fraction and secret salt), pinned in the state directory:
        # the server's test-fraction and seed never decide which records are held out.
        "test-fraction": pin_split(s.state_dir, s.test_fraction).test_fraction,
    }
    # Its own class list and cutoff, pinned in the state directory before any run: a run must
    # give the same (or none, and then takes these).
    pin_data_settings(s.state_dir, pinned_flags(s))
    if s.key is not None:  # its registered identity also signs its privacy reports
        values["report-key"] = str(s.key.resolve())
    path = s.state_dir / NODE_CONFIG_FILE
    lines = [f"{k} = {json.dumps(v) if isinstance(v, str) else repr(v)}" for k, v in values.items()]
    text = "# Written by `ferry client`: this institution's own settings.\n" + "\n".join(lines)
    write_private(path, (text + "\n").encode())  # it names the data and key paths: 0600
    return path


def supernode_argv(s: InstitutionSettings, node_config: Path) -> list[str]:
    argv = [
        flower_bin("flower-supernode"),
        "--superlink",
        s.server,
        "--node-config",
        str(node_config),
        "--isolation",
        "process",  # no Flower executor: client.task_launcher runs checked ClientApps only
        "--host",
        "127.0.0.1",
        "--port",
        str(s.runtime_port),
    ]
    if s.insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(s.root_cert.resolve())]
    if s.key is not None:
        argv += ["--auth-supernode-private-key", str(s.key.resolve())]
    return argv


def _refusal(log_text: str, s: InstitutionSettings) -> str | None:
    """Why the SuperLink turned this SuperNode away, from its log, or None. Only Flower's own
    lines count: Ferry's (``ferry: ...``) may quote what the operator sent, e.g. the file
    names of a refused bundle, and must not fake a diagnosis."""
    log_text = "\n".join(
        line for line in log_text.splitlines() if not line.lstrip().startswith("ferry:")
    )
    if "Failed to activate SuperNode" in log_text:
        return (
            f"the server refused this SuperNode: its key {s.key} is not registered with the "
            f"federation (send {Path(str(s.key)).with_suffix('.pub').name} to the federation "
            "operator to be registered)"
        )
    if "CERTIFICATE_VERIFY_FAILED" in log_text:
        return (
            f"the server at {s.server} did not prove its identity with --root-cert "
            f"{s.root_cert}: get the federation's current ca.pem"
        )
    return None


def run_client(s: InstitutionSettings, log=None) -> int:
    """Check, start the SuperNode, wait on it; return its exit code."""
    log = log or (lambda line: print(line, flush=True))
    if s.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    classes, count = check_settings(s)
    node_config = write_node_config(s)
    exit_on_signals()
    log_path = s.state_dir / "supernode.log"
    env = flower_env() | {"FLWR_HOME": str(s.state_dir / "flwr-home")}  # not ~/.flwr
    supernode = ChildProcess("supernode", supernode_argv(s, node_config), log_path, env)
    what = f"images in {len(classes)} classes" if classes else "records"
    log(
        f"{s.institution}: {count} {what} stay in {s.data}; budget "
        f"ε={s.budget_epsilon:g}, δ={s.budget_delta:g} (enforced here); state in {s.state_dir}"
    )
    log(f"connecting to {s.server} ({'INSECURE' if s.insecure else 'TLS'}); log: {log_path}")
    launcher = None
    try:
        supernode.start()
        # The SuperNode's only executor (client.task_launcher); -P: no current folder on sys.path.
        launcher_argv = [
            sys.executable,
            "-P",
            "-m",
            "ferry.client.task_launcher",
            "--supernode-pid",
            str(supernode.pid),
            "--ferry-pid",
            str(os.getpid()),
            "--runtime-api-address",
            f"127.0.0.1:{s.runtime_port}",
        ]
        launcher = ChildProcess("task-launcher", launcher_argv, log_path, env).start()
        echoed = log_path.stat().st_size
        while (code := supernode.poll()) is None:
            if (ended := launcher.poll()) is not None:
                raise FerryError(
                    f"the task launcher exited with code {ended}, so no round can run here; "
                    f"see {log_path}"
                )
            with open(log_path, "rb") as f:  # a refused bundle is news for this terminal too
                f.seek(echoed)
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]  # whole lines only
            echoed += len(complete)
            for line in complete.decode(errors="replace").splitlines():
                if line.startswith("ferry: refused"):
                    print(line, file=sys.stderr, flush=True)
            time.sleep(0.5)
        why = _refusal(supernode.log_tail(60), s)
        if why:
            raise FerryError(why)
        if code:
            print(
                f"ferry: error: flower-supernode exited with code {code}; see {log_path}",
                file=sys.stderr,
            )
        return 1 if code else 0
    except KeyboardInterrupt:
        print("ferry: interrupted; stopping the SuperNode", file=sys.stderr)
        return 130
    finally:
        if launcher is not None:
            launcher.stop()
        supernode.stop()
