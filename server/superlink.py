"""``ferry server``: run the federation's Flower SuperLink and submit the Ferry run to it.

Steps, each checked before the next (bad input fails first, with one line, exit 2):

1. Read ``server.toml`` (sections ``[server]``, ``[institutions]``, ``[run]``; relative paths
   are relative to the file) and check it: the TLS files (the server certificate signed by
   the CA, not expired, matching its key, valid for the address the SuperLink's own
   processes use), every institution's public key, the run settings and the backbone.
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
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ferry.common.certs import CA_CERT, SERVER_CERT, SERVER_KEY, check_institution_name
from ferry.common.child_processes import ChildProcess, exit_on_signals, flower_bin, flower_env
from ferry.common.config import read_toml
from ferry.common.errors import FerryError
from ferry.common.tls import (
    check_ca_certificate,
    check_public_key,
    check_server_certificate,
    parse_address,
)
from ferry.server.checkpoint import check_ledger_prefix, check_same_run, load_checkpoint
from ferry.server.deployment import MODE, check_deployment
from ferry.server.ledger import LEDGER_FILE
from ferry.server.proxy import (
    LOOPBACK,
    ProxySettings,
    check_upstream_certificate,
    nginx_binary,
    preflight,
    start_proxy,
)

CONNECTION = "ferry"  # the Flower CLI connection name ferry server writes
INSECURE_WARNING = (
    "ferry: WARNING: --insecure: TLS is OFF and SuperNode authentication is OFF: any process "
    "that reaches this port can join the federation, and model updates, metrics and privacy "
    "reports cross the network in the clear. Use it for local trials only."
)


@dataclass(frozen=True)
class ServerSettings:
    """A validated ``server.toml`` (plus ``--insecure``/``--resume``)."""

    host: str
    port: int
    state_dir: Path
    run: dict  # the deployment run config (absolute paths), without node names
    institutions: dict[str, Path] = field(default_factory=dict)  # name -> public key file
    ca_cert: Path | None = None
    server_cert: Path | None = None
    server_key: Path | None = None
    insecure: bool = False
    internal_port: int = 0  # the SuperLink's port on 127.0.0.1 (TLS; the proxy forwards here)

    @property
    def superlink_host(self) -> str:
        return self.host if self.insecure else LOOPBACK

    @property
    def superlink_port(self) -> int:
        return self.port if self.insecure else self.internal_port

    @property
    def local_address(self) -> str:
        """Where this machine's own processes (flwr, the ServerApp) reach the SuperLink."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.superlink_host, self.superlink_host)
        port = self.superlink_port
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def proxy(self) -> ProxySettings:
        """The public proxy (TLS mode only)."""
        assert self.server_cert and self.server_key and self.ca_cert
        return ProxySettings(
            self.host,
            self.port,
            self.internal_port,
            self.server_cert,
            self.server_key,
            self.ca_cert,
            self.state_dir / "proxy",
        )

    @property
    def out(self) -> Path:
        return Path(self.run["out"])


