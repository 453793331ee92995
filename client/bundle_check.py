"""The institution's check of a Flower app bundle (FAB): it must carry no code.

Ferry's federation bundle (``server.superlink.write_app``) holds one ``pyproject.toml`` that
names the Ferry apps installed on each machine (``serverapp = "ferry.server.app:app"``,
``clientapp = "ferry.client.app:app"``) and carries the run config. ``flwr build`` adds one
metadata file, ``.info/CONTENT`` (one ``path,sha256,size_in_bits`` line per file). Anything
else in a bundle is something the operator (or whoever reached the Control API) wants to run
at the institution, so :func:`check_bundle` refuses it, working on the bundle's bytes only:
nothing is unpacked, imported or executed here.

A bundle passes when

* it is a zip of at most :data:`MAX_BUNDLE_BYTES`, its entries are exactly
  :data:`BUNDLE_FILES` (no other file, folder, duplicate name or link);
* ``.info/CONTENT`` lists exactly ``pyproject.toml`` with its true hash and size;
* ``pyproject.toml`` is TOML with only the keys a code-free app needs
  (:data:`ALLOWED_KEYS`: no build hooks such as ``backend-path``, no dependencies, no
  ``[tool]`` section but ``tool.flwr.app``), and its components are exactly
  :data:`FERRY_COMPONENTS`.

The run config (``[tool.flwr.app.config]``) is data, checked by the ClientApp like any other
setting the server sends.

Every refusal is one line of printable ASCII of bounded length (:class:`BundleRefused`): it goes to
the institution's ``supernode.log`` and terminal, so names the sender chose (newlines, control
characters, half a megabyte of name) must not forge or flood lines there. A bundle that breaks
the zip or TOML reader in other ways (an encrypted entry, TOML nested thousands deep) is a
refusal too, never another exception.
"""

from __future__ import annotations

import hashlib
import io
import stat
import tomllib
import zipfile
from dataclasses import dataclass

from ferry.common.errors import FerryError

PYPROJECT = "pyproject.toml"
CONTENT = ".info/CONTENT"
BUNDLE_FILES = frozenset({PYPROJECT, CONTENT})
# The apps installed with Ferry, under the names Ferry's server gives them.
FERRY_COMPONENTS = {"serverapp": "ferry.server.app:app", "clientapp": "ferry.client.app:app"}
# Ferry's bundle is well under 10 KiB; the bound keeps a zip bomb from costing memory.
MAX_BUNDLE_BYTES = 1 << 20
# A refusal quotes at most MAX_SHOWN_NAMES names of MAX_SHOWN_CHARS, in one line of at most
# MAX_REFUSAL_CHARS: it is written to the institution's log and terminal.
MAX_SHOWN_NAMES = 5
MAX_SHOWN_CHARS = 80
MAX_REFUSAL_CHARS = 600
# Table path -> the keys it may hold (a key not listed is refused with its path).
ALLOWED_KEYS: dict[str, frozenset[str]] = {
    "": frozenset({"build-system", "project", "tool"}),
    "build-system": frozenset({"requires", "build-backend"}),
    "project": frozenset({"name", "version", "description", "license", "dependencies"}),
    "tool": frozenset({"flwr"}),
    "tool.flwr": frozenset({"app"}),
    "tool.flwr.app": frozenset({"publisher", "components", "config"}),
}


class BundleRefused(FerryError):
    """A bundle that must not run here; the message says why (for the log and the reply), as
    one line of printable ASCII of at most :data:`MAX_REFUSAL_CHARS`, whatever it quotes."""

    def __init__(self, message: str):
        line = message.encode("unicode_escape").decode("ascii")  # newlines, ESC, non-ASCII: escaped
        if len(line) > MAX_REFUSAL_CHARS:
            line = line[: MAX_REFUSAL_CHARS - 3] + "..."
        super().__init__(line)


@dataclass(frozen=True)
class CheckedBundle:
    """What a code-free bundle holds: Ferry's component names and the run config."""

    components: dict[str, str]
    config: dict[str, object]


