"""Attacks on keys and files, played as another user of the same machine or as the operator's
own mistakes (issue 12, item 5).

- Another local user reads what an institution keeps beside its data: extracted features,
  received backbones, the privacy state, the receipt chain, the held-out split and its secret
  salt. Each must be a 0600 file in a 0700 directory, whatever the umask allows.
- A ``server.key`` that others can read is refused by ``ferry server``.
- ``ferry certs`` keeps the CA key apart from the server's files; ``ferry server`` warns when
  a ``ca.key`` sits beside ``server.key``.
- ``ferry certs --host NAME`` with an existing server certificate that lacks NAME is an error
  naming it (nothing written), never a silently kept certificate.
- ``ferry certs --out`` into an existing directory never changes its mode.
- ``ferry client --data`` accepts a folder of DICOM files (the loader reads them).
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
from pathlib import Path

import numpy as np
import pytest

import ferry.common.deploy.child_processes as child_processes
from ferry.cli import main
from ferry.client.backbone_cache import BackboneCache
from ferry.client.feature_cache import FeatureCache, feature_key
from ferry.client.held_out import pin_data_settings, pin_split
from ferry.client.privacy_state import PrivacyState
from ferry.client.receipts import sign_and_keep
from ferry.client.supernode import check_data
from ferry.common.privacy.accounting import MechanismSegment
from ferry.common.serialization import instantiate, save_artifact
from ferry.server.certs import make_certs
from ferry.server.server_settings import load_server_config


@pytest.fixture(autouse=True)
def permissive_umask():
    """The common default umask (022): files are world-readable unless made private."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture(autouse=True)
def no_flower_processes(monkeypatch):
    def start(self):
        raise AssertionError(f"{self.name} was started")

    monkeypatch.setattr(child_processes.ChildProcess, "start", start)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _assert_private_tree(root: Path) -> list[Path]:
    """Every file under ``root`` is 0600 and every directory (``root`` too) 0700."""
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files, f"nothing was written under {root}"
    for path in [root, *root.rglob("*")]:
        if path.suffix == ".pub":
            continue  # a public key is public
        want = 0o700 if path.is_dir() else 0o600
        assert _mode(path) == want, f"{path} has mode {_mode(path):04o}, want {want:04o}"
    return files


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- another local user reading an institution's caches and state ------------------------


def test_another_user_cannot_read_the_feature_cache(tmp_path, artifact):
    trunk = instantiate(artifact)
    pre = artifact.manifest["preprocessing"]
    shape = tuple(artifact.manifest["input_shape"])
    rng = np.random.default_rng(0)
    splits = {
        "train": rng.random((20, *shape), dtype=np.float32),
        "test": rng.random((6, *shape), dtype=np.float32),
    }
    cache_dir = tmp_path / "institution" / "cache"
    FeatureCache(cache_dir).get(feature_key(artifact.sha256, "fp", pre), trunk, pre, splits)

    files = _assert_private_tree(cache_dir / "features")
    assert {p.name for p in files} == {"train.npy", "test.npy"}
    assert _mode(cache_dir) == 0o700 and _mode(cache_dir.parent) == 0o700  # made by Ferry


def test_another_user_cannot_read_the_backbone_cache(tmp_path, artifact):
    cache_dir = tmp_path / "cache"
    BackboneCache(cache_dir).store(artifact.manifest, artifact.tensors, artifact.sha256)

    files = _assert_private_tree(cache_dir / "backbones")
    assert {p.name for p in files} == {"backbone.safetensors", "manifest.json"}
    assert BackboneCache(cache_dir).has(artifact.sha256)  # still reads back, verified


def test_another_user_cannot_read_the_privacy_state_or_the_receipts(tmp_path):
    state_dir = tmp_path / "institution" / "state"
    PrivacyState.open(state_dir, "hospital-a").record(
        MechanismSegment(1.1, 0.1, 20), round=1, run="run-0"
    )
    report = {
        "run-id": "r",
        "round": 1,
        "institution": "hospital-a",
        "unit": "example",
        "non-private": True,
        "dp-event": {"module_name": "dp_accounting.dp_event", "class_name": "NonPrivateDpEvent"},
        "sampling": "poisson",
        "noise-multiplier": 0.0,
        "sample-rate": 1.0,
        "steps": 0,
        "max-grad-norm": 1.0,
        "batch-size": 10,
        "local-epochs": 1,
        "examples": 100,
        "delta": 1e-5,
        "epsilon": float("inf"),
        "accountant": "prv",
        "accountant-library": "opacus",
        "rounds": 0,
    }
    sign_and_keep(state_dir, "hospital-a", report)

    names = {p.name for p in _assert_private_tree(state_dir)}
    assert {"privacy_state.json", "receipts.jsonl", "report-signing.key"} <= names
    assert _mode(state_dir.parent) == 0o700


def test_another_user_cannot_read_the_held_out_split_or_its_salt(tmp_path):
    state_dir = tmp_path / "state"
    pin_split(state_dir, 0.25)
    pin_data_settings(state_dir, {"classes": ["no", "yes"]})

    names = {p.name for p in _assert_private_tree(state_dir)}
    assert names == {"split.json", "data-settings.json"}


