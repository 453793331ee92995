"""The public proxy of ``ferry server`` (server/proxy.py) and the configurations it refuses.

Fast: the rendered nginx config (the 12 Fleet routes, POST only, everything else 404), a real
nginx in front of a recording HTTPS upstream (only canonical Fleet paths ever reach it), and
each configuration that would expose the SuperLink's Control API refused with one line,
exit code 2, before any process starts.
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import os
import re
import signal
import socket
import ssl
import stat
import sys
import threading
import time
from pathlib import Path

import pytest

import ferry.common.deploy.child_processes as child_processes
import ferry.server.proxy as proxy
from ferry.cli import main
from ferry.common.errors import FerryError
from ferry.common.serialization import save_artifact
from ferry.server.certs import make_certs
from ferry.server.pretrain import random_artifact
from ferry.server.proxy import FLEET_ROUTES, ProxySettings, render_config
from ferry.server.server_settings import load_server_config
from ferry.server.superlink import superlink_argv, write_flower_home
from tests.test_deploy import free_port

START = child_processes.ChildProcess.start


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("proxy-certs") / "certs"
    make_certs(out, institutions=["hospital-a"])
    return out


def _settings(certs: Path, directory: Path, port: int = 9443, upstream: int = 9444):
    return ProxySettings(
        "127.0.0.1",
        port,
        upstream,
        certs / "server.pem",
        certs / "server.key",
        certs / "ca.pem",
        directory,
    )


# --- the rendered config ---------------------------------------------------------------------


def test_config_forwards_exactly_the_12_fleet_routes_post_only(certs, tmp_path):
    text = render_config(_settings(certs, tmp_path / "proxy"))
    locations = re.findall(r"^\s*location\s+(.*?)\s*\{", text, re.M)
    exact = sorted(loc.removeprefix("= ") for loc in locations if loc.startswith("= "))
    assert exact == sorted(f"/v1/fleet/{route}" for route in FLEET_ROUTES)
    assert len(FLEET_ROUTES) == 12
    assert [x for x in locations if not x.startswith("= ")] == ["/"]  # the catch-all only
    blocks = re.findall(r"location = (\S+) \{(.*?)\n        \}", text, re.S)
    assert len(blocks) == 12
    for path, body in blocks:
        assert "if ($request_method != POST) { return 404; }" in body, path
        # The SuperLink gets the canonical route, never the client's spelling of it.
        assert f"proxy_pass https://ferry_superlink{path};" in body, path
    catch_all = text.split("location / {", 1)[1].split("}", 1)[0]
    assert catch_all.split() == ["return", "404;"]
    for line in (
        "listen 127.0.0.1:9443 ssl;",
        "server 127.0.0.1:9444;",
        "proxy_ssl_verify on;",
        "proxy_ssl_name localhost;",
        "client_max_body_size 16m;",
        "proxy_http_version 1.1;",
        "proxy_request_buffering off;",
        "proxy_buffering off;",
        "proxy_read_timeout 120s;",
        "daemon off;",
    ):
        assert line in text, line
    assert f'proxy_ssl_trusted_certificate "{certs / "ca.pem"}";' in text
    assert f'ssl_certificate_key "{certs / "server.key"}";' in text


def test_ipv6_listen_address_is_bracketed(certs, tmp_path):
    text = render_config(dataclasses.replace(_settings(certs, tmp_path), host="::"))
    assert "listen [::]:9443 ssl;" in text


def test_config_is_private_and_nginx_accepts_it(certs, tmp_path):
    settings = _settings(certs, tmp_path / "state" / "proxy")
    proxy.preflight(settings)
    assert stat.S_IMODE(settings.config_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(settings.directory.stat().st_mode) == 0o700


def test_a_path_nginx_cannot_quote_is_refused(certs, tmp_path):
    with pytest.raises(FerryError, match="cannot be used in the nginx config"):
        render_config(_settings(certs, tmp_path / 'a"b; }'))


def test_missing_nginx_is_one_line_naming_the_package(monkeypatch):
    monkeypatch.setattr(proxy.shutil, "which", lambda name: None)
    monkeypatch.setattr(proxy, "NGINX_FALLBACK", "/nonexistent/nginx")
    with pytest.raises(FerryError, match=r"^nginx is not installed: apt-get install nginx$"):
        proxy.nginx_binary()


# --- a real nginx in front of a recording upstream -------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str]] = []

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.seen.append((self.command, self.path))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def live_proxy(certs, tmp_path, monkeypatch):
    """nginx (real) on a free port, forwarding to a TLS upstream that records each request."""
    monkeypatch.setattr(child_processes.ChildProcess, "start", START)
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "server.pem", certs / "server.key")
    upstream.socket = context.wrap_socket(upstream.socket, server_side=True)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    settings = _settings(certs, tmp_path / "proxy", free_port(), upstream.server_address[1])
    proxy.preflight(settings)
    nginx = proxy.start_proxy(settings)
    _Recorder.seen = []
    try:
        yield settings
    finally:
        nginx.stop()
        upstream.shutdown()
        assert child_processes.tagged_pids(nginx.tag) == []


def _status(settings: ProxySettings, method: str, path: str) -> int:
    context = ssl.create_default_context(cafile=str(settings.ca_cert))
    conn = http.client.HTTPSConnection("127.0.0.1", settings.port, context=context, timeout=10)
    try:
        conn.request(method, path, body=b"x" if method == "POST" else None)
        return conn.getresponse().status
    finally:
        conn.close()


PARENT = """
import sys, time
from pathlib import Path
from ferry.server.proxy import ProxySettings, preflight, start_proxy
port, upstream, certs, directory = sys.argv[1:5]
certs = Path(certs)
s = ProxySettings("127.0.0.1", int(port), int(upstream), certs / "server.pem",
                  certs / "server.key", certs / "ca.pem", Path(directory))
