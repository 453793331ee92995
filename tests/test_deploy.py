"""Deployment with real processes: ``ferry server`` (a real ``flower-superlink``) and three
``ferry client`` institutions (real ``flower-supernode``\\ s) on 127.0.0.1, TLS and SuperNode
authentication on, each institution with its own image folder, key and state directory.

Two federations, one per module fixture, each of the fewest rounds its promise needs (the
round loop's behaviours, drops, rejections and resume included, are pinned in-process in
``tests/test_deploy_federation.py``; here each is shown once with real processes):

* ``dropout_run``: 2 rounds; before the institutions join, a SuperNode with an unregistered
  key, one without the CA certificate and a ``ferry client`` holding another federation's CA
  are all turned away, and an outsider on the network (:mod:`outsider`: the public CA
  certificate, keys of its own, a copied public key) tries Flower's Control API, the Fleet
  API and raw HTTPS against the live run, and fails at every step; in round 2 one
  institution is killed (SIGKILL, its whole process tree) while it trains, and the run
  completes with the other two.
* ``resumed_run``: 2 rounds with a large backbone (a random-init ResNet-50 for 64 px images,
  94 MB of weights: Flower chunks the arrays itself, so the whole backbone travels in one
  Ferry message); round 1 ships it to every institution once, by hash; the whole server side
  is killed (SIGKILL) right after round 1's checkpoint, ``ferry server --resume`` finishes
  round 2 without shipping it again, and the ledger verifies and agrees with every
  institution's own privacy accounting.

Every process is started with a tag in its environment that all its descendants inherit;
the fixtures stop them all (also when a test fails) and check with ``ps`` and ``/proc`` that
nothing is left.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import installed_backbone
import pytest

from ferry.client.privacy_state import PrivacyState
from ferry.common.data.synthetic import write_image_folder
from ferry.common.deploy.child_processes import (
    TAG_VAR,
    ChildProcess,
    flower_bin,
    signal_tagged,
    stop_tagged,
    tagged_pids,
)
from ferry.common.privacy.accounting import MechanismSegment, epsilon_for_history
from ferry.common.serialization import load_artifact, save_artifact
from ferry.server.backbone_import import import_backbone
from ferry.server.certs import make_certs
from ferry.server.ledger import read_ledger
from ferry.server.pretrain import random_artifact

import outsider

pytestmark = pytest.mark.slow

INSTITUTIONS = ("hospital-a", "hospital-b", "hospital-c")
ROUNDS = 2
ROUND_TIMEOUT = 45.0  # > the slowest healthy exchange here (~25 s: 3 clients on 2 cores)
DELTA = 1e-5
FERRY = [sys.executable, "-m", "ferry.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Processes:
    """Every process a fixture starts carries ``self.tag``; :meth:`stop_all` ends them all."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.tag = f"ferry-test-{uuid.uuid4().hex[:12]}"
        self.env = env | {TAG_VAR: self.tag}
        self.children: list[ChildProcess] = []

    def start(self, name: str, argv: list[str]) -> ChildProcess:
        child = ChildProcess(name, argv, self.root / "logs" / f"{name}.log", self.env)
        self.children.append(child.start())
        return child

    def wait(self, child: ChildProcess, timeout: float) -> int:
        try:
            return child.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{child.name} still running after {timeout:.0f}s") from None

    def kill_tree(self, child: ChildProcess) -> None:
        """SIGKILL ``child`` and every descendant at once (the machine dies)."""
        signal_tagged(child.tag, signal.SIGKILL)
        wait_for(lambda: not tagged_pids(child.tag), 10, f"{child.name} to die")
        child.proc.wait(timeout=10)

    def leftovers(self) -> list[str]:
        ps = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True)
        ours = [
            line
            for line in ps.stdout.splitlines()
            if str(self.root) in line and " Z" not in line.split(str(self.root))[0]
        ]
        return ours + [f"pid {pid} (tagged)" for pid in tagged_pids(self.tag)]

    def stop_all(self) -> list[str]:
        for child in reversed(self.children):
            child.stop(grace=10)
        stop_tagged(self.tag, grace=5)
        return self.leftovers()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Certificates, keys, one image folder per institution, a backbone, an environment."""
    root = tmp_path_factory.mktemp("deploy")
    make_certs(root / "certs", institutions=[*INSTITUTIONS, "rogue"])
    make_certs(root / "other-federation")
    for i, inst in enumerate(INSTITUTIONS):
        write_image_folder(root / "data" / inst, "target", 100, seed=100 + i)
    save_artifact(random_artifact("ferry-cnn", seed=0), root / "backbone")
    # The user's own backbone package, installed for the server and every institution.
    site = installed_backbone.install(root / "site-packages")
    sys.path.insert(0, str(site))  # this process builds its weights as the operator would
    save_artifact(random_artifact(installed_backbone.PATH, seed=0), root / "own-backbone")
    kit = outsider.equip(root / "outsider", root / "certs", INSTITUTIONS[0])
    env = dict(os.environ)
    env.update(
        FERRY_HOME=str(root / "ferry-home"),
        OMP_NUM_THREADS="1",  # three institutions share 2 cores
        FLWR_TELEMETRY_ENABLED="0",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        PYTHONPATH=os.pathsep.join([str(site), str(Path(__file__).resolve().parents[1])]),
    )
    return {"root": root, "env": env, "certs": root / "certs", "outsider": kit}


def write_server_config(world: dict, name: str, port: int, **run: str) -> Path:
    """``[run]`` as below, ``run``'s keys (as TOML values) added or replacing."""
    root, certs = world["root"], world["certs"]
    settings = {
        "rounds": str(ROUNDS),
        "min-clients": "2",
        "num-classes": "4",
        "round-timeout": str(ROUND_TIMEOUT),
        "connect-timeout": "300",
        "weights": f'"{root / "backbone"}"',
        "noise-multiplier": "1.5",
        "epsilon": "30.0",
        "delta": str(DELTA),
        "out": f'"{root / name}-out"',
    } | run
    keys = "\n".join(f'{i} = "{certs}/institutions/{i}.pub"' for i in INSTITUTIONS)
    path = root / f"{name}.toml"
    path.write_text(
        f"""[server]
address = "127.0.0.1:{port}"
certs = "{certs}"
state-dir = "{root / name}-state"

[institutions]
{keys}

[run]
{chr(10).join(f"{key} = {value}" for key, value in settings.items())}
"""
    )
    return path


