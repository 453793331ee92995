"""Attack: the operator runs its own code at an institution through a Flower app bundle.

Real processes on 127.0.0.1: a ``flower-superlink --insecure`` (the server machine) and one
institution's ``ferry client --insecure`` (TLS is not what this test is about). The
OPERATOR, with the SuperLink's Control API on its own machine, submits with ``flwr run``:

(a) a bundle with an extra module and ``clientapp = "evil:app"``, whose import writes a
    marker file and whose handler reads the institution's data path and sends it back;
(b) Ferry's component names, but the bundle ships ``ferry/client/app.py`` (and
    ``ferry/server/app.py``) shadowing the installed ones, with the same payload;
(c) a code-free bundle naming another installed ClientApp
    (``ferry.simulations.bench.noop_client:app``, which answers without DP or budget).

Each attack's ServerApp (the operator's: shipped in (a)/(b), on the SuperLink's
``PYTHONPATH`` for (c)) sends one message to every node and writes the replies it gets.
The institution refuses all three: the marker never appears, no reply carries content, each
reply is an ``INVALID_FAB`` error that says why, and the institution's ``supernode.log`` says
it too. Then Ferry's own code-free bundle (``server.superlink.write_app``) still trains one
round with the installed ClientApp.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ferry.common.data.synthetic import write_image_folder
from ferry.common.deploy.child_processes import ChildProcess, flower_bin, tagged_pids
from ferry.common.serialization import save_artifact
from ferry.server.pretrain import random_artifact
from ferry.server.server_settings import load_server_config
from ferry.server.superlink import write_app

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
INVALID_FAB = 7  # flwr.common.constant.ErrorCode.INVALID_FAB

# The operator's ServerApp: one message to every node, every reply written to a file.
SENDER = """
import json, time
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes, deadline = [], time.time() + 60
    while not nodes and time.time() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.2)
    probe = RecordDict({"probe": ConfigRecord({"x": 1})})
    msgs = [Message(probe, dst_node_id=n, message_type="query.backbone_offer") for n in nodes]
    replies = []
    for reply in grid.send_and_receive(msgs, timeout=60):
        if reply.has_error():
            replies.append({"error": reply.error.code, "reason": reply.error.reason})
        else:
            content = {k: dict(v) for k, v in reply.content.config_records.items()}
            replies.append({"content": content})
    with open(context.run_config["reply-file"], "w") as f:
        json.dump({"nodes": len(nodes), "replies": replies}, f)
"""

# The payload: its import leaves a marker; its handler reads the institution's data path.
EVIL = """
import pathlib
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

MARKER = pathlib.Path({marker!r})
MARKER.write_text("imported at the institution\\n")
app = ClientApp()

@app.query("backbone_offer")
def stolen(msg: Message, context: Context) -> Message:
    data = str(context.node_config.get("data-path"))
    MARKER.write_text("data path: " + data + "\\n")
    return Message(RecordDict({{"loot": ConfigRecord({{"data-path": data}})}}), reply_to=msg)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def operator_app(folder: Path, components: dict[str, str], files: dict[str, str]) -> Path:
    """An app folder as the operator writes it: pyproject + whatever code it wants to ship."""
    folder.mkdir(parents=True)
    names = "\n".join(f'{k} = "{v}"' for k, v in components.items())
    (folder / "pyproject.toml").write_text(
        f"""[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "{folder.name}"
version = "1.0.0"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "operator"

[tool.flwr.app.components]
{names}

[tool.flwr.app.config]
reply-file = "{folder.parent / (folder.name + "-replies.json")}"
"""
    )
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def flwr_run(app: Path, home: Path, env: dict) -> int:
    res = subprocess.run(
        [flower_bin("flwr"), "run", str(app), "local", "--format", "json"],
        capture_output=True,
        text=True,
        env=env | {"FLWR_HOME": str(home)},
        timeout=60,
    )
    out = json.loads(res.stdout[res.stdout.index("{") :])
    assert out.get("success"), res.stdout + res.stderr
    return int(out["run-id"])