def _resolve(base: Path, value: object, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise FerryError(f"{key} must be a path (a non-empty string), got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def load_server_config(
    path: str | os.PathLike, insecure: bool = False, resume: str | None = None
) -> ServerSettings:
    """Read and check ``server.toml``; raises FerryError naming the first problem."""
    path = Path(path)
    data = read_toml(path)  # one line for a missing, unreadable, binary or malformed file
    unknown = set(data) - {"server", "institutions", "run"}
    if unknown:
        raise FerryError(
            f"{path}: unknown section(s) {', '.join(sorted(unknown))}: use [server], "
            "[institutions] and [run]"
        )
    for section, value in data.items():
        if not isinstance(value, dict):
            raise FerryError(
                f"{path}: [{section}] must be a table (a [{section}] header with key = value "
                f"lines), not {type(value).__name__} {str(value)[:40]!r}"
            )
    address = data.get("server", {}).get("address", "127.0.0.1:9092")
    if not isinstance(address, str):
        raise FerryError(f"{path}: [server] address must be a string HOST:PORT, got {address!r}")
    base = path.resolve().parent
    server = dict(data.get("server", {}))
    known = {
        "address",
        "certs",
        "ca-cert",
        "server-cert",
        "server-key",
        "state-dir",
        "internal-port",
    }
    if set(server) - known:
        raise FerryError(
            f"{path}: unknown [server] key(s) {', '.join(sorted(set(server) - known))}: "
            f"known keys are {', '.join(sorted(known))}"
        )
    host, port = parse_address(str(server.get("address", "127.0.0.1:9092")), "[server] address")
    if insecure and not _is_loopback(host):
        raise FerryError(
            f"--insecure with [server] address {host}:{port} would open the SuperLink's Control "
            "API (no authentication: anyone could list, submit and stop runs) and an "
            "unauthenticated Fleet API to the network: use a loopback address (e.g. "
            "127.0.0.1:9092) for a local trial, or TLS (`ferry certs`) without --insecure"
        )
    internal_port = _internal_port(server.get("internal-port"), port)
    state_dir = _resolve(base, server.get("state-dir", "ferry-server-state"), "state-dir")
    institutions = {
        check_institution_name(name): _resolve(base, key, f"[institutions] {name}")
        for name, key in dict(data.get("institutions", {})).items()
    }
    if not institutions and not insecure:
        raise FerryError(
            f"{path}: [institutions] is empty: list each institution's public key "
            '(name = "path/to/name.pub", from `ferry certs`)'
        )
    tls: dict[str, Path | None] = {"ca-cert": None, "server-cert": None, "server-key": None}
    if not insecure:
        certs = server.get("certs")
        defaults = {"ca-cert": CA_CERT, "server-cert": SERVER_CERT, "server-key": SERVER_KEY}
        for key, filename in defaults.items():
            if key in server:
                tls[key] = _resolve(base, server[key], f"[server] {key}")
            elif certs:
                tls[key] = _resolve(base, certs, "[server] certs") / filename
            else:
                raise FerryError(
                    f"{path}: [server] needs certs = DIR (from `ferry certs`) or {key} = FILE; "
                    "or run with --insecure for a local trial"
                )
    run = _run_config(path, base, dict(data.get("run", {})), len(institutions), resume)
    settings = ServerSettings(
        host,
        port,
        state_dir,
        run,
        institutions,
        tls["ca-cert"],
        tls["server-cert"],
        tls["server-key"],
        insecure,
        internal_port,
    )
    check_server_settings(settings)
    return settings


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _internal_port(value: object, public_port: int) -> int:
    """``[server] internal-port``: a free port on 127.0.0.1 when unset; never the public one."""
    if value is None:
        port = _free_port(LOOPBACK)
        while port == public_port:
            port = _free_port(LOOPBACK)
        return port
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise FerryError(
            f"[server] internal-port {value!r} is invalid: use a port number (1-65535) for the "
            "SuperLink on 127.0.0.1, or leave it out to have one picked"
        )
    if value == public_port:
        raise FerryError(
            f"[server] internal-port {value} is the public port of [server] address: the "
            "SuperLink (with its Control API) must listen on a port of its own behind the "
            "proxy; choose another internal-port or leave it out"
        )
    return value


def _run_config(path: Path, base: Path, run: dict, institutions: int, resume: str | None) -> dict:
    if "mode" in run or "resume" in run or "institutions" in run:
        raise FerryError(f"{path}: [run] must not set mode, resume or institutions")
    run.setdefault("clients", max(institutions, 1))
    run.setdefault("round-timeout", 600.0)
    run.setdefault("connect-timeout", 300.0)
    weights = run.get("weights", "")
    if weights and weights != "random":
        run["weights"] = str(_resolve(base, weights, "[run] weights"))
    if resume:
        run["out"] = str(Path(resume).expanduser().resolve())
    else:
        default_out = f"runs/deploy-{time.strftime('%Y%m%d-%H%M%S')}"
        run["out"] = str(_resolve(base, run.get("out", default_out), "[run] out"))
    run["mode"] = MODE
    run["resume"] = bool(resume)
    return {k.replace("_", "-"): v for k, v in run.items()}


def check_server_settings(s: ServerSettings) -> None:
    """Everything that can be checked before starting a process."""
    from ferry.common.model import initial_trainable_arrays, out_dim
    from ferry.server.backbone_source import choose_training, resolve_backbone

    settings = check_deployment(s.run)
    cfg = settings.cfg
    artifact = resolve_backbone(cfg.backbone, cfg.weights, cfg.seed, cfg.scenario)
    initial_trainable_arrays(artifact, cfg, out_dim(cfg.task, settings.num_classes))
    # The settings the run will use (and, resumed, must have used): given, tuned or the rule's.
    cfg, _ = choose_training(cfg, artifact, log=lambda _: None)
    if settings.resume:
        ckpt = load_checkpoint(s.out)
        check_ledger_prefix(s.out, ckpt)
        check_same_run(s.out, ckpt, cfg.to_record(), artifact.sha256)
    if not s.insecure:
        assert s.ca_cert and s.server_cert and s.server_key
        ca = check_ca_certificate(s.ca_cert, "[server] ca-cert")
        local_host = parse_address(s.local_address, "local address")[0]
        check_server_certificate(s.server_cert, s.server_key, ca, local_host)
        check_upstream_certificate(s.server_cert)
        nginx_binary()
    for name, key in s.institutions.items():
        check_public_key(key, f"[institutions] {name}")
    _check_port_free(s.host, s.port)
    if not s.insecure:
        _check_port_free(s.superlink_host, s.superlink_port, "[server] internal-port")
    try:
        s.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = s.state_dir / ".ferry-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise FerryError(
            f"state directory {s.state_dir} is not writable ({exc.strerror}): "
            "set [server] state-dir to a writable directory"
        ) from None
    if not s.insecure:
        preflight(s.proxy)


def _check_port_free(host: str, port: int, key: str = "[server] address") -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise FerryError(
                f"cannot listen on {host}:{port} ({exc.strerror}): another SuperLink may be "
                f"running there; stop it or choose another {key}"
            ) from None


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


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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
    port = _free_port(host)
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
    headline = "rmse" if final.get("task") == "regression" else "accuracy"
    log(
        f"done: {summary['rounds_completed']} rounds ({summary['end_reason']}), final "
        f"{headline} {final.get(headline)}, max ε {summary['privacy']['max_epsilon']}; "
        f"outputs in {s.out}/"
    )
    return 0
