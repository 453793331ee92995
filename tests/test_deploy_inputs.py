"""``ferry certs`` output, and bad input to ``ferry client``/``ferry server``: each problem is
one line naming it, exit code 2, no traceback, and no Flower process started."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image

import ferry.common.deploy.child_processes as child_processes
from ferry.cli import main
from ferry.common.serialization import save_artifact
from ferry.server.certs import make_certs
from ferry.server.pretrain import random_artifact

START = child_processes.ChildProcess.start


@pytest.fixture(autouse=True)
def no_flower_processes(monkeypatch):
    """Bad input must be refused before any process starts."""

    def start(self):
        raise AssertionError(f"{self.name} was started; the input should have been refused")

    monkeypatch.setattr(child_processes.ChildProcess, "start", start)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs") / "certs"
    make_certs(out, institutions=["hospital-a"])
    return out


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("other") / "certs"
    make_certs(out)
    return out


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "images"
    for label in ("ring", "frame"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            pixels = np.random.default_rng(i).integers(0, 255, (32, 32), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def _error_line(capsys, argv: list[str]) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, f"exit code {code}; stderr: {err!r}"
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if not line.startswith("ferry: note:")]
    assert len(lines) == 1, lines
    assert lines[0].startswith("ferry: error: ")
    return lines[0]


# --- ferry certs ---------------------------------------------------------------------------


def test_certs_keep_private_keys_private_and_make_flower_compatible_keys(tmp_path):
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--institution", "bank-1"]) == 0

    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    ca_key = tmp_path / "certs-ca" / "ca.key"  # kept apart from the server's files
    for key in (ca_key, out / "server.key", out / "institutions" / "bank-1.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    private = serialization.load_ssh_private_key(
        (out / "institutions" / "bank-1.key").read_bytes(), password=None
    )
    public = serialization.load_ssh_public_key((out / "institutions" / "bank-1.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert public.public_numbers() == private.public_key().public_numbers()


def test_server_certificate_is_signed_by_the_ca_for_the_default_and_given_hosts(tmp_path):
    make_certs(tmp_path / "c", hosts=["127.0.0.1", "localhost", "fl.example.org", "10.1.2.3"])
    ca = x509.load_pem_x509_certificate((tmp_path / "c" / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "c" / "server.pem").read_bytes())

    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_certificate_for_a_public_name_also_names_loopback_for_the_proxy(tmp_path):
    """The README's command names only the public host; the SuperLink behind the proxy is
    reached as localhost and 127.0.0.1, so the certificate must name both anyway."""
    make_certs(tmp_path / "c", hosts=["fl.example.org"])
    cert = x509.load_pem_x509_certificate((tmp_path / "c" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    assert cert.subject.rfc4514_string() == "CN=fl.example.org"


def test_certs_never_overwrite_and_add_what_is_missing(tmp_path, capsys):
    out = tmp_path / "certs"
    make_certs(out)
    ca_key = tmp_path / "certs-ca" / "ca.key"
    ca_before = ca_key.read_bytes()

    assert main(["certs", "--out", str(out), "--institution", "late-joiner"]) == 0

    assert ca_key.read_bytes() == ca_before
    assert (out / "institutions" / "late-joiner.key").exists()
    printed = capsys.readouterr().out
    assert "kept    " in printed and "created " in printed


def test_keys_only_makes_just_an_institution_key_pair(tmp_path):
    main(["certs", "--out", str(tmp_path / "mine"), "--keys-only", "--institution", "bank-2"])
    assert sorted(p.name for p in (tmp_path / "mine").rglob("*") if p.is_file()) == [
        "bank-2.key",
        "bank-2.pub",
    ]


def test_certs_refuse_a_bad_host_or_institution_name(capsys, tmp_path):
    line = _error_line(capsys, ["certs", "--out", str(tmp_path / "a"), "--host", "no spaces"])
    assert "--host 'no spaces'" in line
    line = _error_line(capsys, ["certs", "--out", str(tmp_path / "b"), "--institution", "../x"])
    assert "institution name '../x' is invalid" in line


# --- ferry client ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


def _client(certs: Path, data: Path, tmp: Path, **override) -> list[str]:
    args = {
        "--server": "127.0.0.1:1",  # nothing listens: the server check is skipped (a note)
        "--root-cert": str(certs / "ca.pem"),
        "--key": str(certs / "institutions" / "hospital-a.key"),
        "--data": str(data),
        "--state-dir": str(tmp / "state"),
        "--budget-epsilon": "3",
        "--budget-delta": "1e-5",
        "--institution": "hospital-a",
        "--runtime-port": str(_free_port()),
    } | override
    return ["client", *[x for kv in args.items() if kv[1] is not None for x in kv]]


@pytest.mark.parametrize("address", ["nohost", "127.0.0.1:99999", "host:abc", ":9092", "::1:9"])
def test_client_refuses_an_unparseable_server_address(capsys, certs, data, tmp_path, address):
    line = _error_line(capsys, _client(certs, data, tmp_path, **{"--server": address}))
    assert f"--server {address!r} is not an address" in line


def test_client_refuses_a_missing_ca_certificate(capsys, certs, data, tmp_path):
    missing = tmp_path / "nowhere" / "ca.pem"
    line = _error_line(capsys, _client(certs, data, tmp_path, **{"--root-cert": str(missing)}))
    assert f"--root-cert {missing} does not exist" in line


def _expired_ca(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA384())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_client_refuses_an_expired_ca_certificate(capsys, certs, data, tmp_path):
    old = _expired_ca(tmp_path / "old-ca.pem")
    line = _error_line(capsys, _client(certs, data, tmp_path, **{"--root-cert": str(old)}))
    assert f"--root-cert {old} expired on" in line


def test_client_refuses_a_server_certificate_given_as_ca(capsys, certs, data, tmp_path):
    leaf = certs / "server.pem"
    line = _error_line(capsys, _client(certs, data, tmp_path, **{"--root-cert": str(leaf)}))
    assert "is not a CA certificate" in line


def _tls_server(certs: Path):
    """A TLS listener presenting ``certs``' server certificate, until the test ends."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "server.pem", certs / "server.key")
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return sock, stop, thread


