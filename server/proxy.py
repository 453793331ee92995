"""The public port of ``ferry server``: nginx forwarding the Fleet API and nothing else.

Flower 1.41 serves its Fleet, Control and runtime APIs on one HTTPS port, and the open-source
Control API authenticates nobody: whoever reaches that port with the public ``ca.pem`` can
list runs, register a SuperNode key of its own, submit code to every institution and stop
runs. So the SuperLink listens on the loopback interface only, and this module runs a real,
maintained reverse proxy (nginx, from the distribution) on the public address that

* terminates TLS with ``server.pem``/``server.key`` (institutions verify it with ``ca.pem``),
* forwards exactly the 12 Fleet API routes (:data:`FLEET_ROUTES`), POST only, to the
  SuperLink over TLS, verifying its certificate against the CA for the name ``localhost``;
  nginx matches the *normalised* path (``..`` and ``%2e`` resolved) and sends the SuperLink
  the canonical route, never the client's spelling of it,
* answers 404 to everything else (Control and runtime APIs, ``/docs``, other methods).

SuperNode authentication is end to end: each Fleet request is signed in headers
(``flwr-public-key``, ``flwr-signature``, ``flwr-timestamp``) that nginx passes unchanged, and
the SuperLink refuses an unregistered key (412). The operator's own ``flwr`` and the ServerApp
use the loopback address.

Everything nginx needs lives in ``<state-dir>/proxy`` (0700): its config (0600), pid file,
logs and temporary directories. nginx runs in the foreground (``daemon off``) as a
:class:`~common.deploy.child_processes.ChildProcess` (its own process group), stopped with the
SuperLink. nginx overwrites its environment with its process title, so the process tag of
:mod:`common.deploy.child_processes` cannot find it; instead, on Linux, it is started with a
parent-death signal: if ``ferry server`` is killed outright (SIGKILL), nginx gets SIGTERM,
stops its workers and frees the public port (a ``--resume`` can then listen there again).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from ferry.common.deploy.child_processes import ChildProcess
from ferry.common.deploy.tls import load_certificate
from ferry.common.errors import FerryError

FLEET_ROUTES = (
    "register-node",
    "activate-node",
    "deactivate-node",
    "unregister-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)
FLEET_PREFIX = "/v1/fleet/"
UPSTREAM_NAME = "localhost"  # the name nginx verifies on the SuperLink's certificate
LOOPBACK = "127.0.0.1"  # where the SuperLink listens
MAX_BODY = "16m"  # arrays travel in 5 MiB chunks; 4m gave 413 and a stalled round
NGINX_FALLBACK = "/usr/sbin/nginx"  # Debian's path, often not on a user's PATH


@dataclass(frozen=True)
class ProxySettings:
    """What the proxy needs: the public address, the SuperLink's loopback port, TLS files."""

    host: str  # public listen host, as in ``[server] address``
    port: int
    upstream_port: int  # the SuperLink on 127.0.0.1
    server_cert: Path
    server_key: Path
    ca_cert: Path
    directory: Path  # <state-dir>/proxy

    @property
    def config_path(self) -> Path:
        return self.directory / "nginx.conf"

    @property
    def error_log(self) -> Path:
        return self.directory / "error.log"


def nginx_binary() -> str:
    """The nginx executable; FerryError naming the package if it is not installed."""
    found = shutil.which("nginx") or (NGINX_FALLBACK if os.access(NGINX_FALLBACK, os.X_OK) else "")
    if not found:
        raise FerryError("nginx is not installed: apt-get install nginx")
    return found


def check_upstream_certificate(server_cert: Path) -> None:
    """nginx verifies the SuperLink by DNS name, so ``server.pem`` must name ``localhost``."""
    cert = load_certificate(server_cert, "server certificate")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if UPSTREAM_NAME not in names:
        raise FerryError(
            f"server certificate {server_cert} is not valid for DNS:{UPSTREAM_NAME}, the name "
            "the public proxy verifies when it forwards to the SuperLink on 127.0.0.1: make "
            f"one with `ferry certs --host {UPSTREAM_NAME} --host 127.0.0.1 --host <public "
            "name>` (move the old server.pem and server.key away first)"
        )


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _quoted(path: Path) -> str:
    text = str(path)
    if any(c in text for c in '"\\;{}$\n') or not text.isprintable():
        raise FerryError(f"path {text!r} cannot be used in the nginx config: rename it")
    return f'"{text}"'


