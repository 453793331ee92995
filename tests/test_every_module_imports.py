"""Every module of the installed ``ferry`` package imports, in the fast subset too.

``make test-fast`` (``pytest -m "not slow"``) leaves out the end-to-end runs; this test keeps
every module, the launchers, benchmarks and optional-data loaders included, imported by it, so
a broken import or a renamed symbol fails in seconds rather than only in CI's slow half.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest

# The editable install maps ``ferry.common`` and its siblings onto the repository's own folders,
# so ``ferry.__path__`` holds only ``ferry/``: each layer is walked from its own package.
LAYERS = ("ferry", "ferry.common", "ferry.client", "ferry.server", "ferry.simulations")


def _ferry_modules() -> list[str]:
    names = set(LAYERS)
    for layer in LAYERS:
        package = importlib.import_module(layer)
        names |= {m.name for m in pkgutil.walk_packages(package.__path__, prefix=f"{layer}.")}
    return sorted(names)


def test_the_walk_finds_every_layer():
    names = _ferry_modules()
    for module in ("ferry.cli", "ferry.common.config", "ferry.client.app", "ferry.server.app"):
        assert module in names
    assert any(name.startswith("ferry.simulations.bench.") for name in names)


@pytest.mark.parametrize("name", _ferry_modules())
def test_module_imports(name):
    importlib.import_module(name)
