"""Objects named by import path, ``package.module:attribute``: the user's own code.

Backbones (:mod:`common.backbones.registry`, which also decides which paths a process may
import) and aggregation rules (:mod:`server.aggregation`, the operator's server only) are
named this way. Importing a module runs its code; each caller decides whether it trusts the
path before calling :func:`import_object`.
"""

from __future__ import annotations

import importlib
import re

from ferry.common.errors import FerryError

# Matched whole (fullmatch): no trailing newline or space slips through.
IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class CodeFailed(FerryError):
    """The named code is missing or broke while importing. Its message may quote the
    module's own error (paths, settings): a deployed institution keeps it in its own log."""


def is_import_path(name: str) -> bool:
    return ":" in str(name)


def import_object(path: str, what: str) -> object:
    """The object at ``path``; a one-line :class:`FerryError` saying what to fix if the path
    is malformed, its module does not import, or it names nothing. ``what``: "backbone", ..."""
    if not IMPORT_PATH.fullmatch(str(path)):
        raise FerryError(f"{what} {path!r} is not an import path: write package.module:name")
    module_name, attribute = path.split(":")
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise CodeFailed(
            f"{what} {path!r} does not import here ({exc}): install the package that provides "
            f"{module_name}, or put it on PYTHONPATH"
        ) from None
    except Exception as exc:  # the user's module failed while importing
        raise CodeFailed(
            f"{what} {path!r}: importing {module_name} failed "
            f"({type(exc).__name__}: {str(exc)[:200]}): fix that module"
        ) from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise FerryError(
                f"{what} {path!r}: {module_name} has no {attribute!r}: check the name after "
                "the colon"
            )
        target = getattr(target, part)
    return target