def render_config(p: ProxySettings) -> str:
    """nginx.conf for :class:`ProxySettings` (pure: no file is read or written)."""
    d = p.directory
    routes = "\n".join(
        f"""        location = {FLEET_PREFIX}{route} {{
            if ($request_method != POST) {{ return 404; }}
            proxy_pass https://ferry_superlink{FLEET_PREFIX}{route};
        }}"""
        for route in FLEET_ROUTES
    )
    return f"""# Written by `ferry server` (server/proxy.py); rewritten at every start.
# Public port: the Fleet API's {len(FLEET_ROUTES)} POST routes, forwarded to the SuperLink on
# {LOOPBACK}:{p.upstream_port}; everything else 404 (the Control and runtime APIs stay local).
daemon off;
worker_processes 1;
pid {_quoted(d / "nginx.pid")};
error_log {_quoted(p.error_log)} warn;

events {{
    worker_connections 1024;
}}

http {{
    access_log {_quoted(d / "access.log")};
    client_body_temp_path {_quoted(d / "temp" / "body")};
    proxy_temp_path {_quoted(d / "temp" / "proxy")};
    fastcgi_temp_path {_quoted(d / "temp" / "fastcgi")};
    uwsgi_temp_path {_quoted(d / "temp" / "uwsgi")};
    scgi_temp_path {_quoted(d / "temp" / "scgi")};
    server_tokens off;
    default_type application/octet-stream;

    upstream ferry_superlink {{
        server {LOOPBACK}:{p.upstream_port};
        keepalive 16;
    }}

    server {{
        listen {_listen(p.host, p.port)} ssl;
        ssl_certificate {_quoted(p.server_cert)};
        ssl_certificate_key {_quoted(p.server_key)};
        ssl_protocols TLSv1.2 TLSv1.3;

        client_max_body_size {MAX_BODY};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_connect_timeout 10s;
        proxy_send_timeout 120s;
        proxy_read_timeout 120s;
        proxy_ssl_verify on;
        proxy_ssl_verify_depth 2;
        proxy_ssl_trusted_certificate {_quoted(p.ca_cert)};
        proxy_ssl_name {UPSTREAM_NAME};
        proxy_ssl_server_name on;
        proxy_ssl_protocols TLSv1.2 TLSv1.3;
        proxy_ssl_session_reuse on;

{routes}

        location / {{
            return 404;
        }}
    }}
}}
"""


def write_config(p: ProxySettings) -> Path:
    """Write nginx.conf (0600) into its own directory (made 0700; an existing one is kept)."""
    p.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (p.directory / "temp").mkdir(mode=0o700, exist_ok=True)  # nginx makes its folders here
    fd = os.open(p.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(render_config(p))
    os.chmod(p.config_path, 0o600)
    return p.config_path


def nginx_argv(p: ProxySettings, *extra: str) -> list[str]:
    return [
        nginx_binary(),
        "-p",
        f"{p.directory}/",
        "-c",
        str(p.config_path),
        "-e",
        str(p.error_log),
        *extra,
    ]


def preflight(p: ProxySettings) -> None:
    """Write the config and have nginx check it (``nginx -t``) before anything starts."""
    write_config(p)
    try:
        res = subprocess.run(nginx_argv(p, "-t", "-q"), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FerryError(f"cannot run nginx to check {p.config_path} ({exc})") from None
    if res.returncode != 0:
        detail = " ".join((res.stderr + res.stdout).split())[-300:]
        raise FerryError(f"nginx refused the proxy config {p.config_path}: {detail}")


def _connect_host(host: str) -> str:
    return {"0.0.0.0": LOOPBACK, "::": "::1"}.get(host, host)


def answers(p: ProxySettings, timeout: float = 2.0) -> bool:
    """True when nginx answers on the public port: TLS verified with the CA, ``GET /`` -> 404."""
    context = ssl.create_default_context(cafile=str(p.ca_cert))
    try:
        with socket.create_connection((_connect_host(p.host), p.port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=UPSTREAM_NAME) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                return tls.recv(64).startswith(b"HTTP/1.1 404")
    except OSError:
        return False


# Runs as ``python -c LAUNCHER PARENT_PID NGINX ARGS...``: asks the kernel for SIGTERM when
# the parent dies (PR_SET_PDEATHSIG = 1; kept across exec), checks the parent is still the
# one that started it (else it died first), then becomes nginx (same pid, same group).
LAUNCHER = """
import ctypes, os, signal, sys
if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM) != 0:
    sys.exit("ferry: cannot set a parent-death signal for nginx")
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
os.execv(sys.argv[2], sys.argv[2:])
"""


def _with_parent_death_signal(argv: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return argv  # elsewhere only ChildProcess.stop ends it
    return [sys.executable, "-c", LAUNCHER, str(os.getpid()), *argv]


def start_proxy(p: ProxySettings, env: dict[str, str] | None = None, timeout: float = 30.0):
    """Start nginx (config already written by :func:`preflight`); wait until it answers."""
    argv = _with_parent_death_signal(nginx_argv(p))
    proxy = ChildProcess("proxy", argv, p.directory / "nginx.out", env).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proxy.poll() is not None:
            tail = _log_tail(p.error_log) or proxy.log_tail(1)
            raise FerryError(
                f"the proxy (nginx) exited with code {proxy.poll()} at start-up; see "
                f"{p.error_log}: {tail}"
            )
        if answers(p):
            return proxy
        time.sleep(0.2)
    proxy.stop()
    raise FerryError(
        f"the proxy (nginx) did not answer on {_listen(p.host, p.port)} within {timeout:.0f}s; "
        f"see {p.error_log}"
    )


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""