def test_client_refuses_a_server_that_does_not_verify_with_its_ca(
    capsys, certs, other_certs, data, tmp_path
):
    sock, stop, thread = _tls_server(other_certs)  # another federation's server
    try:
        port = sock.getsockname()[1]
        argv = _client(certs, data, tmp_path, **{"--server": f"127.0.0.1:{port}"})
        line = _error_line(capsys, argv)
    finally:
        stop.set()
        thread.join()
        sock.close()
    assert f"the server at 127.0.0.1:{port} did not prove its identity with --root-cert" in line


def test_client_refuses_a_private_key_others_can_read(capsys, certs, data, tmp_path):
    key = tmp_path / "hospital-a.key"
    key.write_bytes((certs / "institutions" / "hospital-a.key").read_bytes())
    key.chmod(0o644)
    line = _error_line(capsys, _client(certs, data, tmp_path, **{"--key": str(key)}))
    assert "can be read by other users (mode 0644)" in line and "chmod 600" in line


def test_client_refuses_a_key_that_is_not_an_openssh_ec_key(capsys, certs, data, tmp_path):
    key = tmp_path / "x.key"
    key.write_bytes((certs / "server.key").read_bytes())  # PKCS8 PEM, not OpenSSH
    key.chmod(0o600)
    line = _error_line(capsys, _client(certs, data, tmp_path, **{"--key": str(key)}))
    assert "is not an unencrypted OpenSSH private key" in line


def test_client_refuses_a_data_path_that_does_not_exist(capsys, certs, data, tmp_path):
    line = _error_line(capsys, _client(certs, data, tmp_path, **{"--data": "/no/such/dir"}))
    assert "--data /no/such/dir is not a directory" in line


def test_client_refuses_data_without_usable_examples(capsys, certs, data, tmp_path):
    empty = tmp_path / "empty" / "only-class"
    empty.mkdir(parents=True)
    (empty / "notes.txt").write_text("no images")
    line = _error_line(capsys, _client(certs, data, tmp_path, **{"--data": str(empty.parent)}))
    assert "has no usable examples" in line


