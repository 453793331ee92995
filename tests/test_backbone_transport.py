"""A large backbone (ResNet-50, 94 MB of weights) reaches every client exactly once, by hash.

Flower 1.41 splits large arrays into chunks itself (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``),
so the whole backbone travels in one Ferry message; these tests check that such a message
gets through, in simulation and between real processes.

* Simulation (3 virtual hospitals, 2 rounds, twice in one ``$FERRY_HOME``): round 1 ships one
  copy per client (one ``backbone_shipped`` record each), round 2 ships nothing, and the
  second run ships nothing at all because every client's cache holds the hash. The first run
  is on Flower's Ray backend (the large message's trip); the second, which ships no backbone,
  runs the same plan and round loop in this process, the clients' in-memory caches empty
  (:func:`inprocess_grid.simulate_in_process`).
* Deployment (``ferry server`` with a real ``flower-superlink`` and two ``ferry client``
  institutions with real ``flower-supernode``\\ s on 127.0.0.1, TLS and node authentication
  on; 1 round): both institutions receive the backbone once and the round completes. The
  process helpers are those of ``tests/test_deploy.py``; every process is stopped, also when
  a test fails, and none may be left.

The ResNet-50 is randomly initialised and built for 64 px images, so its trunk is cheap; its
weights do not depend on the input size (94,245,032 bytes at any size).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferry.common.config import RunConfig
from ferry.common.data.synthetic import class_names, make_images
from ferry.common.serialization import BackboneArtifact, load_artifact
from ferry.server.audit import audit_ledger
from ferry.server.backbone_import import import_backbone
from ferry.server.certs import make_certs
from ferry.server.ledger import read_ledger
from ferry.simulations.runner import simulate

from inprocess_grid import empty_process_caches, simulate_in_process
from test_deploy import FERRY, Processes, client_argv, free_port, wait_for

pytestmark = pytest.mark.slow

CLIENTS, ROUNDS = 3, 2
INSTITUTIONS = ("hospital-a", "hospital-b")  # names test_deploy's client_argv knows
IMAGES_PER_INSTITUTION = 40


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory) -> dict:
    """A random-init ResNet-50 for 3x64x64 images, written as a ``--weights`` directory."""
    out = tmp_path_factory.mktemp("resnet50") / "backbone"
    artifact = import_backbone("resnet50", "random", 64, out, log=lambda *_: None)
    return {"dir": out, "artifact": artifact}


def _shipped(out: Path) -> list[dict]:
    return [
        r for r in read_ledger(out / "ledger.jsonl").records if r["event"] == "backbone_shipped"
    ]


def _cached_copies(cache_root: Path) -> dict[str, list[str]]:
    """Each client's backbone cache: the sha256 ids it holds."""
    return {
        client.name: sorted(p.name for p in (client / "backbones").iterdir())
        for client in sorted(cache_root.iterdir())
        if (client / "backbones").is_dir()
    }


def _assert_holds_verified_copy(directory: Path, artifact: BackboneArtifact) -> None:
    stored = load_artifact(directory, artifact.sha256)  # raises unless it hashes to the id
    assert stored.nbytes == artifact.nbytes


