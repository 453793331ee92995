"""Hostile command lines, table-driven, across every ``ferry`` subcommand.

Each case plays someone typing (or scripting) the worst they can: wrong types, NaN, infinity,
negative and huge numbers, empty strings, files where folders belong and the reverse,
unreadable, binary, garbage and truncated config and data files, unknown names, TOML with
wrong types in every section, names with path separators. Every case must end the same way,
before any work starts: exit code 2, one stderr line ``ferry: error: ...`` and no traceback,
within a time limit, and every file that was there before (a backbone, a ledger, a privacy
state file, certificates and keys) byte-identical and with the same mode afterwards.

Cases run in-process (``ferry.cli.main`` with argv); the few that hung on old code run as a
real ``ferry`` process with a timeout, so a hang fails the case instead of the suite.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ferry.common.deploy.child_processes as child_processes
from ferry.cli import main
from ferry.common.serialization import save_artifact
from ferry.server.certs import make_certs
from ferry.server.pretrain import random_artifact

ROOT = Path(__file__).resolve().parent.parent
IN_PROCESS_LIMIT_S = 30  # most cases take well under a second
SUBPROCESS_LIMIT_S = 60


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """Everything a hostile case may aim at; each case works on its own copy."""
    w = tmp_path_factory.mktemp("world")
    make_certs(w / "certs", institutions=["hospital-a"])
    save_artifact(random_artifact("ferry-cnn", 0), w / "backbone")
    (w / "run").mkdir()
    (w / "run" / "ledger.jsonl").write_text('{"kind": "run_started", "round": 0}\n')
    (w / "run" / "metrics.jsonl").write_text('{"round": 1}\n')
    (w / "state").mkdir(mode=0o700)
    (w / "state" / "privacy_state.json").write_text('{"format": "x", "entries": []}\n')
    for label in ("ring", "frame"):
        (w / "images" / label).mkdir(parents=True)
        for i in range(3):
            pixels = np.random.default_rng(i).integers(0, 255, (32, 32), dtype=np.uint8)
            Image.fromarray(pixels).save(w / "images" / label / f"{i}.png")
    (w / "empty-dir").mkdir()
    (w / "a-file").write_text("not a folder\n")
    (w / "empty.toml").write_text("")
    (w / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (w / "binary.csv").write_bytes(np.random.default_rng(0).bytes(8192))
    (w / "binary.toml").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    (w / "truncated.toml").write_text('[server]\naddress = "127.0.0.1:90')
    (w / "header-only.csv").write_text("age,income,label\n")
    (w / "one-column.csv").write_text("label\n1\n2\n3\n")
    (w / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    (w / "unreadable.toml").write_text("rounds = 2\n")
    os.chmod(w / "unreadable.toml", 0o000)
    (w / "dir-as-config").mkdir()
    return w


@pytest.fixture
def world(template, tmp_path, monkeypatch) -> Path:
    w = tmp_path / "w"
    shutil.copytree(template, w, symlinks=True, ignore_dangling_symlinks=True)
    os.chmod(w / "unreadable.toml", 0o000)
    monkeypatch.chdir(w)  # a default output (runs/..., certs/) lands here, never in the repo
    return w


def _server_toml(w: Path, server: str = "", institutions: str | None = None, run: str = "") -> str:
    keys = f'hospital-a = "{w}/certs/institutions/hospital-a.pub"'
    return f"""[server]
address = "127.0.0.1:{_free_port()}"
certs = "{w}/certs"
state-dir = "{w}/server-state"
{server}

[institutions]
{keys if institutions is None else institutions}

