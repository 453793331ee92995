"""Files only this user can read: mode 0600, in directories of mode 0700.

What an institution keeps next to its data is as sensitive as the data: extracted features
(a model inverts them), received backbones, the privacy state, the receipt chain, the
held-out split and its secret salt. Another local user must not read any of it, so every
such file is created with mode 0600 *from its first byte* (never chmod-ed after being
written) and every directory Ferry creates for them gets mode 0700.

A directory that already exists is never chmod-ed: it belongs to whoever made it (a shared
``/data`` or a home directory), and changing its mode could break others' access to it.
:func:`shared_dir_warning` says when such a directory lets other users in, so the user can
decide.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ferry.common.atomic_files import write_atomic

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def private_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` and each missing parent with mode 0700; leave existing ones as they
    are. Raises OSError as ``os.mkdir`` does (a file in the way, no permission)."""
    path = Path(path)
    missing = []
    for parent in (path, *path.parents):
        if parent.is_dir():
            break
        missing.append(parent)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_DIR)  # the umask can only take bits away
        except FileExistsError:
            if not directory.is_dir():
                raise
    return path


def shared_dir_warning(path: str | os.PathLike, what: str) -> str | None:
    """A one-line warning when the existing directory ``path`` lets other users in."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    if not mode & 0o077:
        return None
    return (
        f"ferry: WARNING: {what} {path} is open to other users (mode {mode:04o}); its "
        f"secrets are 0600, but consider `chmod 700 {path}`"
    )


def open_private(path: str | os.PathLike, flags: int = os.O_WRONLY | os.O_TRUNC) -> int:
    """``os.open`` that creates ``path`` with mode 0600 if it does not exist."""
    return os.open(path, flags | os.O_CREAT, PRIVATE_FILE)


def write_private(path: str | os.PathLike, data: bytes, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` (0600, parent made 0700 if missing) atomically and durably
    (:func:`common.atomic_files.write_atomic`); ``exclusive``: an existing file (a concurrent
    writer's) is kept. Raises OSError."""
    path = Path(path)
    private_dir(path.parent)
    try:
        write_atomic(path, data, mode=PRIVATE_FILE, exclusive=exclusive)
    except FileExistsError:
        if not exclusive:
            raise