# --- simulation ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def simulated(resnet50, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("transport-sim")
    home = root / "ferry-home"
    summaries, seconds = {}, {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FERRY_HOME", str(home))
        mp.setenv("FLWR_TELEMETRY_ENABLED", "0")
        mp.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        for name in ("first", "second"):
            cfg = RunConfig(
                clients=CLIENTS,
                rounds=ROUNDS,
                examples=60,
                partition="iid",
                backbone="resnet50",
                weights=str(resnet50["dir"]),
                batch_size=8,
                out=str(root / name),
            )
            started = time.monotonic()
            if name == "first":
                summaries[name] = simulate(cfg, log=lambda _: None)
            else:
                empty_process_caches(mp)
                summaries[name] = simulate_in_process(cfg)
            seconds[name] = time.monotonic() - started
    return {
        "summaries": summaries,
        "seconds": seconds,
        "out": {name: root / name for name in summaries},
        "cache_root": home / "simulation-clients",
    }


def test_simulation_round_one_ships_one_backbone_per_client_in_one_message_each(
    simulated, resnet50
):
    artifact = resnet50["artifact"]
    summary = simulated["summaries"]["first"]
    first, second = summary["bytes"]["per_round"]

    assert summary["rounds_completed"] == ROUNDS
    assert summary["backbone"]["sha256"] == artifact.sha256
    assert summary["backbone"]["bytes"] == artifact.nbytes > 90e6
    assert first["backbones_shipped"] == CLIENTS
    assert first["backbone_sent"] == CLIENTS * artifact.nbytes
    # One message carried a whole copy (Flower chunks it underneath, not Ferry).
    assert first["largest_message_arrays"] == artifact.nbytes
    assert second["backbones_shipped"] == 0 and second["backbone_sent"] == 0
    assert summary["bytes"]["backbone_sent_total"] == CLIENTS * artifact.nbytes
    print(f"first simulation: {simulated['seconds']['first']:.0f}s")


def test_simulation_ledger_records_one_shipment_per_client_by_hash(simulated, resnet50):
    artifact = resnet50["artifact"]
    out = simulated["out"]["first"]
    shipped = _shipped(out)

    assert len(shipped) == CLIENTS
    assert len({r["node_id"] for r in shipped}) == CLIENTS
    assert {(r["round"], r["backbone_sha256"], r["bytes"]) for r in shipped} == {
        (1, artifact.sha256, artifact.nbytes)
    }
    assert audit_ledger(out).ok


def test_every_simulated_client_holds_one_verified_copy_and_trains_on_it(simulated, resnet50):
    artifact = resnet50["artifact"]
    summary = simulated["summaries"]["first"]
    copies = _cached_copies(simulated["cache_root"])

    assert copies == {name: [artifact.sha256] for name in summary["clients"]}
    assert len(copies) == CLIENTS
    for name in copies:
        _assert_holds_verified_copy(
            simulated["cache_root"] / name / "backbones" / artifact.sha256, artifact
        )
    assert all(c["rounds"] == ROUNDS for c in summary["clients"].values())
    lines = (simulated["out"]["first"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["participants"] for line in lines] == [CLIENTS] * ROUNDS


def test_second_simulation_in_the_same_ferry_home_ships_no_backbone(simulated, resnet50):
    summary = simulated["summaries"]["second"]

    assert summary["backbone"]["sha256"] == resnet50["artifact"].sha256
    assert summary["rounds_completed"] == ROUNDS
    assert summary["bytes"]["backbone_sent_total"] == 0
    assert all(r["backbones_shipped"] == 0 for r in summary["bytes"]["per_round"])
    assert _shipped(simulated["out"]["second"]) == []
    # Nothing larger than the trainable arrays (a 2048 x 4 linear head) travelled at all.
    assert (
        max(r["largest_message_arrays"] for r in summary["bytes"]["per_round"])
        == (summary["bytes"]["head_bytes"])
    )
    assert summary["bytes"]["head_bytes"] == (2048 * 4 + 4) * 4
    print(f"second simulation: {simulated['seconds']['second']:.0f}s")


# --- deployment: real SuperLink and SuperNodes --------------------------------------------------


def _write_image_folders(root: Path) -> None:
    names = class_names("target")
    for i, inst in enumerate(INSTITUTIONS):
        images, labels = make_images("target", IMAGES_PER_INSTITUTION, seed=200 + i)
        for j, (img, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / "data" / inst / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((img[0] * 255).astype(np.uint8)).save(folder / f"{j:03d}.png")


def _server_config(root: Path, certs: Path, weights: Path, port: int) -> Path:
    keys = "\n".join(f'{i} = "{certs}/institutions/{i}.pub"' for i in INSTITUTIONS)
    path = root / "server.toml"
    path.write_text(
        f"""[server]
address = "127.0.0.1:{port}"
certs = "{certs}"
state-dir = "{root / "server-state"}"

[institutions]
{keys}

[run]
rounds = 1
min-clients = {len(INSTITUTIONS)}
num-classes = 4
round-timeout = 240
connect-timeout = 120
backbone = "resnet50"
weights = "{weights}"
batch-size = 8
noise-multiplier = 1.5
epsilon = 30.0
delta = 1e-5
out = "{root / "out"}"
"""
    )
    return path


@pytest.fixture(scope="module")
def deployed(resnet50, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("transport-deploy")
    make_certs(root / "certs", institutions=list(INSTITUTIONS))
    _write_image_folders(root)
    env = dict(os.environ)
    env.update(
        FERRY_HOME=str(root / "ferry-home"),
        OMP_NUM_THREADS="1",
        FLWR_TELEMETRY_ENABLED="0",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    world = {"root": root, "certs": root / "certs", "env": env}
    procs = Processes(root, env)
    port, result = free_port(), {}
    try:
        started = time.monotonic()
        config = _server_config(root, world["certs"], resnet50["dir"], port)
        server = procs.start("server", [*FERRY, "server", "--config", str(config)])
        wait_for(
            lambda: server.poll() is not None or f"{INSTITUTIONS[-1]}: " in server.log_tail(200),
            90,
            "the server to register the institutions",
        )
        assert server.poll() is None, server.log_tail(40)
        for inst in INSTITUTIONS:
            procs.start(inst, client_argv(world, inst, port, "clients"))
        result["server_code"] = procs.wait(server, 400)
        result["seconds"] = time.monotonic() - started
        result["server_log"] = server.log_path.read_text()
        result["client_logs"] = {
            inst: (root / "logs" / f"{inst}.log").read_text(errors="replace")
            for inst in INSTITUTIONS
        }
    finally:
        result["leftovers"] = procs.stop_all()
    result.update(out=root / "out", clients=root / "clients")
    return result


def test_deployed_resnet50_reaches_both_supernodes_once_and_the_round_completes(deployed, resnet50):
    artifact, out = resnet50["artifact"], deployed["out"]
    assert deployed["server_code"] == 0, deployed["server_log"][-4000:]
    summary = json.loads((out / "summary.json").read_text())
    (traffic,) = summary["bytes"]["per_round"]

    assert summary["rounds_completed"] == 1
    assert set(summary["clients"]) == set(INSTITUTIONS)
    assert traffic["backbones_shipped"] == len(INSTITUTIONS)
    assert traffic["backbone_sent"] == len(INSTITUTIONS) * artifact.nbytes
    assert traffic["largest_message_arrays"] == artifact.nbytes
    shipped = _shipped(out)
    assert len(shipped) == len(INSTITUTIONS)
    assert len({r["node_id"] for r in shipped}) == len(INSTITUTIONS)
    assert {(r["backbone_sha256"], r["bytes"]) for r in shipped} == {
        (artifact.sha256, artifact.nbytes)
    }
    for inst in INSTITUTIONS:  # ferry client's cache: STATE_DIR/cache
        cache = deployed["clients"] / inst / "cache" / "backbones"
        assert sorted(p.name for p in cache.iterdir()) == [artifact.sha256], inst
        _assert_holds_verified_copy(cache / artifact.sha256, artifact)
    print(f"deployment with a ResNet-50: {deployed['seconds']:.0f}s")


def test_deployment_with_a_large_backbone_leaves_no_process_behind(deployed):
    assert deployed["leftovers"] == []
