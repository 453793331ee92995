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
import secrets
import stat
from pathlib import Path

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


def private_temp(directory: Path, name: str) -> Path:
    """A new, empty 0600 file in ``directory`` under a name no other writer can share."""
    tmp = directory / f"{name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
    return tmp


def write_private(path: str | os.PathLike, data: bytes, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` (0600, parent made 0700 if missing) through a fsynced
    temporary file renamed over it; ``exclusive``: linked instead, so that an existing file
    (a concurrent writer's) is kept. Raises OSError."""
    path = Path(path)
    private_dir(path.parent)
    tmp = private_temp(path.parent, path.name)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