@pytest.fixture(scope="module")
def attacked(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("code-bundle")
    write_image_folder(root / "data", "target", 60, seed=7)
    save_artifact(random_artifact("ferry-cnn", seed=0), root / "backbone")
    operator_lib = root / "operator-lib"  # the operator's own machine: code it may run there
    operator_lib.mkdir()
    (operator_lib / "operator_sender.py").write_text(SENDER)
    env = dict(os.environ)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        OMP_NUM_THREADS="1",
        FERRY_HOME=str(root / "ferry-home"),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        PYTHONPATH=str(REPO),
    )
    port = free_port()
    home = root / "operator-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    superlink = ChildProcess(
        "superlink",
        [
            flower_bin("flower-superlink"),
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
        ],
        root / "superlink.log",
        env | {"FLWR_HOME": str(root / "server-home"), "PYTHONPATH": f"{operator_lib}:{REPO}"},
    )
    state = root / "hospital-a"
    client = ChildProcess(
        "hospital-a",
        [
            *(sys.executable, "-m", "ferry.cli", "client", "--insecure"),
            *("--server", f"127.0.0.1:{port}", "--data", str(root / "data")),
            *("--state-dir", str(state), "--institution", "hospital-a"),
            *("--budget-epsilon", "50", "--budget-delta", "1e-4"),
            *("--runtime-port", str(free_port())),
        ],
        root / "ferry-client.log",
        env,
    )
    result: dict = {"root": root}
    try:
        superlink.start()
        wait_for(lambda: _listening(port), 30, "the SuperLink")
        client.start()
        t0 = time.monotonic()
        attacks = {
            "a-extra-module": operator_app(
                root / "a-extra-module",
                {"serverapp": "sender:app", "clientapp": "evil:app"},
                {"sender.py": SENDER, "evil.py": EVIL.format(marker=f"{root}/MARKER-a")},
            ),
            "b-shadow-client-app": operator_app(
                root / "b-shadow-client-app",
                {"serverapp": "ferry.server.app:app", "clientapp": "ferry.client.app:app"},
                {
                    "ferry/__init__.py": "",
                    "ferry/server/__init__.py": "",
                    "ferry/server/app.py": SENDER,
                    "ferry/client/__init__.py": "",
                    "ferry/client/app.py": EVIL.format(marker=f"{root}/MARKER-b"),
                },
            ),
            "c-other-installed-app": operator_app(
                root / "c-other-installed-app",
                {"serverapp": "operator_sender:app", "clientapp": _NOOP},
                {},
            ),
        }
        # Ferry's own code-free bundle, as `ferry server` writes it, submitted alongside.
        out = root / "honest-out"
        honest = write_app(root / "honest-app", honest_run_config(root, out))
        operator_env = env | {"PYTHONPATH": f"{operator_lib}:{REPO}"}  # flwr run checks names
        for name, app in attacks.items():
            result[name] = {"run": flwr_run(app, home, operator_env)}
        flwr_run(honest, home, env)
        for name, app in attacks.items():
            replies = app.parent / f"{name}-replies.json"
            wait_for(replies.exists, 90, f"the replies to {name}")
            result[name]["replies"] = json.loads(replies.read_text())
        result["attack_seconds"] = time.monotonic() - t0
        result["markers_after_attacks"] = sorted(p.name for p in root.glob("MARKER-*"))
        result["trained"] = wait_for(lambda: _trained(out), 120, "the honest run's training")
        result["honest_seconds"] = time.monotonic() - t0
        result["client_alive"] = client.poll() is None
    finally:
        result["client_log"] = _read(state / "supernode.log")
        result["client_terminal"] = _read(root / "ferry-client.log")
        client.stop()
        superlink.stop()
        result["left"] = tagged_pids(client.tag) + tagged_pids(superlink.tag)
    return result


_NOOP = "ferry.simulations.bench.noop_client:app"


def honest_run_config(root: Path, out: Path) -> dict:
    """A one-round run config as ``ferry server`` derives it from its ``[run]`` section."""
    (root / "server.toml").write_text(
        f"""[server]
address = "127.0.0.1:{free_port()}"  # only [run] is used: the bundle goes to our SuperLink
state-dir = "{root / "server-state"}"

[run]
rounds = 1
min-clients = 1
num-classes = 4
round-timeout = 60
connect-timeout = 60
weights = "{root / "backbone"}"
noise-multiplier = 1.5
epsilon = 30.0
delta = 1e-5
out = "{out}"
"""
    )
    return dict(load_server_config(root / "server.toml", insecure=True).run, institutions="{}")


def _trained(out: Path) -> list[dict]:
    """The ledger's ``client_trained`` records so far (complete lines only)."""
    path = out / "ledger.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [r for r in map(json.loads, lines) if r.get("event") == "client_trained"]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.parametrize(
    "attack, why",
    [
        ("a-extra-module", "refused a bundle that carries code: evil.py, sender.py"),
        (
            "b-shadow-client-app",
            "refused a bundle that carries code: ferry/__init__.py, ferry/client/__init__.py, "
            "ferry/client/app.py, ferry/server/__init__.py, ferry/server/app.py",
        ),
        ("c-other-installed-app", f"'clientapp': '{_NOOP}'"),
    ],
)
def test_institution_refuses_a_bundle_that_carries_or_names_other_code(attacked, attack, why):
    replies = attacked[attack]["replies"]
    assert replies["nodes"] == 1 and len(replies["replies"]) == 1
    (reply,) = replies["replies"]
    assert "content" not in reply, f"the bundle's ClientApp ran and answered: {reply}"
    marker = attacked["root"] / f"MARKER-{attack[0]}"
    assert not marker.exists(), marker.read_text()
    assert reply["error"] == INVALID_FAB and why in reply["reason"], reply
    logged = [line for line in attacked["client_log"].splitlines() if why in line]
    assert logged and logged[0].startswith("ferry: refused a bundle"), attacked["client_log"]
    assert logged[0] in attacked["client_terminal"].splitlines()  # ferry client's stderr


def test_code_free_ferry_bundle_still_trains_with_the_installed_client_app(attacked):
    assert attacked["markers_after_attacks"] == []
    assert not list(attacked["root"].glob("MARKER-*"))
    trained = attacked["trained"]
    assert trained and trained[0]["institution"] == "hospital-a", trained
    assert attacked["client_alive"] and not attacked["left"]
    print(
        f"\nthree refused attacks answered in {attacked['attack_seconds']:.1f} s; "
        f"honest round trained after {attacked['honest_seconds']:.1f} s"
    )
