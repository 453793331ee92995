"""The outsider's means against a live ``ferry server`` (used by ``tests/test_deploy.py``).

The outsider holds what every institution is given (the federation's public ``ca.pem``), a key
pair of its own, a key pair of its own made under an honest institution's name, and a copy of
an honest institution's *public* key. While a real Ferry run is live it points Flower's own
tools at the public address:

* ``flwr ls``, ``flwr supernode register`` of its key and of the copied one, ``flwr run`` of
  an app that carries code, ``flwr stop`` of the live run (Flower's Control API, which
  authenticates nobody);
* a ``flower-supernode`` with its own key, and a ``ferry client`` with its own key named after
  an honest institution (the Fleet API, where node authentication decides);
* raw HTTPS requests (with ``ca.pem``) to the Control and runtime APIs, ``/docs``,
  ``/openapi.json``, path tricks (``..``, ``%2e%2e``, double slashes) and other methods on
  Fleet routes.
"""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import subprocess
from pathlib import Path

from ferry.common.deploy.child_processes import flower_bin
from ferry.server.certs import make_auth_key_pair

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


def https_status(port: int, ca: Path, method: str, path: str, media: str = "application/json"):
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


def flwr(home: Path, env: dict, *args: str) -> tuple[dict | None, str]:
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


def succeeded(parsed: dict | None) -> bool:
    return bool(parsed) and parsed.get("success") is True


def live_run(operator_home: Path, env: dict) -> str | None:
    """The id of the running Ferry run, as the operator (on loopback) sees it; None if none."""
    parsed, _ = flwr(operator_home, env, "list", "ferry")
    runs = parsed.get("runs", []) if succeeded(parsed) else []
    live = [r for r in runs if str(r.get("status", "")).startswith("running")]
    return str(live[0]["run-id"]) if live else None


def equip(folder: Path, certs: Path, honest: str) -> Path:
    """What the outsider holds, in ``folder``: ca.pem, a copy of ``honest``'s public key, key
    pairs of its own (``own/outsider.*`` and ``named/<honest>.*``), an app that carries code."""
    folder.mkdir(parents=True)
    shutil.copy(certs / "ca.pem", folder / "ca.pem")
    shutil.copy(certs / "institutions" / f"{honest}.pub", folder / f"copied-{honest}.pub")
    make_auth_key_pair(folder / "own", "outsider")
    make_auth_key_pair(folder / "named", honest)
    app = folder / "app"
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
    home = folder / "flwr-home"
    home.mkdir()
    return folder


def flower_home_for(folder: Path, port: int) -> Path:
    """The outsider's ``flwr`` configuration: the public address, verified with ca.pem."""
    home = folder / "flwr-home"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "target"\n\n[superlink.target]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{folder / "ca.pem"}"\n'
    )
    return home


def own_supernode_argv(folder: Path, port: int, local_port: int) -> list[str]:
    return [
        flower_bin("flower-supernode"),
        *("--superlink", f"127.0.0.1:{port}"),
        *("--root-certificates", str(folder / "ca.pem")),
        *("--auth-supernode-private-key", str(folder / "own" / "outsider.key")),
        *("--port", str(local_port), "--max-retries", "2"),
    ]


def control_attempts(
    folder: Path, port: int, env: dict, run_id: str, honest: str, operator_home: Path
) -> dict:
    """Raw HTTPS first, then the Control API with Flower's own CLI; stopping the run last.
    Also records whether the run was still live before the stop, and the operator's view of
    the runs after it."""
    home = flower_home_for(folder, port)
    ca = folder / "ca.pem"
    result = {"raw": {(m, p): https_status(port, ca, m, p) for m, p in RAW_REQUESTS}}
    result["unsigned_fleet"] = https_status(
        port, ca, "POST", "/v1/fleet/get-run", "application/protobuf"
    )
    result["ls"] = flwr(home, env, "list", "target")
    own_pub, copied = folder / "own" / "outsider.pub", folder / f"copied-{honest}.pub"
    result["register"] = flwr(home, env, "supernode", "register", str(own_pub), "target")
    result["register_copy"] = flwr(home, env, "supernode", "register", str(copied), "target")
    result["run"] = flwr(home, env, "run", str(folder / "app"), "target")
    result["still_live"] = live_run(operator_home, env) == run_id
    result["stop"] = flwr(home, env, "stop", run_id, "target")
    operator_view = flwr(operator_home, env, "list", "ferry")[0] or {}
    result["operator_runs"] = [str(r["run-id"]) for r in operator_view.get("runs", [])]
    return result


def refused(attempt: tuple[dict | None, str], run_id: str) -> None:
    """The attempt failed and its output does not name the live run."""
    parsed, text = attempt
    assert not succeeded(parsed), text[-2000:]
    assert f'"run-id": {run_id}' not in text and f'"run-id": "{run_id}"' not in text