def client_argv(world: dict, inst: str, port: int, state: str, **override) -> list[str]:
    certs, root = world["certs"], world["root"]
    args = {
        "--server": f"127.0.0.1:{port}",
        "--root-cert": str(certs / "ca.pem"),
        "--key": str(certs / "institutions" / f"{inst}.key"),
        "--data": str(root / "data" / (inst if inst in INSTITUTIONS else INSTITUTIONS[0])),
        "--state-dir": str(root / state / inst),
        "--budget-epsilon": "50",
        "--budget-delta": "1e-4",
        "--institution": inst,
        "--runtime-port": str(free_port()),
    } | override
    return [*FERRY, "client", *[x for kv in args.items() for x in kv]]


def start_server(procs: Processes, world: dict, name: str, port: int, **run: str):
    config = write_server_config(world, name, port, **run)
    server = procs.start(name, [*FERRY, "server", "--config", str(config)])
    wait_for(
        lambda: server.poll() is not None or f"{INSTITUTIONS[-1]}: " in server.log_tail(200),
        90,
        "the server to register the institutions",
    )
    assert server.poll() is None, server.log_tail(40)
    return server


def _clientapps(child: ChildProcess) -> set[int]:
    pids = set()
    for pid in tagged_pids(child.tag):
        try:
            if b"ferry.client.checked_clientapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.add(pid)
        except OSError:
            pass
    return pids


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def dropout_run(world) -> dict:
    procs = Processes(world["root"], world["env"])
    port, result = free_port(), {}
    out = world["root"] / "dropout-out"
    try:
        t0 = time.monotonic()
        server = start_server(
            procs,
            world,
            "dropout",
            port,
            backbone=f'"{installed_backbone.PATH}"',
            weights=f'"{world["root"] / "own-backbone"}"',
        )
        # Turned away before any institution joins (these must not disturb the rounds).
        rogue = procs.start("rogue", client_argv(world, "rogue", port, "dropout-clients"))
        no_ca = procs.start(
            "no-ca",
            [
                flower_bin("flower-supernode"),
                "--superlink",
                f"127.0.0.1:{port}",
                "--auth-supernode-private-key",
                str(world["certs"] / "institutions" / "rogue.key"),
                "--port",
                str(free_port()),
                "--max-retries",
                "2",
            ],
        )
        wrong_ca = procs.start(
            "wrong-ca",
            client_argv(
                world,
                INSTITUTIONS[0],
                port,
                "dropout-clients-wrong",
                **{"--root-cert": str(world["root"] / "other-federation" / "ca.pem")},
            ),
        )
        for name, child in (("rogue", rogue), ("no_ca", no_ca), ("wrong_ca", wrong_ca)):
            result[name] = {"code": procs.wait(child, 90), "log": child.log_path.read_text()}
        # The outsider, while the run is live and waits for its institutions (so every attempt
        # is made during the run, however slow the machine).
        operator = world["root"] / "dropout-state" / "flwr-home"  # ferry server's own view
        run_id = wait_for(
            lambda: outsider.live_run(operator, world["env"]), 120, "the run to be live", poll=0.5
        )
        kit, honest = world["outsider"], INSTITUTIONS[0]
        own = procs.start("outsider-own", outsider.own_supernode_argv(kit, port, free_port()))
        named = procs.start(
            "outsider-named",
            client_argv(
                world, honest, port, "outsider", **{"--key": str(kit / "named" / f"{honest}.key")}
            ),
        )
        result["outsider"] = outsider.control_attempts(
            kit, port, world["env"], run_id, honest, operator
        )
        result["outsider"]["run_id"] = run_id
        for name, child in (("own_supernode", own), ("named_client", named)):
            result["outsider"][name] = {
                "code": procs.wait(child, 120),
                "log": child.log_path.read_text(),
            }
        result["outsider_done"] = time.monotonic() - t0
        clients = {
            inst: procs.start(f"dropout-{inst}", client_argv(world, inst, port, "dropout-clients"))
            for inst in INSTITUTIONS
        }
        # Kill the last institution once it starts training in round 2.
        victim = clients[INSTITUTIONS[-1]]
        wait_for(lambda: len(_metrics(out)) >= 1, 240, "round 1")
        seen_in_round_1 = _clientapps(victim)
        wait_for(
            lambda: len(_metrics(out)) >= 2 or _clientapps(victim) - seen_in_round_1,
            120,
            "the victim's round-2 training",
            poll=0.05,
        )
        assert len(_metrics(out)) == 1, "round 2 ended before the victim started training"
        procs.kill_tree(victim)
        result["killed_at"] = time.monotonic() - t0
        result["server_code"] = procs.wait(server, 400)
        result["seconds"] = time.monotonic() - t0
        result["server_log"] = server.log_path.read_text()
        result["server_left"] = tagged_pids(server.tag)  # ferry server stopped its own
        result["clients_alive"] = {i: c.poll() is None for i, c in clients.items()}
    finally:
        result["leftovers"] = procs.stop_all()
    result.update(out=out, state=world["root"] / "dropout-state")
    return result


