"""client.bundle_check: only Ferry's code-free bundle passes; each way of carrying code or
naming other code is refused with its reason. Bundles are built with Flower's own
``flwr build`` code (``build_fab_from_disk``) where Flower can build them, by hand where a
hostile bundle is one Flower's builder would not make (duplicates, links, a lying manifest)."""

from __future__ import annotations

import hashlib
import io
import stat
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from ferry.client.bundle_check import MAX_BUNDLE_BYTES, BundleRefused, check_bundle
from ferry.server.superlink import write_app

RUN = {"rounds": 2, "num-classes": 4, "epsilon": 8.0, "out": "/srv/run", "resume": False}


def honest_app(tmp_path: Path) -> Path:
    return write_app(tmp_path / "app", RUN)


def edit_pyproject(app: Path, old: str, new: str) -> Path:
    path = app / "pyproject.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return app


def hand_made(files: list[tuple[str, bytes]], manifest: str | None = None, mode=None) -> bytes:
    """A zip with ``files`` (in order, duplicates allowed) and a manifest of the first."""
    if manifest is None:
        name, data = files[0]
        manifest = f"{name},{hashlib.sha256(data).hexdigest()},{len(data) * 8}"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in [*files, (".info/CONTENT", manifest.encode())]:
            info = zipfile.ZipInfo(name)
            if mode is not None and name == "pyproject.toml":
                info.external_attr = mode << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def refusal(fab: bytes) -> str:
    with pytest.raises(BundleRefused) as caught:
        check_bundle(fab)
    return str(caught.value)


def test_ferry_servers_code_free_bundle_passes_with_its_config(tmp_path):
    checked = check_bundle(build_fab_from_disk(honest_app(tmp_path)))
    assert checked.components == {
        "serverapp": "ferry.server.app:app",
        "clientapp": "ferry.client.app:app",
    }
    assert checked.config["rounds"] == 2 and checked.config["out"] == "/srv/run"


def test_bundle_with_an_extra_module_is_refused_naming_the_files(tmp_path):
    app = edit_pyproject(honest_app(tmp_path), '"ferry.client.app:app"', '"evil:app"')
    (app / "evil.py").write_text("import os\nos.system('id')\n")
    (app / "notes.md").write_text("not code, but not Ferry's bundle either\n")
    why = refusal(build_fab_from_disk(app))
    assert why == "refused a bundle that carries code: evil.py, notes.md"


def test_bundle_shadowing_the_installed_client_app_is_refused(tmp_path):
    app = honest_app(tmp_path)  # Ferry's component names, but it ships client/app.py
    (app / "client").mkdir()
    (app / "client" / "__init__.py").write_text("")
    (app / "client" / "app.py").write_text("raise SystemExit('shadowed')\n")
    assert refusal(build_fab_from_disk(app)) == (
        "refused a bundle that carries code: client/__init__.py, client/app.py"
    )


@pytest.mark.parametrize(
    "old, new, why",
    [
        ('"ferry.client.app:app"', '"ferry.simulations.bench.noop_client:app"', "components are"),
        ('"ferry.server.app:app"', '"evil_server:app"', "components are"),
        (
            'clientapp = "ferry.client.app:app"',
            'clientapp = "ferry.client.app:app"\nagentapp = "ferry.client.app:app"',
            "components are",
        ),
        ("dependencies = []", 'dependencies = ["evil-package"]', "asks for dependencies"),
        ('build-backend = "setuptools.build_meta"', 'build-backend = "hook"', "build backend"),
        (
            'build-backend = "setuptools.build_meta"',
            'build-backend = "setuptools.build_meta"\nbackend-path = ["."]',
            "[build-system.backend-path]",
        ),
        ("[tool.flwr.app]", "[tool.setuptools]\npy-modules = []\n\n[tool.flwr.app]", "[tool.setup"),
        ('license = "Apache-2.0"', 'license = "Apache-2.0"\nscripts = {x = "y:z"}', "[project.sc"),
    ],
)
def test_pyproject_naming_other_code_or_hooks_is_refused(tmp_path, old, new, why):
    app = edit_pyproject(honest_app(tmp_path), old, new)
    fab = build_fab_from_disk(app) if "backend-path" not in new else _rebuild(app)
    assert why in refusal(fab)


def _rebuild(app: Path) -> bytes:
    """Flower's builder rejects some keys itself; a hostile operator zips by hand."""
    return hand_made([("pyproject.toml", (app / "pyproject.toml").read_bytes())])


@pytest.mark.filterwarnings("ignore:Duplicate name")  # the hostile zip is the point
def test_hand_made_bundles_that_hide_files_are_refused(tmp_path):
    pyproject = (honest_app(tmp_path) / "pyproject.toml").read_bytes()
    assert check_bundle(hand_made([("pyproject.toml", pyproject)])).config["rounds"] == 2
    lying = hand_made([("pyproject.toml", pyproject)], manifest="pyproject.toml,00,8")
    assert "does not list exactly pyproject.toml" in refusal(lying)
    twice = hand_made([("pyproject.toml", pyproject), ("pyproject.toml", b"[project]\n")])
    assert "duplicate entries" in refusal(twice)
    link = hand_made([("pyproject.toml", pyproject)], mode=stat.S_IFLNK | 0o777)
    assert "not a plain file" in refusal(link)
    folder = hand_made([("pyproject.toml", pyproject), ("client/", b"")])
    assert refusal(folder) == "refused a bundle that carries code: client/"
    assert "without pyproject.toml" in refusal(hand_made([], manifest=""))
    assert "not a Flower app bundle" in refusal(b"#!/bin/sh\necho not a zip\n")
    assert "bytes" in refusal(b"\0" * (MAX_BUNDLE_BYTES + 1))
    assert "not TOML" in refusal(hand_made([("pyproject.toml", b"[project\n")]))