def _shown(names: list[str]) -> str:
    """Names the sender chose, clipped and counted (:class:`BundleRefused` escapes them)."""
    shown = []
    for name in names[:MAX_SHOWN_NAMES]:
        shown.append(name if len(name) <= MAX_SHOWN_CHARS else name[: MAX_SHOWN_CHARS - 3] + "...")
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _read_entries(fab: bytes) -> dict[str, bytes]:
    if len(fab) > MAX_BUNDLE_BYTES:
        raise BundleRefused(f"refused a bundle of {len(fab)} bytes (Ferry's is a few KiB)")
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise BundleRefused(f"refused a bundle that is not a Flower app bundle ({exc})") from None
    names = [info.filename for info in infos]
    extra = sorted(set(names) - BUNDLE_FILES)
    if extra:
        raise BundleRefused(f"refused a bundle that carries code: {_shown(extra)}")
    if len(names) != len(set(names)):
        raise BundleRefused("refused a bundle with duplicate entries (one name, two contents)")
    missing = sorted(BUNDLE_FILES - set(names))
    if missing:
        raise BundleRefused(f"refused a bundle without {', '.join(missing)}")
    entries = {}
    for info in infos:
        kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no type recorded (flwr build)
        if kind and kind != stat.S_IFREG:
            raise BundleRefused(f"refused a bundle whose {info.filename} is not a plain file")
        if info.file_size > MAX_BUNDLE_BYTES:
            raise BundleRefused(f"refused a bundle whose {info.filename} unpacks too large")
        try:
            entries[info.filename] = archive.read(info)
        # RuntimeError: an entry flagged encrypted (zipfile asks for a password)
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
            raise BundleRefused(
                f"refused a bundle whose {info.filename} is unreadable ({type(exc).__name__})"
            ) from None
    return entries


def _check_manifest(entries: dict[str, bytes]) -> None:
    """``.info/CONTENT`` names pyproject.toml alone, with its real sha256 and size."""
    pyproject = entries[PYPROJECT]
    expected = f"{PYPROJECT},{hashlib.sha256(pyproject).hexdigest()},{len(pyproject) * 8}"
    lines = entries[CONTENT].decode("utf-8", errors="replace").strip().splitlines()
    if lines != [expected]:
        listed = sorted(line.split(",", 1)[0] for line in lines)
        raise BundleRefused(
            f"refused a bundle whose manifest {CONTENT} does not list exactly pyproject.toml "
            f"with its hash (lists: {_shown(listed) or 'nothing'})"
        )


def _check_keys(table: dict, path: str = "") -> None:
    allowed = ALLOWED_KEYS.get(path)
    if allowed is None:
        return
    for key, value in table.items():
        where = f"{path}.{key}" if path else key
        if key not in allowed:
            raise BundleRefused(f"refused a bundle whose pyproject.toml has [{where}]")
        if where in ALLOWED_KEYS:
            if not isinstance(value, dict):
                raise BundleRefused(f"refused a bundle whose pyproject.toml {where} is no table")
            _check_keys(value, where)


def _check_pyproject(text: bytes) -> CheckedBundle:
    try:
        doc = tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BundleRefused(f"refused a bundle whose pyproject.toml is not TOML ({exc})") from None
    except RecursionError:  # arrays or tables nested deeper than the parser's stack
        raise BundleRefused("refused a bundle whose pyproject.toml nests too deep") from None
    _check_keys(doc)
    backend = doc.get("build-system", {}).get("build-backend", "setuptools.build_meta")
    if backend != "setuptools.build_meta":
        raise BundleRefused(f"refused a bundle that names the build backend {backend!r}")
    dependencies = doc.get("project", {}).get("dependencies", [])
    if dependencies != []:
        raise BundleRefused(f"refused a bundle that asks for dependencies: {dependencies!r}")
    app = doc.get("tool", {}).get("flwr", {}).get("app", {})
    components = app.get("components")
    if components != FERRY_COMPONENTS:
        wanted = ", ".join(f'{k} = "{v}"' for k, v in FERRY_COMPONENTS.items())
        raise BundleRefused(
            f"refused a bundle whose components are {components!r}: Ferry runs only the apps "
            f"installed here ({wanted})"
        )
    config = app.get("config", {})
    if not isinstance(config, dict):
        raise BundleRefused("refused a bundle whose [tool.flwr.app.config] is not a table")
    return CheckedBundle(components=dict(components), config=config)


def check_bundle(fab: bytes) -> CheckedBundle:
    """Check a bundle's bytes (see the module docstring); raise :class:`BundleRefused`."""
    entries = _read_entries(fab)
    _check_manifest(entries)
    return _check_pyproject(entries[PYPROJECT])