@pytest.fixture(scope="module")
def resnet50(world) -> dict:
    """A random-init ResNet-50 for 3x64x64 images, written as a ``--weights`` directory."""
    out = world["root"] / "resnet50"
    import_backbone("resnet50", "random", 64, out, log=lambda *_: None)
    return {"dir": out, "artifact": load_artifact(out)}


@pytest.fixture(scope="module")
def resumed_run(world, resnet50) -> dict:
    procs = Processes(world["root"], world["env"])
    port, result = free_port(), {}
    out = world["root"] / "resume-out"
    try:
        t0 = time.monotonic()
        server = start_server(
            procs,
            world,
            "resume",
            port,
            backbone='"resnet50"',
            weights=f'"{resnet50["dir"]}"',
            **{"round-timeout": "240"},  # no dropout here: a slow round 1 only waits longer
        )
        clients = {
            inst: procs.start(f"resume-{inst}", client_argv(world, inst, port, "resume-clients"))
            for inst in INSTITUTIONS
        }

        def checkpointed_round() -> int:
            try:
                return json.loads((out / "checkpoint.json").read_text())["round"]
            except (OSError, ValueError):
                return 0

        wait_for(lambda: checkpointed_round() >= 1, 300, "round 1's checkpoint", poll=0.02)
        procs.kill_tree(server)  # ferry server, flower-superlink, superexec, serverapp, flwr
        result["crash_ledger"] = read_ledger(out / "ledger.jsonl").records
        result["crashed_at"] = time.monotonic() - t0
        config = world["root"] / "resume.toml"
        restarted = procs.start(
            "resume-restarted", [*FERRY, "server", "--config", str(config), "--resume", str(out)]
        )
        result["server_code"] = procs.wait(restarted, 400)
        result["seconds"] = time.monotonic() - t0
        result["server_log"] = restarted.log_path.read_text()
        result["server_left"] = tagged_pids(restarted.tag)
        result["clients_alive"] = {i: c.poll() is None for i, c in clients.items()}
        # Ctrl-C / SIGTERM to `ferry client` stops its SuperNode and everything under it.
        result["client_codes"], result["clients_left"] = {}, {}
        for inst, child in clients.items():
            os.kill(child.pid, signal.SIGTERM)
            result["client_codes"][inst] = procs.wait(child, 60)
            result["clients_left"][inst] = tagged_pids(child.tag)
    finally:
        result["leftovers"] = procs.stop_all()
    result.update(out=out, clients=world["root"] / "resume-clients")
    return result


