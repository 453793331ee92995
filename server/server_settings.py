"""``ferry server``'s configuration: ``server.toml`` read into :class:`ServerSettings` and
everything about it checked before any process starts (step 1 of :mod:`server.superlink`).

``[server]`` (address, TLS files, state directory, internal port), ``[institutions]`` (each
institution's public key) and ``[run]`` (the deployment run config; relative paths are relative
to the file) are read and checked: the TLS files (the server certificate signed by the CA, not
expired, matching its key, valid for the address the SuperLink's own processes use), every
institution's public key, the run settings and the backbone (and, resumed, the checkpoint and
ledger it continues), the ports and the state directory, and the proxy's own preflight. Each
check fails with one line naming the setting and the fix.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from ferry.common.config import read_toml
from ferry.common.deploy.names import CA_CERT, SERVER_CERT, SERVER_KEY, check_institution_name
from ferry.common.deploy.tls import (
    check_ca_certificate,
    check_public_key,
    check_server_certificate,
    parse_address,
)
from ferry.common.errors import FerryError
from ferry.server.checkpoint import check_ledger_prefix, check_same_run, load_checkpoint
from ferry.server.deployment import MODE, check_deployment
from ferry.server.proxy import (
    LOOPBACK,
    ProxySettings,
    check_upstream_certificate,
    nginx_binary,
    preflight,
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
        port = free_port(LOOPBACK)
        while port == public_port:
            port = free_port(LOOPBACK)
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


def free_port(host: str) -> int:
    """A port on ``host`` that nothing listens on now (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