def test_an_existing_state_directory_keeps_its_mode(tmp_path):
    """Ferry never chmods a directory it did not create; its files are private anyway."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    pin_split(shared, 0.2)

    assert _mode(shared) == 0o755
    assert _mode(shared / "split.json") == 0o600


def test_another_user_cannot_read_the_node_config_the_noise_cache_or_the_supernode_log(
    tmp_path, monkeypatch
):
    """The node config names the data and key paths; the noise cache holds q (so n); the
    SuperNode's log holds refusals that may quote data. All 0600 in a 0700 directory."""
    from ferry.client.runtime import noise_for
    from ferry.client.supernode import InstitutionSettings, write_node_config
    from ferry.common.config import RunConfig
    from ferry.common.messages import RoundRequest

    state = tmp_path / "state"
    data = tmp_path / "data.csv"
    data.write_text("a,b\n1,2\n3,4\n")
    settings = InstitutionSettings(
        server="127.0.0.1:9092",
        data=data,
        state_dir=state,
        institution="hospital-a",
        budget_epsilon=3.0,
        budget_delta=1e-5,
        insecure=True,
    )
    write_node_config(settings)
    noise_for(RoundRequest(RunConfig(rounds=2, epsilon=3.0), 1, "0" * 64, 2), 500, state)
    monkeypatch.undo()  # this test starts one real (harmless) child: `true`, logging
    log = child_processes.ChildProcess("probe", ["true"], state / "supernode.log", {}).start()
    log.proc.wait()
    _assert_private_tree(state)


# --- the server's key and the CA's key --------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_toml(tmp_path: Path, certs: Path, artifact) -> Path:
    weights = save_artifact(artifact, tmp_path / "backbone")
    path = tmp_path / "server.toml"
    path.write_text(
        f"""[server]
address = "127.0.0.1:{_free_port()}"
certs = "{certs}"
state-dir = "{tmp_path / "server-state"}"

[institutions]
hospital-a = "{certs}/institutions/hospital-a.pub"

[run]
num-classes = 2
weights = "{weights}"
out = "{tmp_path / "run"}"
"""
    )
    return path


def test_a_world_readable_server_key_is_refused(tmp_path, artifact, capsys):
    certs = tmp_path / "certs"
    make_certs(certs, institutions=["hospital-a"])
    config = _server_toml(tmp_path, certs, artifact)
    load_server_config(config)  # the private key as made: accepted
    os.chmod(certs / "server.key", 0o644)  # copied with the wrong mode, readable by all

    assert main(["server", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ferry: error: server key ")
    assert "mode 0644" in err[0] and "chmod 600" in err[0]


def test_certs_keep_the_ca_key_apart_from_the_server_files(tmp_path, capsys):
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--institution", "hospital-a"]) == 0

    assert not (out / "ca.key").exists(), "the CA key travels with the server's files"
    ca_key = tmp_path / "certs-ca" / "ca.key"
    assert _mode(ca_key) == 0o600 and _mode(ca_key.parent) == 0o700
    assert _mode(out / "server.key") == 0o600
    # A later call (a new institution) works without the CA key; a new server certificate
    # under the same CA finds it in --ca-dir.
    os.rename(ca_key.parent, tmp_path / "offline")
    assert main(["certs", "--out", str(out), "--institution", "late"]) == 0
    (out / "server.pem").unlink()
    (out / "server.key").unlink()
    assert main(["certs", "--out", str(out), "--ca-dir", str(tmp_path / "offline")]) == 0
    assert (out / "server.pem").exists()


def test_server_warns_when_the_ca_key_sits_beside_the_server_key(tmp_path, artifact, capsys):
    certs = tmp_path / "certs"
    make_certs(certs, institutions=["hospital-a"], ca_dir=certs)  # the old, shared layout
    assert (certs / "ca.key").exists()

    load_server_config(_server_toml(tmp_path, certs, artifact))

    err = capsys.readouterr().err
    assert "WARNING" in err and str(certs / "ca.key") in err and "offline" in err


def test_certs_host_missing_from_the_existing_certificate_is_an_error(tmp_path, capsys):
    out = tmp_path / "certs"
    make_certs(out)
    before = _digests(out)

    code = main(["certs", "--out", str(out), "--host", "fl.example.org", "--host", "127.0.0.1"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ferry: error: ")
    assert "fl.example.org" in err[0] and "127.0.0.1" not in err[0].split("--host")[1]
    assert "server.key" in err[0]  # how to fix: remove server.pem/server.key to reissue
    assert _digests(out) == before


def test_certs_never_chmod_an_existing_out_directory(tmp_path, capsys):
    out = tmp_path / "shared-folder"
    out.mkdir()
    os.chmod(out, 0o755)

    assert main(["certs", "--out", str(out)]) == 0

    assert _mode(out) == 0o755
    assert _mode(out / "server.key") == 0o600
    assert "WARNING" in capsys.readouterr().err


# --- DICOM data ---------------------------------------------------------------------------


def _dicom(path: Path, value: int) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.set_pixel_data(np.full((12, 10), value, dtype=np.uint16), "MONOCHROME2", 12)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_client_accepts_a_folder_of_dicom_files(tmp_path):
    pytest.importorskip("pydicom")
    root = tmp_path / "scans"
    for i in range(3):
        _dicom(root / "benign" / f"{i}.dcm", 100 + i)
        _dicom(root / "malignant" / f"IM{i:04d}", 900 + i)  # no suffix: found by its marker

    classes, count = check_data(root)

    assert classes == ["benign", "malignant"] and count == 6
