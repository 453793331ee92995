"""Atomic file writes: a reader sees the old file or the new one, never a torn one.

Every file Ferry replaces as a whole (``summary.json``, ``ledger.head``, checkpoints, tuning
records, backbone artifacts, keys, the privacy state, cached features) is written the same
way, by :func:`atomic_path` or :func:`write_atomic`:

1. a temporary file is created next to the target under a name no other writer can share
   (``<name>.<pid>.<random><suffix>``), with its final mode from the first byte (never
   chmod-ed after data is in it);
2. the caller's data is written into it and fsynced;
3. it is renamed over the target (``exclusive``: hard-linked instead, so an existing target
   is kept and :class:`FileExistsError` raised), and the directory is fsynced so that the
   rename survives a power loss.

If anything fails before step 3 the target is untouched; the temporary file is removed
whatever happens. A crash (no ``finally``) can leave a temporary file behind: readers look
only at the target's own name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike,
    *,
    mode: int | None = None,
    exclusive: bool = False,
    suffix: str = ".tmp",
) -> Iterator[Path]:
    """Yield an empty temporary file beside ``path`` for the caller to write (by name, e.g.
    ``np.save`` or ``safetensors``); when the block ends without an exception, fsync it,
    move it onto ``path`` and fsync the directory.

    ``mode``: the file's exact permission bits (None: 0o666 less the umask, as ``open``
    gives); writers that reopen the temporary file by name keep it. ``exclusive``: never
    replace an existing ``path`` (FileExistsError, the existing file kept). ``suffix``: the
    temporary name's ending (a writer such as ``np.save`` may insist on one). The parent
    directory must exist. Raises OSError."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(6)}{suffix}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)  # the umask could only have taken bits away
        finally:
            os.close(fd)
        yield tmp
        _fsync_file(tmp)
        if exclusive:
            os.link(tmp, path)  # FileExistsError when present: the first writer wins
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(
    path: str | os.PathLike,
    data: bytes | str,
    *,
    mode: int | None = None,
    exclusive: bool = False,
) -> Path:
    """Replace ``path`` with ``data`` (str: UTF-8) atomically and durably, as
    :func:`atomic_path` describes; returns ``path``. Raises OSError (FileExistsError when
    ``exclusive`` and ``path`` exists)."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    with atomic_path(path, mode=mode, exclusive=exclusive) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:  # fsync flushes the file, whichever descriptor asks
        os.fsync(f.fileno())


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename (or link) in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