def _records(out: Path, event: str) -> list[dict]:
    return [r for r in read_ledger(out / "ledger.jsonl").records if r["event"] == event]


# --- the federation with TLS, node authentication and a dropout ------------------------------


def test_tls_federation_of_three_supernodes_finishes_all_rounds(dropout_run):
    out = dropout_run["out"]
    assert dropout_run["server_code"] == 0, dropout_run["server_log"][-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == ROUNDS
    assert set(summary["clients"]) == set(INSTITUTIONS)
    assert [m["round"] for m in _metrics(out)] == [1, 2]
    assert _metrics(out)[0]["participants"] == 3
    registered = json.loads((dropout_run["state"] / "institutions.json").read_text())
    assert set(registered) == set(INSTITUTIONS)  # the rogue key was never registered
    print(f"dropout run: {dropout_run['seconds']:.0f}s")


def test_a_backbone_named_by_import_path_ran_from_the_installed_package_everywhere(
    dropout_run, world
):
    """The run's backbone is ``ferry_testnets:tiny_cnn``, a user's package installed (with
    its ``ferry.backbones`` entry point) for the server and each institution: the server
    built its round-1 arrays from it, each institution stored the shipped weights by hash
    and built the trunk from its own installed code, and the final model names it."""
    out = dropout_run["out"]
    model = json.loads((out / "model" / "model.json").read_text())
    assert model["architecture"] == installed_backbone.PATH
    sha = model["backbone_sha256"]
    assert sha == load_artifact(world["root"] / "own-backbone").sha256
    for inst in INSTITUTIONS:
        stored = world["root"] / "dropout-clients" / inst / "cache" / "backbones" / sha
        assert load_artifact(stored, expected_sha256=sha).manifest["architecture"] == (
            installed_backbone.PATH
        )
    assert _metrics(out)[0]["participants"] == len(INSTITUTIONS)


def test_supernode_with_unregistered_key_is_refused(dropout_run):
    rogue = dropout_run["rogue"]
    lines = [line for line in rogue["log"].splitlines() if line.startswith("ferry: error:")]
    assert rogue["code"] == 2
    assert len(lines) == 1 and "not registered with the federation" in lines[0]
    assert "Traceback" not in rogue["log"]
    superlink_log = (dropout_run["state"] / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log


def test_supernode_without_the_ca_certificate_cannot_connect(dropout_run):
    no_ca = dropout_run["no_ca"]
    assert no_ca["code"] != 0
    assert "CERTIFICATE_VERIFY_FAILED" in no_ca["log"]
    assert "SuperNode ID" not in no_ca["log"]


def test_client_holding_another_federations_ca_stops_before_starting_a_supernode(dropout_run):
    wrong = dropout_run["wrong_ca"]
    lines = wrong["log"].strip().splitlines()
    assert wrong["code"] == 2
    assert lines[-1].startswith("ferry: error: the server at 127.0.0.1:")
    assert "did not prove its identity" in lines[-1]
    assert not any("connecting to" in line for line in lines)


def test_supernode_killed_mid_round_is_dropped_and_the_others_finish(dropout_run):
    out, victim = dropout_run["out"], INSTITUTIONS[-1]
    dropped = _records(out, "client_dropped")
    assert [(d["round"], d["institution"], d["stage"]) for d in dropped] == [(2, victim, "train")]
    rounds = _metrics(out)
    assert [m["participants"] for m in rounds] == [3, 2]
    aggregated = _records(out, "round_aggregated")
    assert [sorted(a["participants"]) for a in aggregated[1:]] == [sorted(INSTITUTIONS[:2])]
    assert dropout_run["clients_alive"] == {
        INSTITUTIONS[0]: True,
        INSTITUTIONS[1]: True,
        victim: False,
    }


def test_dropout_run_leaves_no_process_behind(dropout_run):
    assert dropout_run["server_left"] == []  # stopped by ferry server itself, at its exit
    assert dropout_run["leftovers"] == []


# --- an outsider against the live run (before its institutions joined) ------------------------


def test_outsider_cannot_list_runs(dropout_run):
    attempts = dropout_run["outsider"]
    outsider.refused(attempts["ls"], attempts["run_id"])
    assert "runs" not in (attempts["ls"][0] or {})


def test_outsider_cannot_register_a_key_of_its_own_or_a_copied_one(dropout_run):
    attempts = dropout_run["outsider"]
    outsider.refused(attempts["register"], attempts["run_id"])
    outsider.refused(attempts["register_copy"], attempts["run_id"])
    registered = json.loads((dropout_run["state"] / "institutions.json").read_text())
    assert set(registered) == set(INSTITUTIONS)


def test_outsider_cannot_submit_a_run(dropout_run):
    attempts = dropout_run["outsider"]
    outsider.refused(attempts["run"], attempts["run_id"])
    assert attempts["operator_runs"] == [attempts["run_id"]]  # the SuperLink holds Ferry's only
    fab_store = dropout_run["state"] / "flwr-home"
    assert not any("evil" in p.name for p in fab_store.rglob("*")), "the outsider's app arrived"


def test_outsider_cannot_stop_the_live_run(dropout_run):
    attempts = dropout_run["outsider"]
    assert attempts["still_live"], "the attempts must be made while the run is live"
    outsider.refused(attempts["stop"], attempts["run_id"])
    assert dropout_run["server_code"] == 0  # and the run went on to its end


def test_control_runtime_docs_and_path_tricks_answer_404(dropout_run):
    assert {k: v for k, v in dropout_run["outsider"]["raw"].items() if v != 404} == {}


def test_fleet_route_without_a_node_signature_is_refused_by_the_superlink(dropout_run):
    # forwarded by the proxy; Flower's node authentication says no
    assert dropout_run["outsider"]["unsigned_fleet"] == 401


def test_outsider_supernodes_cannot_join(dropout_run):
    own, named = dropout_run["outsider"]["own_supernode"], dropout_run["outsider"]["named_client"]
    assert own["code"] != 0 and "SuperNode ID" not in own["log"], own["log"][-2000:]
    assert named["code"] == 2, named["log"][-2000:]
    assert "not registered with the federation" in named["log"]
    superlink_log = (dropout_run["state"] / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log


def test_the_run_holds_the_registered_institutions_only(dropout_run):
    records = read_ledger(dropout_run["out"] / "ledger.jsonl").records
    registered = json.loads((dropout_run["state"] / "institutions.json").read_text())
    nodes = {r["node_id"] for r in records if "node_id" in r}
    assert nodes <= {str(node) for node in registered.values()}
    assert {r["institution"] for r in records if "institution" in r} <= set(INSTITUTIONS)
    print(f"outsider's attempts done at {dropout_run['outsider_done']:.0f}s")


# --- the server killed after round 1 and resumed --------------------------------------------


def test_server_killed_after_round_1_resumes_and_finishes(resumed_run):
    out = resumed_run["out"]
    assert resumed_run["server_code"] == 0, resumed_run["server_log"][-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == ROUNDS and summary["resumed"] is True
    assert [m["round"] for m in _metrics(out)] == [1, 2]
    crash_rounds = [
        r["round"] for r in resumed_run["crash_ledger"] if r["event"] == "round_aggregated"
    ]
    assert crash_rounds == [1]
    resumed = _records(out, "run_resumed")
    assert [r["after_round"] for r in resumed] == [1]
    print(f"resumed run: {resumed_run['seconds']:.0f}s (crash at {resumed_run['crashed_at']:.0f}s)")


def test_resumed_ledger_verifies_and_matches_each_institutions_own_accounting(resumed_run):
    out = resumed_run["out"]
    ledger = read_ledger(out / "ledger.jsonl")  # raises if the chain is broken
    assert ledger.incomplete_tail is None
    # The crash ledger is a prefix of the final one: nothing was rewritten.
    assert ledger.records[: len(resumed_run["crash_ledger"])] == resumed_run["crash_ledger"]
    for inst in INSTITUTIONS:
        state = PrivacyState.open(resumed_run["clients"] / inst, inst)
        trained = [r for r in ledger.records if r["event"] == "client_trained"]
        mine = [r for r in trained if r["institution"] == inst]
        replay = [
            MechanismSegment(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in mine
        ]
        # Every spend the institution recorded is in the ledger once: none lost, none twice.
        assert [r["client_rounds"] for r in mine] == list(range(1, state.rounds() + 1)), inst
        assert mine[-1]["epsilon_spent"] == pytest.approx(state.epsilon(DELTA)), inst
        assert epsilon_for_history(replay, DELTA) == pytest.approx(state.epsilon(DELTA)), inst
        # Same node id before and after the restart: the key identifies the institution.
        assert len({r["node_id"] for r in mine}) == 1, inst


def test_resnet50_reached_every_institution_once_by_hash_and_not_again_after_the_restart(
    resumed_run, resnet50
):
    artifact, out = resnet50["artifact"], resumed_run["out"]
    assert artifact.nbytes > 90e6
    shipped = _records(out, "backbone_shipped")
    assert len(shipped) == len({r["node_id"] for r in shipped}) == len(INSTITUTIONS)
    assert {(r["round"], r["backbone_sha256"], r["bytes"]) for r in shipped} == {
        (1, artifact.sha256, artifact.nbytes)
    }
    first, second = json.loads((out / "summary.json").read_text())["bytes"]["per_round"]
    assert first["backbones_shipped"] == len(INSTITUTIONS)
    assert first["largest_message_arrays"] == artifact.nbytes  # one message, one whole copy
    assert second["backbones_shipped"] == 0 and second["backbone_sent"] == 0
    for inst in INSTITUTIONS:  # ferry client's cache: STATE_DIR/cache
        cache = resumed_run["clients"] / inst / "cache" / "backbones"
        assert sorted(p.name for p in cache.iterdir()) == [artifact.sha256], inst
        stored = load_artifact(cache / artifact.sha256, artifact.sha256)  # verifies the hash
        assert stored.nbytes == artifact.nbytes


def test_resumed_run_leaves_no_process_behind(resumed_run):
    assert all(resumed_run["clients_alive"].values())  # they rode out the server's restart
    assert resumed_run["server_left"] == []
    assert resumed_run["client_codes"] == dict.fromkeys(INSTITUTIONS, 130)  # interrupted
    assert resumed_run["clients_left"] == dict.fromkeys(INSTITUTIONS, [])
    assert resumed_run["leftovers"] == []
