"""Ferry: privacy-preserving federated transfer learning on Flower and Opacus.

One import name over the repository's folders: ``ferry.common`` (the shared model, data and
privacy layer), ``ferry.client`` (an institution's side), ``ferry.server`` (the operator's
side), ``ferry.simulations`` (many virtual institutions on one machine) and ``ferry.cli``
(the ``ferry`` command, the front door above them all).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ferry-fl")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "Run", "backbone", "load_model", "simulate"]


def __getattr__(name: str):
    """The API (:mod:`ferry.api`), imported on first use: ``import ferry`` loads no torch."""
    if name in ("Run", "load_model", "simulate"):
        from ferry import api

        return getattr(api, name)
    if name == "backbone":  # the decorator for a backbone named by import path
        from ferry.common.backbones.registry import backbone

        return backbone
    raise AttributeError(f"module 'ferry' has no attribute {name!r}")
