"""The distribution installs one import name, ``ferry``, beside anyone's own code.

Before, the wheel installed four generic top-level packages (``common``, ``client``, ``server``,
``simulations``): in any folder holding a ``server.py`` (as Flower's quickstarts do) ``import
server.app`` found the user's file, and there was no ``import ferry`` at all. These tests build
the real wheel from this checkout and install it, without its dependencies, into a fresh venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("common", "client", "server", "simulations")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the sources: setuptools reuses an in-tree build/ that can hold stale modules.
    source = tmp_path_factory.mktemp("source") / "ferry"
    ignore = shutil.ignore_patterns(".*", "build", "runs", "*.egg-info", "__pycache__", "tests")
    shutil.copytree(REPO, source, ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("ferry_fl-*.whl")
    return path


def test_wheel_holds_one_top_level_package_ferry_with_every_layer(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"ferry"}
    for folder in FOLDERS:  # the repository's folders become ferry.<folder>
        assert f"ferry/{folder}/__init__.py" in names
    for module in ("ferry/cli.py", "ferry/server/app.py", "ferry/client/app.py"):
        assert module in names
    # every module of the checkout is in the wheel, under its ferry name
    for folder in FOLDERS:
        for source in (REPO / folder).rglob("*.py"):
            assert f"ferry/{source.relative_to(REPO).as_posix()}" in names, source
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "ferry = ferry.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_installed_ferry_imports_from_a_folder_holding_server_client_and_common(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # PYTHONPATH and friends from the test process (Ray sets some) reach neither pip (which
    # would find this checkout's egg-info and install nothing) nor the probe.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        env=env,
    )
    project = tmp_path / "quickstart"
    project.mkdir()
    for name in ("server.py", "client.py", "common.py"):  # a user's own Flower project
        (project / name).write_text(f"WHO = {name!r}\n")
    probe = (
        "import importlib.util, ferry, server, client, common\n"
        "print(ferry.__version__)\n"
        "print(server.WHO, client.WHO, common.WHO)\n"
        "print(importlib.util.find_spec('ferry.server').origin)\n"
        "print(importlib.util.find_spec('simulations'))\n"
    )
    done = subprocess.run(
        [python, "-c", probe], cwd=project, capture_output=True, text=True, check=True, env=env
    )
    version, users, origin, simulations = done.stdout.splitlines()
    assert version == "0.1.0"
    assert users == "server.py client.py common.py"  # the user's files still win their names
    assert origin.startswith(str(env_dir)) and origin.endswith("ferry/server/__init__.py")
    assert simulations == "None"  # no generic top-level name installed
