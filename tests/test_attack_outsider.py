"""An outsider on the network against a live ``ferry server``: it cannot enter.

The outsider holds what every institution is given (the federation's public ``ca.pem``), a key
pair of its own and a copy of an honest institution's *public* key. While a real Ferry run is
live (``ferry server`` with TLS and SuperNode authentication, two honest ``ferry client``
institutions, all on 127.0.0.1), it points Flower's own tools at the public address:

* ``flwr ls``, ``flwr supernode register`` of its key, ``flwr run`` of an app that carries
  code, ``flwr stop`` of the live run (Flower's Control API, which authenticates nobody);
* a ``flower-supernode`` with its own key, and a ``ferry client`` with a key of its own named
  after an honest institution (the Fleet API, where node authentication decides);
* raw HTTPS requests (with ``ca.pem``) to the Control and runtime APIs, ``/docs``,
  ``/openapi.json``, path tricks (``..``, ``%2e%2e``, double slashes) and other methods on
  Fleet routes.

Every attempt fails, the Ferry run finishes its round with exactly the honest institutions,
and the operator's own (loopback) view shows one run and the registered nodes only. The run
needs both honest institutions (``min-clients = 2``) and the second joins only after the
outsider's last attempt, so every attempt is made while the run is live, however slow the
machine.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferry.common.data.synthetic import class_names, make_images
from ferry.common.deploy.child_processes import flower_bin
from ferry.common.serialization import save_artifact
from ferry.server.certs import make_auth_key_pair, make_certs
from ferry.server.ledger import read_ledger
from ferry.server.pretrain import random_artifact
from tests.test_deploy import Processes, free_port, wait_for

pytestmark = pytest.mark.slow

HONEST = ("hospital-a", "hospital-b")
FERRY = [sys.executable, "-m", "ferry.cli"]
ROUNDS = 1

# (method, raw path) sent as-is by the outsider; each must be answered 404 (nothing behind it).
RAW_REQUESTS = [
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/redoc"),
    ("GET", "/"),
    ("POST", "/v1/control/list-runs"),
    ("POST", "/v1/control/start-run"),
    ("POST", "/v1/control/stop-run"),
    ("POST", "/v1/control/register-node"),
    ("POST", "/v1/control/list-nodes"),
    ("POST", "/v1/runtime/pull-task-input"),
    ("POST", "/v1/runtime/create-task"),
    ("POST", "/v1/fleet/../control/list-runs"),
    ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
    ("POST", "/v1/fleet/%2E%2E/control/list-runs"),
    ("POST", "/v1/fleet/pull-messages/../../control/list-runs"),
    ("POST", "/v1/fleet/..%2fcontrol/list-runs"),
    ("POST", "//v1/control/list-runs"),
    ("POST", "/v1/fleet//../control/list-runs"),
    ("POST", "/V1/CONTROL/LIST-RUNS"),
    ("POST", "/v1/control/list-runs?/v1/fleet/pull-messages"),
    ("GET", "/v1/fleet/pull-messages"),
    ("GET", "/v1/fleet/get-fab"),
    ("PUT", "/v1/fleet/register-node"),
    ("DELETE", "/v1/fleet/unregister-node"),
    ("OPTIONS", "/v1/fleet/push-messages"),
]


def _https(port: int, ca: Path, method: str, path: str, media: str = "application/json"):
    """Status of one raw request (path sent byte for byte), TLS verified against ``ca``;
    the error as text if there was no answer."""
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=20)
    try:
        body = (b"{}" if media.endswith("json") else b"") if method in ("POST", "PUT") else None
        headers = {"Content-Type": media} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return f"no answer ({exc!r})"
    finally:
        conn.close()


def _flwr(home: Path, env: dict, *args: str) -> tuple[dict | None, str]:
    """Run ``flwr ARGS --format json`` with FLWR_HOME=home; (parsed JSON or None, all output).

    ``flwr`` exits 0 even when the JSON says ``"success": false``, so callers read the JSON.
    """
    res = subprocess.run(
        [flower_bin("flwr"), *args, "--format", "json"],
        capture_output=True,
        text=True,
        env=env | {"FLWR_HOME": str(home), "COLUMNS": "200"},
        timeout=120,
    )
    text = res.stdout + res.stderr
    try:
        return json.loads(res.stdout[res.stdout.index("{") :]), text
    except ValueError:
        return None, text


def _succeeded(parsed: dict | None) -> bool:
    return bool(parsed) and parsed.get("success") is True


def _flower_home(home: Path, address: str, ca: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "target"\n\n[superlink.target]\naddress = "{address}"\n'
        f'root-certificates = "{ca}"\n'
    )
    return home


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("outsider")
    certs = root / "certs"
    make_certs(certs, institutions=list(HONEST))
    outsider = root / "outsider"  # what the outsider holds: ca.pem, its keys, a public key
    outsider.mkdir()
    shutil.copy(certs / "ca.pem", outsider / "ca.pem")
    shutil.copy(certs / "institutions" / "hospital-a.pub", outsider / "copied-hospital-a.pub")
    make_auth_key_pair(outsider / "own", "outsider")
    make_auth_key_pair(outsider / "named", "hospital-a")  # its own key, an honest name
    app = outsider / "app"
    app.mkdir()
    (app / "evil.py").write_text(  # a valid Flower app: `flwr run` imports it to check it
        "from flwr.clientapp import ClientApp\nfrom flwr.serverapp import ServerApp\n\n"
        "app = ClientApp()  # at an institution it would hold the data path\n"
        "server = ServerApp()\n"
    )
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "evil"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "outsider"\n\n'
        '[tool.flwr.app.components]\nserverapp = "evil:server"\nclientapp = "evil:app"\n\n'
        "[tool.flwr.app.config]\n"
    )
    names = class_names("target")
    for i, inst in enumerate(HONEST):
        images, labels = make_images("target", 48, seed=300 + i)
        for j, (img, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / "data" / inst / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((img[0] * 255).astype(np.uint8)).save(folder / f"{j:03d}.png")
    save_artifact(random_artifact("ferry-cnn", seed=0), root / "backbone")
    env = dict(os.environ)
    env.update(
        FERRY_HOME=str(root / "ferry-home"),
        OMP_NUM_THREADS="1",
        FLWR_TELEMETRY_ENABLED="0",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    return {"root": root, "certs": certs, "outsider": outsider, "env": env}


def _server_config(world: dict, port: int) -> Path:
    root, certs = world["root"], world["certs"]
    keys = "\n".join(f'{i} = "{certs}/institutions/{i}.pub"' for i in HONEST)
    path = root / "server.toml"
    path.write_text(
        f"""[server]