[run]
num-classes = 2
weights = "{w}/backbone"
out = "{w}/deploy-run"
{run}
"""


def _server(**parts: str):
    """A ``ferry server`` argv whose config is the valid one with ``parts`` changed."""

    def make(w: Path) -> list[str]:
        path = w / "server.toml"
        path.write_text(_server_toml(w, **parts))
        return ["server", "--config", str(path)]

    return make


def _raw_server(text: str):
    def make(w: Path) -> list[str]:
        path = w / "server.toml"
        path.write_text(text.replace("{w}", str(w)))
        return ["server", "--config", str(path)]

    return make


def _client(*changes: str, drop: tuple[str, ...] = ()):
    """A ``ferry client`` argv: the valid one (TLS, the institution's key, a server that is
    not up) with flags replaced or added."""

    def make(w: Path) -> list[str]:
        flags = {
            "--server": "127.0.0.1:1",
            "--data": f"{w}/images",
            "--state-dir": f"{w}/state",
            "--budget-epsilon": "3",
            "--budget-delta": "1e-5",
            "--institution": "hospital-a",
            "--runtime-port": str(_free_port()),
            "--root-cert": f"{w}/certs/ca.pem",
            "--key": f"{w}/certs/institutions/hospital-a.key",
        }
        pairs = list(changes)
        for flag, value in zip(pairs[::2], pairs[1::2], strict=True):
            flags[flag] = value.replace("{w}", str(w))
        for flag in drop:
            flags.pop(flag)
        argv = ["client"]
        for flag, value in flags.items():
            argv += [flag, value]
        return argv

    return make


def _argv(*args: str):
    return lambda w: [a.replace("{w}", str(w)) for a in args]


def _sim(*args: str):
    """``ferry simulate`` on small synthetic data with a pre-made backbone, plus ``args``."""
    base = ("simulate", "--examples", "200", "--clients", "2", "--weights", "{w}/backbone")
    return _argv(*base, "--out", "{w}/sim-out", *args)


def _pretrain(*args: str):
    return _argv("pretrain", "--examples", "200", "--epochs", "1", *args)


def _config_file(text: str, command: str = "simulate"):
    def make(w: Path) -> list[str]:
        path = w / "hostile.toml"
        path.write_text(text)
        extra = ["--weights", f"{w}/backbone", "--out", f"{w}/sim-out"]
        return [command, "--config", str(path), *(extra if command == "simulate" else [])]

    return make


@dataclass(frozen=True)
class Case:
    id: str
    argv: object  # (world) -> list[str]
    expect: str = ""  # a word the error line must contain (the problem it names)
    subprocess: bool = False  # hung on old code: run as a real process with a timeout


CASES = [
    # --- ferry (no subcommand / argparse level) ---
    Case("no-subcommand", _argv()),
    Case("unknown-subcommand", _argv("teleport")),
    Case("missing-option-value", _argv("simulate", "--rounds")),
    # --- ferry certs ---
    Case("certs-days-1e9-text", _argv("certs", "--out", "{w}/c2", "--days", "1e9"), "--days"),
    Case("certs-days-huge", _argv("certs", "--out", "{w}/c2", "--days", "1000000000"), "--days"),
    Case("certs-days-zero", _argv("certs", "--out", "{w}/c2", "--days", "0"), "--days"),
    Case("certs-days-negative", _argv("certs", "--out", "{w}/c2", "--days", "-3"), "--days"),
    Case("certs-empty-host", _argv("certs", "--out", "{w}/c2", "--host", ""), "--host"),
    Case("certs-host-path", _argv("certs", "--out", "{w}/c2", "--host", "a/b"), "--host"),
    Case(
        "certs-institution-path",
        _argv("certs", "--out", "{w}/c2", "--institution", "../evil"),
        "institution",
    ),
    Case("certs-institution-empty", _argv("certs", "--out", "{w}/c2", "--institution", "")),
    Case("certs-out-is-a-file", _argv("certs", "--out", "{w}/a-file"), "a-file"),
    Case("certs-federation-huge", _argv("certs", "--out", "{w}/c2", "--federation", "f" * 500)),
    Case("certs-federation-empty", _argv("certs", "--out", "{w}/c2", "--federation", "")),
    Case("certs-keys-only-no-name", _argv("certs", "--out", "{w}/c2", "--keys-only")),
    Case(
        "certs-host-not-in-existing-cert",
        _argv("certs", "--out", "{w}/certs", "--host", "fl.example.org"),
        "fl.example.org",
    ),
    # --- ferry server ---
    Case("server-config-missing", _argv("server", "--config", "{w}/none.toml")),
    Case("server-config-binary", _argv("server", "--config", "{w}/binary.toml")),
    Case("server-config-truncated", _argv("server", "--config", "{w}/truncated.toml")),
    Case("server-config-directory", _argv("server", "--config", "{w}/dir-as-config")),
    Case("server-config-unreadable", _argv("server", "--config", "{w}/unreadable.toml")),
    Case("server-config-empty", _argv("server", "--config", "{w}/empty.toml")),
    Case("server-section-string", _raw_server('server = "127.0.0.1:9092"\n'), "[server]"),
    Case("server-institutions-int", _raw_server('institutions = 5\n[server]\ncerts = "{w}/certs"')),
    Case("server-run-string", _raw_server('run = "fast"\n[server]\ncerts = "{w}/certs"'), "[run]"),
    Case("server-run-array", _raw_server('run = [1, 2]\n[server]\ncerts = "{w}/certs"'), "[run]"),
    Case(
        "server-address-int",
        _raw_server(
            '[server]\naddress = 9092\ncerts = "{w}/certs"\n[institutions]\n'
            'hospital-a = "{w}/certs/institutions/hospital-a.pub"\n'
        ),
        "address",
    ),
    Case(
        "server-address-port-70000",
        _raw_server(
            '[server]\naddress = "127.0.0.1:70000"\ncerts = "{w}/certs"\n[institutions]\n'
            'hospital-a = "{w}/certs/institutions/hospital-a.pub"\n'
        ),
        "address",
    ),
    Case(
        "server-state-dir-int",
        _raw_server(
            '[server]\nstate-dir = 5\ncerts = "{w}/certs"\n[institutions]\n'
            'hospital-a = "{w}/certs/institutions/hospital-a.pub"\n'
        ),
        "state-dir",
    ),
    Case(
        "server-certs-is-a-file",
        _raw_server(
            '[server]\ncerts = "{w}/a-file"\n[institutions]\n'
            'hospital-a = "{w}/certs/institutions/hospital-a.pub"\n'
            '[run]\nweights = "{w}/backbone"\n'
        ),
    ),
    Case("server-institution-name-path", _server(institutions='"../evil" = "x.pub"'), "evil"),
    Case("server-institution-key-int", _server(institutions="hospital-a = 5"), "hospital-a"),
    Case(
        "server-institution-key-garbage",
        lambda w: _server(institutions=f'hospital-a = "{w}/binary.bin"')(w),
        "hospital-a",
    ),
    Case("server-run-rounds-text", _server(run='rounds = "many"'), "rounds"),
    Case("server-run-rounds-huge", _server(run="rounds = 1000000"), "rounds"),
    Case("server-run-clip-nan", _server(run="max-grad-norm = nan"), "max-grad-norm"),
    Case("server-run-epsilon-inf", _server(run="epsilon = inf"), "epsilon"),
    Case("server-run-unknown-key", _server(run="turbo = true"), "turbo"),
    Case("server-unknown-section", _raw_server("[evil]\nx = 1\n"), "evil"),
    Case("server-ca-cert-garbage", lambda w: _server(server=f'ca-cert = "{w}/garbage.pem"')(w)),
    # --- ferry client ---
    Case("client-runtime-port-70000", _client("--runtime-port", "70000"), "--runtime-port"),
    Case("client-runtime-port-zero", _client("--runtime-port", "0"), "--runtime-port"),
    Case("client-runtime-port-negative", _client("--runtime-port", "-1"), "--runtime-port"),
    Case("client-runtime-port-text", _client("--runtime-port", "http"), "--runtime-port"),
    Case("client-budget-epsilon-inf", _client("--budget-epsilon", "inf"), "--budget-epsilon"),
    Case("client-budget-epsilon-nan", _client("--budget-epsilon", "nan"), "--budget-epsilon"),
    Case("client-budget-delta-2", _client("--budget-delta", "2"), "--budget-delta"),
    Case("client-budget-delta-nan", _client("--budget-delta", "nan"), "--budget-delta"),
    Case("client-server-no-port", _client("--server", "nohost"), "--server"),
    Case("client-server-port-huge", _client("--server", "127.0.0.1:99999"), "--server"),
    Case("client-data-missing", _client("--data", "{w}/nothing-here"), "--data"),
    Case("client-data-empty-dir", _client("--data", "{w}/empty-dir"), "--data"),
    Case("client-data-header-only-csv", _client("--data", "{w}/header-only.csv"), "--data"),
    Case("client-data-one-column-csv", _client("--data", "{w}/one-column.csv"), "--data"),
    Case("client-data-binary-csv", _client("--data", "{w}/binary.csv"), "--data", True),
    Case("client-data-binary-bin", _client("--data", "{w}/binary.bin"), "--data"),
    Case("client-institution-path", _client("--institution", "../a"), "institution"),
    Case("client-institution-empty", _client("--institution", ""), "institution"),
    Case("client-state-dir-is-file", _client("--state-dir", "{w}/a-file"), "--state-dir"),
    Case("client-test-fraction-nan", _client("--test-fraction", "nan"), "test-fraction"),
    Case("client-test-fraction-1.5", _client("--test-fraction", "1.5"), "test-fraction"),
    Case("client-classes-one", _client("--classes", "only"), "--classes"),
    Case("client-test-from-not-date", _client("--test-from", "soon"), "--test-from"),
    # --- ferry simulate ---
    Case("sim-rounds-1e6", _sim("--rounds", "1000000"), "--rounds", True),
    Case("sim-rounds-zero", _sim("--rounds", "0"), "--rounds"),
    Case("sim-rounds-float-text", _sim("--rounds", "2.5"), "--rounds"),
    Case("sim-max-grad-norm-inf", _sim("--max-grad-norm", "inf"), "--max-grad-norm"),
    Case("sim-max-grad-norm-nan", _sim("--max-grad-norm", "nan"), "--max-grad-norm"),
    Case("sim-budget-epsilon-inf", _sim("--budget-epsilon", "inf"), "--budget-epsilon"),
    Case("sim-budget-epsilon-nan", _sim("--budget-epsilon", "nan"), "--budget-epsilon"),
    Case("sim-budget-delta-nan", _sim("--budget-delta", "nan"), "--budget-delta"),
    Case("sim-gpus-nan", _sim("--gpus-per-client", "nan"), "--gpus-per-client"),
    Case("sim-gpus-inf", _sim("--gpus-per-client", "inf"), "--gpus-per-client"),
    Case("sim-cpus-inf", _sim("--cpus-per-client", "inf"), "--cpus-per-client"),
    Case("sim-cpus-nan", _sim("--cpus-per-client", "nan"), "--cpus-per-client"),
    Case("sim-examples-huge", _sim("--examples", "100000000000"), "--examples"),
    Case("sim-examples-1e11-text", _sim("--examples", "1e11"), "--examples"),
    Case("sim-clients-huge", _sim("--clients", "10000000", "--examples", "200"), "--clients"),
    Case("sim-epsilon-nan", _sim("--epsilon", "nan"), "--epsilon"),
    Case("sim-delta-nan", _sim("--delta", "nan"), "--delta"),
    Case("sim-lr-inf", _sim("--lr", "inf"), "--lr"),
    Case("sim-lr-negative", _sim("--lr", "-0.1"), "--lr"),
    Case("sim-local-epochs-huge", _sim("--local-epochs", "100000000"), "--local-epochs"),
    Case("sim-batch-size-zero", _sim("--batch-size", "0"), "--batch-size"),
    Case("sim-window-huge", _sim("--window", "1000000000000"), "--window"),
    Case("sim-fraction-nan", _sim("--fraction-train", "nan"), "--fraction-train"),
    Case("sim-lora-alpha-inf", _sim("--lora-alpha", "inf"), "--lora-alpha"),
    Case("sim-seed-negative", _sim("--seed", "-1"), "--seed"),
    Case("sim-scenario-unknown", _sim("--scenario", "casino"), "casino"),
    Case("sim-partition-unknown", _sim("--partition", "random"), "--partition"),
    Case("sim-device-unknown", _sim("--device", "tpu"), "--device"),
    Case("sim-head-unknown", _sim("--head", "transformer"), "transformer"),
    Case(
        "sim-data-header-only-csv",
        _sim(
            "--scenario", "hospital-tabular", "--data", "{w}/header-only.csv", "--weights", "random"
        ),
        "header-only.csv",
    ),
    Case(
        "sim-data-binary-csv",
        _sim("--scenario", "hospital-tabular", "--data", "{w}/binary.csv", "--weights", "random"),
        "binary.csv",
    ),
    Case("sim-data-file-for-images", _sim("--data", "{w}/a-file"), "a-file"),
    Case(
        "sim-out-is-a-file",
        _argv(
            "simulate",
            "--examples",
            "200",
            "--clients",
            "2",
            "--weights",
            "{w}/backbone",
            "--out",
            "{w}/a-file",
        ),
        "a-file",
    ),
    Case(
        "sim-out-holds-a-ledger",
        _argv(
            "simulate",
            "--examples",
            "200",
            "--clients",
            "2",
            "--weights",
            "{w}/backbone",
            "--out",
            "{w}/run",
        ),
    ),
    Case("sim-weights-is-a-file", _sim("--weights", "{w}/a-file")),
    Case("sim-config-binary", _argv("simulate", "--config", "{w}/binary.toml"), "binary.toml"),
    Case("sim-config-directory", _argv("simulate", "--config", "{w}/dir-as-config")),
    Case("sim-config-unreadable", _argv("simulate", "--config", "{w}/unreadable.toml")),
    Case("sim-config-truncated", _argv("simulate", "--config", "{w}/truncated.toml")),
    Case("sim-config-rounds-list", _config_file("rounds = [1, 2]\n"), "rounds"),
    Case("sim-config-rounds-bool", _config_file("rounds = true\n"), "rounds"),
    Case("sim-config-rounds-float", _config_file("rounds = 2.7\n"), "rounds"),
    Case("sim-config-scenario-int", _config_file("scenario = 5\n"), "scenario"),
    Case("sim-config-epsilon-text", _config_file('epsilon = "lots"\n'), "epsilon"),
    Case("sim-config-epsilon-inf", _config_file("epsilon = inf\n"), "epsilon"),
    Case("sim-config-table", _config_file("[run]\nrounds = 2\n"), "run"),
    Case("sim-config-clip-nan", _config_file("max-grad-norm = nan\n"), "max-grad-norm"),
    # --- ferry pretrain ---
    Case("pretrain-out-is-a-file", _pretrain("--out", "{w}/a-file"), "a-file"),
    Case("pretrain-out-over-a-backbone", _pretrain("--out", "{w}/backbone"), "backbone"),
    Case("pretrain-epochs-zero", _pretrain("--epochs", "0"), "--epochs"),
    Case("pretrain-epochs-huge", _pretrain("--epochs", "1000000000", "--out", "{w}/p"), "--epochs"),
    Case(
        "pretrain-examples-huge",
        _pretrain("--examples", "100000000000", "--out", "{w}/p"),
        "--examples",
    ),
    Case(
        "pretrain-examples-negative", _pretrain("--examples", "-5", "--out", "{w}/p"), "--examples"
    ),
    Case("pretrain-arch-unknown", _pretrain("--arch", "gpt9", "--out", "{w}/p"), "gpt9"),
    Case("pretrain-config-binary", _pretrain("--config", "{w}/binary.toml", "--out", "{w}/p")),
    Case(
        "pretrain-data-binary-csv",
        _pretrain("--scenario", "hospital-tabular", "--data", "{w}/binary.csv", "--out", "{w}/p"),
        "binary.csv",
    ),
    Case("pretrain-seed-negative", _pretrain("--seed", "-4", "--out", "{w}/p"), "--seed"),
    # --- ferry import-backbone ---
    Case("import-arch-unknown", _argv("import-backbone", "--arch", "gpt9", "--out", "{w}/i")),
    Case(
        "import-source-missing",
        _argv("import-backbone", "--arch", "resnet18", "--source", "{w}/none.pt", "--out", "{w}/i"),
    ),
    Case(
        "import-source-binary",
        _argv(
            "import-backbone", "--arch", "resnet18", "--source", "{w}/binary.bin", "--out", "{w}/i"
        ),
    ),
    Case(
        "import-input-size-negative",
        _argv(
            "import-backbone",
            "--arch",
            "resnet18",
            "--source",
            "random",
            "--input-size",
            "-8",
            "--out",
            "{w}/i",
        ),
    ),
    Case(
        "import-out-over-a-backbone",
        _argv(
            "import-backbone", "--arch", "ferry-cnn", "--source", "random", "--out", "{w}/backbone"
        ),
    ),
    # --- ferry tune (public-data tuning: nothing may be written to the backbone's folder) ---
    Case(
        "tune-epsilon-zero",
        _argv("tune", "--weights", "{w}/backbone", "--epsilon", "0"),
        "--epsilon",
    ),
    Case(
        "tune-epsilon-nan",
        _argv("tune", "--weights", "{w}/backbone", "--epsilon", "nan"),
        "--epsilon",
    ),
    Case(
        "tune-epsilon-text",
        _argv("tune", "--weights", "{w}/backbone", "--epsilon", "1,x"),
        "--epsilon",
    ),
    Case(
        "tune-clients-zero",
        _argv("tune", "--weights", "{w}/backbone", "--clients", "0"),
        "--clients",
    ),
    Case("tune-weights-missing", _argv("tune", "--weights", "{w}/none")),
    # --- training settings that cannot meet the budget ---
    Case("sim-batch-larger-than-an-institution", _sim("--batch-size", "5000"), "--batch-size"),
    Case("sim-epsilon-beyond-the-accountant", _sim("--epsilon", "1e-7"), "--epsilon"),
    Case("sim-base-rates-nan", _sim("--base-rates", "nan,1"), "--base-rates"),
    # --- ferry audit ---
    Case("audit-missing", _argv("audit", "{w}/nothing-here", "--no-plot")),
    Case("audit-binary-ledger", _argv("audit", "{w}/binary.bin", "--no-plot")),
    Case("audit-empty-dir", _argv("audit", "{w}/empty-dir", "--no-plot")),
    Case("audit-keys-missing", _argv("audit", "{w}/run", "--no-plot", "--keys", "{w}/none")),
    Case(
        "audit-receipts-missing", _argv("audit", "{w}/run", "--no-plot", "--receipts", "{w}/none")
    ),
    # --- ferry export / predict ---
    Case("export-not-a-run", _argv("export", "{w}/empty-dir", "--out", "{w}/m"), "finished run"),
    Case("export-missing", _argv("export", "{w}/nothing-here", "--out", "{w}/m"), "finished run"),
    Case("report-not-a-run", _argv("report", "{w}/empty-dir"), "holds no summary.json"),
    Case("report-missing", _argv("report", "{w}/nothing-here"), "holds no summary.json"),
    Case("report-a-file", _argv("report", "{w}/binary.bin"), "holds no summary.json"),
    Case(
        "predict-not-a-model",
        _argv("predict", "{w}/empty-dir", "--data", "{w}/empty-dir", "--out", "{w}/p.csv"),
        "not a Ferry model",
    ),
    Case(
        "predict-binary-model",
        _argv("predict", "{w}/binary.bin", "--data", "{w}/empty-dir", "--out", "{w}/p.csv"),
        "not a Ferry model",
    ),
    # --- ferry bench ---
    Case("bench-out-is-a-file", _argv("bench", "--quick", "--out", "{w}/a-file"), "a-file"),
]


def _snapshot(w: Path) -> dict[str, tuple[int, str]]:
    """Mode and sha256 of every regular file present before the case ran."""
    out = {}
    for path in sorted(w.rglob("*")):
        if path.is_file() and os.access(path, os.R_OK):
            out[str(path.relative_to(w))] = (
                path.stat().st_mode,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
    return out


@pytest.fixture
def nothing_starts(monkeypatch):
    """A hostile input must be refused before Flower, Ray or training starts."""
    import flwr.simulation

    def refuse(*args, **kwargs):
        raise AssertionError("work started; the input should have been refused")

    monkeypatch.setattr(child_processes.ChildProcess, "start", refuse)
    monkeypatch.setattr(flwr.simulation, "run_simulation", refuse)


class _Timeout(Exception):
    pass


def _in_process(argv: list[str], capsys) -> tuple[int, str, float]:
    def alarm(signum, frame):
        raise _Timeout(f"still running after {IN_PROCESS_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(IN_PROCESS_LIMIT_S)
    start = time.monotonic()
    try:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse exits; the installed `ferry` exits the same way
            code = exc.code if isinstance(exc.code, int) else 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    _, err = capsys.readouterr()
    return code, err, time.monotonic() - start


def _as_process(argv: list[str], w: Path) -> tuple[int, str, float]:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_HOME=str(w / "flwr-home"))
    command = [sys.executable, "-m", "ferry.cli", *argv]
    start = time.monotonic()
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=SUBPROCESS_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own child's group, with what it started
        proc.communicate()
        child_processes.stop_tagged(str(w))  # any Flower process it left behind
        pytest.fail(f"{argv} still running after {SUBPROCESS_LIMIT_S} s: it hangs")
    return proc.returncode, err.decode(errors="replace"), time.monotonic() - start


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_one_line_error_and_touches_nothing(case, world, capsys, nothing_starts):
    argv = case.argv(world)
    before = _snapshot(world)
    if case.subprocess:
        code, err, seconds = _as_process(argv, world)
    else:
        code, err, seconds = _in_process(argv, capsys)
    lines = [line for line in err.splitlines() if not line.startswith("ferry: note:")]
    assert code == 2, f"exit code {code}; stderr: {err[-2000:]!r}"
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("ferry: error: ") and len(lines[0]) > 20, lines
    if case.expect:
        assert case.expect in lines[0], lines[0]
    after = _snapshot(world)
    changed = [p for p, v in before.items() if after.get(p) != v]
    assert not changed, f"files changed or removed by a refused command: {changed}"
    assert seconds < (SUBPROCESS_LIMIT_S if case.subprocess else IN_PROCESS_LIMIT_S)


def test_the_table_is_large_and_covers_every_subcommand(tmp_path):
    from ferry.cli import build_parser

    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001
    covered = {argv[0] for c in CASES if (argv := c.argv(tmp_path))}
    assert commands <= covered, f"subcommands without a hostile case: {commands - covered}"
    assert len(CASES) >= 54


def test_the_valid_baselines_are_accepted(world, capsys, nothing_starts):
    """The cases change one thing in a valid command: the unchanged one must pass the checks."""
    from ferry.cli import build_parser
    from ferry.commands.deployment import cmd_client
    from ferry.server.server_settings import load_server_config

    argv = _server()(world)
    load_server_config(argv[2])
    args = build_parser().parse_args(_client()(world))
    with pytest.raises(AssertionError, match="work started"):
        cmd_client(args)  # every check passed; it got as far as starting the SuperNode
