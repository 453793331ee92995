"""Shared fixtures: an isolated FERRY_HOME, fresh per-process caches, a small backbone.

Every test gets its own ``$FERRY_HOME`` and starts with empty in-memory caches
(:mod:`client.backbone_cache` keeps verified trunks, :mod:`client.feature_cache` keeps
features per process), so no test passes because an earlier one warmed a cache.

``make test`` runs the suite on two pytest-xdist workers (``-n 2 --dist loadfile``): each
test file is one unit of work (its module fixtures are built once, on one worker), handed out
in the order below (``--no-loadscope-reorder``): the files with the longest runs first, so that
the two workers finish together.
Half of the suite's time is spent waiting on other processes (SuperLinks, SuperNodes, Ray),
which is why two workers help on two cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import ferry.client.backbone_cache as backbone_cache
import ferry.simulations.runner as runner
from ferry.client.institution_settings import ClientSettings
from ferry.client.runtime import RoundRequest
from ferry.common.config import RunConfig
from ferry.common.heads import build_head
from ferry.common.serialization import BackboneArtifact, save_artifact
from ferry.server.pretrain import random_artifact

from inprocess_grid import empty_process_caches, run_in_process

# The files that take longest, longest first (``make test`` prints the 25 slowest tests); the
# others follow in their usual order. Only the order of hand-out depends on this list.
LONGEST_FIRST = (
    "test_deploy.py",
    "test_backbone_transport.py",
    "test_bench.py",
    "test_attack_budget_state.py",
    "test_attack_code_bundle.py",
    "test_scenarios.py",
    "test_own_model.py",
    "test_flwr_run_defaults.py",
    "test_simulation_e2e.py",
    "test_kcurve_bench.py",
    "test_training_defaults.py",
    "test_demo_audit.py",
    "test_attack_operator_config.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


def pytest_configure(config: pytest.Config) -> None:
    # Opacus warns on every make_private (secure RNG off; full backward hooks on a head whose
    # inputs need no gradient): expected in tests, noise in the summary.
    config.addinivalue_line("filterwarnings", "ignore:Secure RNG turned off:UserWarning")
    config.addinivalue_line("filterwarnings", "ignore:Full backward hook:UserWarning")


@pytest.fixture(autouse=True)
def isolated_ferry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "ferry-home"
    monkeypatch.setenv("FERRY_HOME", str(home))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    empty_process_caches(monkeypatch)
    return home


@pytest.fixture
def without_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ferry simulate`` (the CLI or :func:`ferry.simulations.runner.simulate`) runs all it
    runs, except that its federation runs in this process instead of on Ray
    (:func:`inprocess_grid.run_in_process`): for tests whose point is the run's checks,
    outputs or model, not Ray. Ray's start-up and its workers' imports cost ~15 s a run."""
    monkeypatch.setattr(runner, "run_on_ray", run_in_process)


@pytest.fixture
def restart_process(monkeypatch: pytest.MonkeyPatch):
    """Call it to forget what a client process keeps in memory (as a new worker would)."""

    def restart() -> None:
        empty_process_caches(monkeypatch)

    return restart


@pytest.fixture
def artifact() -> BackboneArtifact:
    """A randomly initialised ferry-cnn backbone (instant; no pretraining)."""
    return random_artifact("ferry-cnn", seed=0)


@pytest.fixture
def artifact_dir(tmp_path: Path, artifact: BackboneArtifact) -> Path:
    return save_artifact(artifact, tmp_path / "backbone")


class Client:
    """One institution of a tiny federation, driven through :mod:`client.runtime`."""

    def __init__(self, root: Path, artifact: BackboneArtifact, run: RunConfig, pid: int = 0):
        self.artifact = artifact
        self.run = run
        self.settings = ClientSettings(
            f"hospital-{pid:03d}", root / "state", root / "cache", pid, run.clients
        )
        backbone_cache.BackboneCache(self.settings.cache_dir).store(
            artifact.manifest, artifact.tensors, artifact.sha256
        )

    def request(self, rnd: int, run_id: str = "run-a") -> RoundRequest:
        return RoundRequest(self.run, rnd, self.artifact.sha256, 4, run_id)

    def initial_head(self) -> dict:
        head = build_head(self.run.head, int(self.artifact.manifest["feature_dim"]), 4)
        return {k: v.detach().numpy().copy() for k, v in head.state_dict().items()}


@pytest.fixture
def small_run() -> RunConfig:
    """400 synthetic examples over 2 clients, 3 planned rounds of one epoch at batch 32 (given,
    not the DP-aware defaults): a client round takes ~0.3 s."""
    return RunConfig(examples=400, clients=2, rounds=3, batch_size=32, local_epochs=1, lr=1.0)


@pytest.fixture
def client(tmp_path: Path, artifact: BackboneArtifact, small_run: RunConfig) -> Client:
    """Partition 0 of ``small_run``, its cache already holding ``artifact``."""
    return Client(tmp_path / "hospital-000", artifact, small_run)


@pytest.fixture
def reissue_server_cert():
    """``reissue(out, hosts)``: replace the server certificate that ``ferry certs`` wrote
    under ``out`` (its CA key in ``OUT-ca``) by one for exactly ``hosts``, as a certificate
    made with other tools could be (``ferry certs`` always adds the loopback names)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from ferry.server import certs

    def reissue(out: Path, hosts: list[str]) -> Path:
        ca_cert = x509.load_pem_x509_certificate((out / certs.CA_CERT).read_bytes())
        ca_key = serialization.load_pem_private_key(
            (certs.default_ca_dir(out) / certs.CA_KEY).read_bytes(), password=None
        )
        cert, key = certs._make_server_cert(ca_cert, ca_key, hosts, 30)
        (out / certs.SERVER_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / certs.SERVER_KEY).write_bytes(certs._key_pem(key))
        return out

    return reissue
