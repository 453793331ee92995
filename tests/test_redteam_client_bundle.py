"""Attack tests: the operator crafts bundles that break the institution's check in other ways
than carrying code.

Each refusal is written to the institution's ``supernode.log`` and echoed by ``ferry client``
(lines starting ``ferry: refused``), so a name the operator chooses must not forge lines
there or flood them; and a bundle the zip or TOML reader chokes on must be a refusal
(:class:`BundleRefused`), like every other, not an exception of another kind.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from ferry.client.bundle_check import BundleRefused, check_bundle
from ferry.server.superlink import write_app

FORGED = "ferry: refused nothing: this line was written by the operator"
# A refusal is one log line; well under this many characters.
LINE_BOUND = 1000


def ferry_pyproject(tmp_path: Path) -> bytes:
    fab = build_fab_from_disk(write_app(tmp_path / "app", {"rounds": 2}))
    return zipfile.ZipFile(io.BytesIO(fab)).read("pyproject.toml")


def bundle(files: list[tuple[str, bytes]]) -> bytes:
    """A zip of ``files`` and a manifest that lists the first one truly."""
    name, data = files[0]
    manifest = f"{name},{hashlib.sha256(data).hexdigest()},{len(data) * 8}"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for entry, content in [*files, (".info/CONTENT", manifest.encode())]:
            archive.writestr(zipfile.ZipInfo(entry), content)
    return buffer.getvalue()


def refusal(fab: bytes) -> str:
    with pytest.raises(BundleRefused) as caught:
        check_bundle(fab)
    return str(caught.value)


def assert_one_bounded_line(text: str) -> None:
    assert "\n" not in text and "\r" not in text, text
    assert text.isascii() and text.isprintable(), text
    assert len(text) <= LINE_BOUND, len(text)


def test_entry_names_cannot_forge_log_lines(tmp_path):
    py = ferry_pyproject(tmp_path)
    why = refusal(bundle([("pyproject.toml", py), (f"x.py\n{FORGED}\r\x1b[2K", b"")]))
    assert_one_bounded_line(why)
    assert "carries code" in why and "x.py" in why


def test_pyproject_keys_cannot_forge_log_lines(tmp_path):
    py = ferry_pyproject(tmp_path)
    hostile = py.replace(b"[tool.flwr.app]", f'"a\\n{FORGED}" = 1\n\n[tool.flwr.app]'.encode())
    assert hostile != py
    why = refusal(bundle([("pyproject.toml", hostile)]))
    assert_one_bounded_line(why)


def test_huge_names_cannot_flood_the_log(tmp_path):
    py = ferry_pyproject(tmp_path)
    names = [(f"{k}{'A' * 60000}.py", b"") for k in range(7)]  # ~420 KB of names
    why = refusal(bundle([("pyproject.toml", py), *names]))
    assert_one_bounded_line(why)
    assert "carries code" in why


def test_an_entry_flagged_encrypted_is_a_refusal(tmp_path):
    fab = bytearray(bundle([("pyproject.toml", ferry_pyproject(tmp_path))]))
    local = fab.find(b"PK\x03\x04")  # the first entry, pyproject.toml: set "encrypted" (bit 0)
    central = fab.find(b"PK\x01\x02")
    fab[local + 6] |= 1
    fab[central + 8] |= 1
    why = refusal(bytes(fab))
    assert "pyproject.toml" in why
    assert_one_bounded_line(why)


def test_toml_nested_past_the_parsers_stack_is_a_refusal(tmp_path):
    py = ferry_pyproject(tmp_path)
    nested = b"deep = " + b"[" * 5000 + b"]" * 5000 + b"\n"
    hostile = py.replace(b"[tool.flwr.app.config]\n", b"[tool.flwr.app.config]\n" + nested)
    assert hostile != py
    why = refusal(bundle([("pyproject.toml", hostile)]))
    assert "pyproject.toml" in why
    assert_one_bounded_line(why)
