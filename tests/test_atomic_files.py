"""One helper writes every file Ferry replaces whole (common.atomic_files): what it promises.

A failed write leaves the old file (its bytes and its mode) and no temporary file; the mode
is the final one before the first byte; an exclusive write never replaces; the rename is made
durable (file fsynced before it, directory after it); and no product module renames or links
files itself any more.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from ferry.common import atomic_files
from ferry.common.atomic_files import atomic_path, write_atomic

ROOT = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_write_that_raises_leaves_the_old_file_its_mode_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    os.chmod(target, 0o640)
    with pytest.raises(RuntimeError), atomic_path(target, mode=0o600) as tmp:
        tmp.write_text("half a fi")
        raise RuntimeError("disk full")
    with pytest.raises(TypeError):
        write_atomic(target, object())  # the data cannot even be written
    assert target.read_text() == "old"
    assert _mode(target) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_the_file_has_its_mode_before_its_first_byte_whatever_the_umask(tmp_path):
    seen = []
    old = os.umask(0o077)  # a private umask must not strip a public certificate's bits
    try:
        with atomic_path(tmp_path / "ca.pem", mode=0o644) as tmp:
            seen.append((tmp.stat().st_size, _mode(tmp)))
            tmp.write_bytes(b"cert")
        write_atomic(tmp_path / "key", b"secret", mode=0o600)
    finally:
        os.umask(old)
    assert seen == [(0, 0o644)]
    assert _mode(tmp_path / "ca.pem") == 0o644 and _mode(tmp_path / "key") == 0o600
    assert (tmp_path / "ca.pem").read_bytes() == b"cert"


def test_an_exclusive_write_never_replaces_an_existing_file(tmp_path):
    key = tmp_path / "server.key"
    write_atomic(key, b"first", mode=0o600, exclusive=True)
    with pytest.raises(FileExistsError):
        write_atomic(key, b"second", mode=0o600, exclusive=True)
    assert key.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["server.key"]


def test_the_data_is_fsynced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    target = tmp_path / "ledger.head"
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(f"fsync {kind}")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(atomic_files.os, "fsync", fsync)
    monkeypatch.setattr(atomic_files.os, "replace", replace)
    write_atomic(target, '{"seq": 0}')
    assert events == ["fsync file", "rename", "fsync dir"]
    assert target.read_text() == '{"seq": 0}'


# Renaming or linking a file into place is atomic_files' job; these move whole directories.
_MOVES_A_DIRECTORY = {
    ("client/backbone_cache.py", "os.replace(self.path(sha256), corrupt)"),  # set aside
    ("simulations/bench/kcurve_plan.py", "partial.rename(data)"),  # a finished data folder
    ("server/model_export.py", "os.rename(tmp, out)"),  # a finished model folder
}
_OWN_WRITE = re.compile(r"os\.replace\(|os\.rename\(|os\.link\(|NamedTemporaryFile|\.rename\(")


def test_no_product_module_writes_a_file_into_place_itself():
    offenders = []
    for folder in ("common", "client", "server", "simulations", "ferry"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            if name == "common/atomic_files.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if (name, line.strip()) in _MOVES_A_DIRECTORY or "rename(columns=" in line:
                    continue  # a directory, or a pandas frame
                if _OWN_WRITE.search(line):
                    offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders, "use common.atomic_files:\n" + "\n".join(offenders)