address = "127.0.0.1:{port}"
certs = "{certs}"
state-dir = "{root / "state"}"

[institutions]
{keys}

[run]
rounds = {ROUNDS}
min-clients = 2
num-classes = 4
round-timeout = 60
connect-timeout = 300
weights = "{root / "backbone"}"
noise-multiplier = 1.5
epsilon = 30.0
delta = 1e-5
out = "{root / "out"}"
"""
    )
    return path


def _client(world: dict, inst: str, port: int, key: Path, state: str) -> list[str]:
    root = world["root"]
    return [
        *FERRY,
        "client",
        *("--server", f"127.0.0.1:{port}"),
        *("--root-cert", str(world["certs"] / "ca.pem")),
        *("--key", str(key)),
        *("--data", str(root / "data" / inst)),
        *("--state-dir", str(root / state / inst)),
        *("--budget-epsilon", "50", "--budget-delta", "1e-4"),
        *("--institution", inst),
        *("--runtime-port", str(free_port())),
    ]


@pytest.fixture(scope="module")
def attack(world) -> dict:
    """One live federation, one outsider trying everything while it runs."""
    root, outsider, env = world["root"], world["outsider"], world["env"]
    procs = Processes(root, env)
    port, result = free_port(), {"raw": {}}
    operator = root / "state" / "flwr-home"  # ferry server's own (loopback) connection
    home = _flower_home(outsider / "flwr-home", f"127.0.0.1:{port}", outsider / "ca.pem")
    try:
        t0 = time.monotonic()
        server = procs.start(
            "server", [*FERRY, "server", "--config", str(_server_config(world, port))]
        )
        wait_for(
            lambda: server.poll() is not None or f"{HONEST[-1]}: " in server.log_tail(200),
            120,
            "the server to register the institutions",
        )
        assert server.poll() is None, server.log_tail(40)
        certs = world["certs"] / "institutions"
        first, second = HONEST
        procs.start(first, _client(world, first, port, certs / f"{first}.key", "clients"))

        def live_run() -> str | None:
            parsed, _ = _flwr(operator, env, "list", "ferry")
            runs = parsed.get("runs", []) if _succeeded(parsed) else []
            live = [r for r in runs if str(r.get("status", "")).startswith("running")]
            return str(live[0]["run-id"]) if live else None

        run_id = wait_for(live_run, 120, "the Ferry run to be running", poll=0.5)
        result["run_id"] = run_id
        # The outsider's SuperNodes: its own key, and its own key under an honest name.
        own = procs.start(
            "outsider-supernode",
            [
                flower_bin("flower-supernode"),
                *("--superlink", f"127.0.0.1:{port}"),
                *("--root-certificates", str(outsider / "ca.pem")),
                *("--auth-supernode-private-key", str(outsider / "own" / "outsider.key")),
                *("--port", str(free_port()), "--max-retries", "2"),
            ],
        )
        named = procs.start(
            "outsider-named",
            _client(world, "hospital-a", port, outsider / "named" / "hospital-a.key", "rogue"),
        )
        # Raw HTTPS first, then the Control API with Flower's own CLI; stopping the run last.
        for method, path in RAW_REQUESTS:
            result["raw"][(method, path)] = _https(port, outsider / "ca.pem", method, path)
        result["unsigned_fleet"] = _https(
            port, outsider / "ca.pem", "POST", "/v1/fleet/get-run", "application/protobuf"
        )
        result["ls"] = _flwr(home, env, "list", "target")
        result["register"] = _flwr(
            home, env, "supernode", "register", str(outsider / "own" / "outsider.pub"), "target"
        )
        result["register_copy"] = _flwr(
            home, env, "supernode", "register", str(outsider / "copied-hospital-a.pub"), "target"
        )
        result["run"] = _flwr(home, env, "run", str(outsider / "app"), "target")
        result["still_live"] = live_run() == run_id  # the attempts happen during the run
        result["stop"] = _flwr(home, env, "stop", run_id, "target")
        operator_view = _flwr(operator, env, "list", "ferry")[0] or {}
        result["operator_runs"] = [str(r["run-id"]) for r in operator_view.get("runs", [])]
        result["attacked"] = time.monotonic() - t0
        procs.start(second, _client(world, second, port, certs / f"{second}.key", "clients"))
        for name, child in (("own_supernode", own), ("named_client", named)):
            result[name] = {"code": procs.wait(child, 120), "log": child.log_path.read_text()}
        result["outsiders_done"] = time.monotonic() - t0
        result["server_code"] = procs.wait(server, 400)
        result["seconds"] = time.monotonic() - t0
        result["server_log"] = server.log_path.read_text()
        result["institutions"] = json.loads((root / "state" / "institutions.json").read_text())
    finally:
        result["leftovers"] = procs.stop_all()
    result["out"] = root / "out"
    result["state"] = root / "state"
    return result


def _refused(attempt: tuple[dict | None, str], run_id: str) -> None:
    parsed, text = attempt
    assert not _succeeded(parsed), text[-2000:]
    assert f'"run-id": {run_id}' not in text and f'"run-id": "{run_id}"' not in text


def test_outsider_cannot_list_runs(attack):
    _refused(attack["ls"], attack["run_id"])
    assert "runs" not in (attack["ls"][0] or {})


def test_outsider_cannot_register_a_key_of_its_own_or_a_copied_one(attack):
    _refused(attack["register"], attack["run_id"])
    _refused(attack["register_copy"], attack["run_id"])
    assert set(attack["institutions"]) == set(HONEST)


def test_outsider_cannot_submit_a_run(attack):
    _refused(attack["run"], attack["run_id"])
    assert attack["operator_runs"] == [attack["run_id"]]  # the SuperLink holds the Ferry run only
    fab_store = attack["state"] / "flwr-home"
    assert not any("evil" in p.name for p in fab_store.rglob("*")), "the outsider's app arrived"


def test_outsider_cannot_stop_the_live_run(attack):
    assert attack["still_live"], "the attempts must be made while the run is live"
    _refused(attack["stop"], attack["run_id"])


def test_control_runtime_docs_and_path_tricks_answer_404(attack):
    assert {k: v for k, v in attack["raw"].items() if v != 404} == {}


def test_fleet_route_without_a_node_signature_is_refused_by_the_superlink(attack):
    assert attack["unsigned_fleet"] == 401  # forwarded; Flower's node authentication says no


def test_outsider_supernodes_cannot_join(attack):
    own, named = attack["own_supernode"], attack["named_client"]
    assert own["code"] != 0 and "SuperNode ID" not in own["log"], own["log"][-2000:]
    assert named["code"] == 2, named["log"][-2000:]
    assert "not registered with the federation" in named["log"]
    superlink_log = (attack["state"] / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log


def test_the_ferry_run_finishes_with_the_honest_institutions_only(attack):
    assert attack["server_code"] == 0, attack["server_log"][-3000:]
    summary = json.loads((attack["out"] / "summary.json").read_text())
    assert summary["rounds_completed"] == ROUNDS
    assert set(summary["clients"]) == set(HONEST)
    records = read_ledger(attack["out"] / "ledger.jsonl").records
    aggregated = [r for r in records if r["event"] == "round_aggregated"]
    assert [sorted(r["participants"]) for r in aggregated] == [sorted(HONEST)] * ROUNDS
    nodes = {r["node_id"] for r in records if "node_id" in r}
    assert nodes <= {str(node) for node in attack["institutions"].values()}
    names = {r["institution"] for r in records if "institution" in r}
    assert names <= set(HONEST)
    assert attack["leftovers"] == []
    print(
        f"outsider attack run: {attack['seconds']:.0f}s (attempts done at "
        f"{attack['attacked']:.0f}s, outsider SuperNodes gone at {attack['outsiders_done']:.0f}s)"
    )