def test_client_accepts_a_table_and_refuses_a_file_of_another_kind(tmp_path):
    from ferry.client.supernode import check_data
    from ferry.common.errors import FerryError

    table = tmp_path / "loans.csv"
    table.write_text("income,default\n" + "".join(f"{1000 + i},{i % 2}\n" for i in range(9)))
    assert check_data(table) == ([], 9)
    other = tmp_path / "loans.xlsx"
    other.write_bytes(b"PK")
    with pytest.raises(FerryError, match="neither a folder of images nor a table"):
        check_data(other)
    (tmp_path / "one.csv").write_text("income,default\n1,0\n")
    with pytest.raises(FerryError, match="holds 1 record"):
        check_data(tmp_path / "one.csv")


def test_client_refuses_an_unreadable_data_path(capsys, certs, data, tmp_path, monkeypatch):
    if os.geteuid() == 0:  # root reads every directory: make this one unreadable to us
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m: Path(p) != data and real(p, m))
    data.chmod(0)
    try:
        line = _error_line(capsys, _client(certs, data, tmp_path))
    finally:
        data.chmod(0o755)
    assert f"--data {data} is not readable" in line


def test_client_refuses_an_unwritable_state_directory(capsys, certs, data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    state = blocker / "state"  # cannot be created under a file, even by root
    line = _error_line(capsys, _client(certs, data, tmp_path, **{"--state-dir": str(state)}))
    assert f"--state-dir {state} is not writable" in line


def test_client_refuses_a_bad_budget(capsys, certs, data, tmp_path):
    line = _error_line(capsys, _client(certs, data, tmp_path, **{"--budget-epsilon": "-1"}))
    assert "--budget-epsilon -1.0 is invalid" in line
    line = _error_line(capsys, _client(certs, data, tmp_path, **{"--budget-delta": "1.5"}))
    assert "--budget-delta 1.5 is invalid" in line


def test_client_without_tls_material_says_what_to_give(capsys, certs, data, tmp_path):
    line = _error_line(capsys, _client(certs, data, tmp_path, **{"--root-cert": None}))
    assert "--root-cert CA.pem and --key INSTITUTION.key are required" in line


def test_client_refuses_a_runtime_port_in_use(capsys, certs, data, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = str(busy.getsockname()[1])
        line = _error_line(capsys, _client(certs, data, tmp_path, **{"--runtime-port": port}))
    assert f"--runtime-port {port} is in use" in line


# --- ferry server ----------------------------------------------------------------------------


@pytest.fixture
def server_toml(tmp_path, certs):
    weights = save_artifact(random_artifact("ferry-cnn", 0), tmp_path / "backbone")
    key = f'hospital-a = "{certs}/institutions/hospital-a.pub"'

    def write(
        server: str = "", run: str = "", institutions: str | None = None, certs: Path = certs
    ) -> Path:
        keys = key if institutions is None else institutions
        path = tmp_path / "server.toml"
        path.write_text(
            f"""[server]
address = "127.0.0.1:1"
certs = "{certs}"
state-dir = "{tmp_path / "state"}"
{server}

[institutions]
{keys}

[run]
num-classes = 4
weights = "{weights}"
out = "{tmp_path / "run"}"
{run}
"""
        )
        return path

    return write


def test_server_refuses_a_missing_config_file(capsys, tmp_path):
    line = _error_line(capsys, ["server", "--config", str(tmp_path / "none.toml")])
    assert "cannot read config file" in line


def test_server_refuses_a_config_that_is_not_toml(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\naddress = ")
    assert "is not valid TOML" in _error_line(capsys, ["server", "--config", str(bad)])


def test_server_refuses_a_bad_listen_address(capsys, server_toml):
    config = server_toml()
    config.write_text(config.read_text().replace('"127.0.0.1:1"', '"127.0.0.1"'))
    line = _error_line(capsys, ["server", "--config", str(config)])
    assert "[server] address '127.0.0.1' is not an address" in line


def test_server_refuses_a_server_certificate_from_another_ca(capsys, server_toml, other_certs):
    config = server_toml(server=f'ca-cert = "{other_certs}/ca.pem"')
    line = _error_line(capsys, ["server", "--config", str(config)])
    assert "is not signed by the CA" in line


def test_server_refuses_a_certificate_not_valid_for_its_address(
    capsys, server_toml, tmp_path, reissue_server_cert
):
    out = tmp_path / "public-only"
    make_certs(out)
    config = server_toml(certs=reissue_server_cert(out, ["fl.example.org"]))
    line = _error_line(capsys, ["server", "--config", str(config)])
    assert "is not valid for 127.0.0.1" in line and "ferry certs --host 127.0.0.1" in line


def test_server_refuses_an_expired_ca(capsys, server_toml, tmp_path):
    old = _expired_ca(tmp_path / "old.pem")
    line = _error_line(
        capsys, ["server", "--config", str(server_toml(server=f'ca-cert = "{old}"'))]
    )
    assert "expired on" in line


def test_server_refuses_an_institution_key_that_is_not_a_public_key(capsys, server_toml, certs):
    config = server_toml(institutions=f'hospital-a = "{certs}/ca.pem"')
    line = _error_line(capsys, ["server", "--config", str(config)])
    assert "[institutions] hospital-a" in line and "is not an OpenSSH public key" in line


def test_server_refuses_missing_weights_and_bad_run_settings(capsys, server_toml):
    config = server_toml()
    config.write_text(config.read_text().replace("num-classes = 4", "num-classes = 1"))
    assert "num-classes 1 is invalid" in _error_line(capsys, ["server", "--config", str(config)])
    config = server_toml(run="rounds = 0")
    assert "--rounds 0 is invalid" in _error_line(capsys, ["server", "--config", str(config)])


def test_server_refuses_an_out_dir_holding_a_run_and_a_resume_without_checkpoint(
    capsys, server_toml, tmp_path
):
    config = server_toml()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ledger.jsonl").write_text("{}\n")
    line = _error_line(capsys, ["server", "--config", str(config)])
    assert "already holds a run" in line and "--resume" in line
    line = _error_line(
        capsys, ["server", "--config", str(config), "--resume", str(tmp_path / "elsewhere")]
    )
    assert "holds no checkpoint.json: nothing to resume" in line


def test_server_refuses_a_port_in_use(capsys, server_toml):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        config = server_toml()
        config.write_text(config.read_text().replace('"127.0.0.1:1"', f'"127.0.0.1:{port}"'))
        line = _error_line(capsys, ["server", "--config", str(config)])
    assert f"cannot listen on 127.0.0.1:{port}" in line


def test_insecure_server_warns_loudly_on_stderr(capsys, server_toml, monkeypatch):
    import ferry.server.superlink as superlink

    monkeypatch.setattr(superlink, "stop_stale_runs", lambda s, log: None)
    monkeypatch.setattr(superlink, "exit_on_signals", lambda: None)  # pytest keeps its own
    config = server_toml()
    with pytest.raises(AssertionError, match="superlink was started"):
        main(["server", "--config", str(config), "--insecure"])
    err = capsys.readouterr().err
    assert "WARNING: --insecure: TLS is OFF" in err and "local trials only" in err


# --- processes ---------------------------------------------------------------------------------


def test_stopping_a_child_also_stops_descendants_that_left_its_process_group(tmp_path, monkeypatch):
    monkeypatch.setattr(child_processes.ChildProcess, "start", START)  # this one starts one
    script = (
        "import subprocess, sys, time;"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " start_new_session=True); time.sleep(60)"
    )
    child = child_processes.ChildProcess(
        "sleeper", [sys.executable, "-c", script], tmp_path / "log"
    ).start()
    deadline = time.monotonic() + 10
    while len(child_processes.tagged_pids(child.tag)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(child_processes.tagged_pids(child.tag)) == 2

    child.stop(grace=2)

    assert child_processes.tagged_pids(child.tag) == []
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert str(child.pid) not in [line.split()[0] for line in ps.splitlines()[1:]]


def test_server_refuses_to_resume_a_run_with_other_settings(capsys, server_toml, tmp_path):
    from ferry.server.checkpoint import Checkpoint, save_checkpoint

    config = server_toml(run="lr = 0.5")
    (tmp_path / "run").mkdir()
    save_checkpoint(
        tmp_path / "run",
        Checkpoint(
            run_id="run",
            backbone_sha256=random_artifact("ferry-cnn", 0).sha256,
            config={"lr": 1.0},
            round=1,
            arrays={},
            rng={},
        ),
    )
    argv = ["server", "--config", str(config), "--resume", str(tmp_path / "run")]
    line = _error_line(capsys, argv)
    assert "the settings differ from the run in" in line and "lr" in line