preflight(s)
start_proxy(s)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_nginx_stops_when_ferry_server_is_killed_outright(certs, tmp_path, monkeypatch):
    """nginx hides the process tag (it overwrites its environment), so a SIGKILLed server
    must not leave it holding the public port: a --resume would find the port taken."""
    monkeypatch.setattr(child_processes.ChildProcess, "start", START)
    settings = _settings(certs, tmp_path / "proxy", free_port(), free_port())
    argv = [sys.executable, "-c", PARENT, str(settings.port), str(settings.upstream_port)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    parent = child_processes.ChildProcess(
        "server", [*argv, str(certs), str(settings.directory)], tmp_path / "server.log", env
    ).start()
    nginx = 0
    try:
        deadline = time.monotonic() + 30
        while not proxy.answers(settings) and time.monotonic() < deadline:
            assert parent.poll() is None, parent.log_tail()
            time.sleep(0.1)
        nginx = int((settings.directory / "nginx.pid").read_text())
        assert _alive(nginx)
        os.kill(parent.pid, signal.SIGKILL)
        parent.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(nginx) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(nginx), "nginx outlived the server that started it"
        with socket.create_server(("127.0.0.1", settings.port)):
            pass  # the public port is free again
    finally:
        parent.stop(grace=2)
        if nginx and _alive(nginx):
            os.killpg(nginx, signal.SIGKILL)


def test_real_nginx_forwards_fleet_posts_and_nothing_else(live_proxy):
    for route in FLEET_ROUTES:
        assert _status(live_proxy, "POST", f"/v1/fleet/{route}") == 200, route
    forwarded = list(_Recorder.seen)
    assert forwarded == [("POST", f"/v1/fleet/{route}") for route in FLEET_ROUTES]
    refused = [
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/runtime/pull-task-input"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("POST", "/v1/fleet/../control/list-runs"),
        ("POST", "/v1/fleet/%2e%2e/control/stop-run"),
        ("POST", "//v1/control/list-runs"),
        ("POST", "/v1/fleet/pull-messages/"),
        ("POST", "/v1/fleet/pull-messagesX"),
        ("GET", "/v1/fleet/pull-messages"),
        ("PUT", "/v1/fleet/push-messages"),
        ("DELETE", "/v1/fleet/register-node"),
    ]
    assert {r: _status(live_proxy, *r) for r in refused} == dict.fromkeys(refused, 404)
    # A spelling that normalises onto a Fleet route reaches the SuperLink only canonically.
    assert _status(live_proxy, "POST", "/v1/control/../fleet/get-run") == 200
    assert _Recorder.seen[len(forwarded) :] == [("POST", "/v1/fleet/get-run")]


def test_body_limit_is_16_mib(live_proxy):
    conn_ok = _status_body(live_proxy, 6 * 1024 * 1024)  # one 5 MiB chunk plus framing
    assert conn_ok == 200
    assert _status_body(live_proxy, 17 * 1024 * 1024) == 413


def _status_body(settings: ProxySettings, size: int) -> int:
    context = ssl.create_default_context(cafile=str(settings.ca_cert))
    conn = http.client.HTTPSConnection("127.0.0.1", settings.port, context=context, timeout=30)
    try:
        conn.request("POST", "/v1/fleet/push-object", body=b"\0" * size)
        return conn.getresponse().status
    except (BrokenPipeError, ConnectionResetError):
        return 413  # nginx may close before reading a refused body
    finally:
        conn.close()


# --- configurations that would expose the Control API are refused ----------------------------


@pytest.fixture
def server_toml(tmp_path, certs, monkeypatch):
    def start(self):
        raise AssertionError(f"{self.name} was started; the input should have been refused")

    monkeypatch.setattr(child_processes.ChildProcess, "start", start)
    weights = save_artifact(random_artifact("ferry-cnn", 0), tmp_path / "backbone")

    def write(server: str = "", address: str = "127.0.0.1:1", certs: Path = certs) -> Path:
        path = tmp_path / "server.toml"
        path.write_text(
            f"""[server]
address = "{address}"
certs = "{certs}"
state-dir = "{tmp_path / "state"}"
{server}

[institutions]
hospital-a = "{certs}/institutions/hospital-a.pub"

[run]
num-classes = 4
weights = "{weights}"
out = "{tmp_path / "run"}"
"""
        )
        return path

    return write


def _error_line(capsys, argv: list[str]) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, f"exit code {code}; stderr: {err!r}"
    lines = [line for line in err.splitlines() if not line.startswith("ferry: note:")]
    assert len(lines) == 1 and lines[0].startswith("ferry: error: "), lines
    return lines[0]


@pytest.mark.parametrize("address", ["0.0.0.0:9092", "10.1.2.3:9092", "fl.example.org:9092"])
def test_insecure_on_a_non_loopback_address_is_refused(capsys, server_toml, address):
    config = server_toml(address=address)
    line = _error_line(capsys, ["server", "--config", str(config), "--insecure"])
    assert "--insecure with [server] address" in line and "Control API" in line
    assert "use a loopback address" in line


def test_insecure_on_loopback_keeps_the_superlink_on_the_address(server_toml):
    s = load_server_config(server_toml(address="127.0.0.1:9555"), insecure=True)
    argv = superlink_argv(s)
    assert argv[argv.index("--host") + 1 : argv.index("--host") + 4] == [
        "127.0.0.1",
        "--port",
        "9555",
    ]
    assert "--insecure" in argv


def test_a_server_certificate_without_localhost_is_refused(
    capsys, server_toml, tmp_path, reissue_server_cert
):
    make_certs(tmp_path / "ip-only")
    reissue_server_cert(tmp_path / "ip-only", ["127.0.0.1", "fl.example.org"])
    line = _error_line(capsys, ["server", "--config", str(server_toml(certs=tmp_path / "ip-only"))])
    assert "is not valid for DNS:localhost" in line and "ferry certs --host localhost" in line


def test_an_internal_port_equal_to_the_public_port_is_refused(capsys, server_toml):
    config = server_toml(server="internal-port = 9777", address="127.0.0.1:9777")
    line = _error_line(capsys, ["server", "--config", str(config)])
    assert "[server] internal-port 9777 is the public port" in line


@pytest.mark.parametrize("value", ["0", "70000", '"9093"', "true", "9093.5"])
def test_a_bad_internal_port_is_refused(capsys, server_toml, value):
    line = _error_line(
        capsys, ["server", "--config", str(server_toml(server=f"internal-port = {value}"))]
    )
    assert "[server] internal-port" in line and "is invalid" in line


def test_tls_superlink_listens_on_loopback_and_the_operator_uses_it(server_toml, tmp_path):
    s = load_server_config(server_toml(server="internal-port = 9778", address="0.0.0.0:9779"))
    argv = superlink_argv(s)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "9778"
    assert "--enable-supernode-auth" in argv and "--ssl-certfile" in argv
    home = write_flower_home(tmp_path / "home", s)
    assert 'address = "127.0.0.1:9778"' in (home / "config.toml").read_text()
    assert "listen 0.0.0.0:9779 ssl;" in s.proxy.config_path.read_text()  # preflight wrote it


def test_a_picked_internal_port_is_never_the_public_one(server_toml):
    s = load_server_config(server_toml(address="127.0.0.1:9780"))
    assert 0 < s.internal_port < 65536 and s.internal_port != 9780
