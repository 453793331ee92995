"""The client's backbone cache: verified artifacts stored by sha256.

``<cache_dir>/backbones/<sha256>/{backbone.safetensors,manifest.json}``. Every load from disk
verifies the content hash again; an entry that fails is moved aside (``.corrupt-*``) and
reported as absent, so the server re-ships it. Verified trunks are kept in memory per
process (a simulation worker serving many rounds loads each backbone once); the in-memory
copy is the verified one, so later changes to the files only matter to a new process.
Its directories are 0700 and its files 0600 (:mod:`common.private_files`): which backbone an
institution holds is its own business.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from torch import nn

from ferry.common.backbones.registry import backbone_spec
from ferry.common.errors import FerryError
from ferry.common.private_files import private_dir
from ferry.common.serialization import (
    BackboneArtifact,
    instantiate,
    load_artifact,
    save_artifact,
    verify,
)

_LOADED: dict[tuple[str, str], tuple[BackboneArtifact, nn.Module]] = {}


class BackboneCache:
    def __init__(self, cache_dir: str | os.PathLike):
        self.root = Path(cache_dir) / "backbones"

    def path(self, sha256: str) -> Path:
        if not (len(sha256) == 64 and all(c in "0123456789abcdef" for c in sha256)):
            raise FerryError(f"not a sha256 backbone id: {sha256!r}")
        return self.root / sha256

    def has(self, sha256: str) -> bool:
        """True only if a copy whose content hashes to ``sha256`` is stored here."""
        if (str(self.root), sha256) in _LOADED:
            return True
        if not self.path(sha256).exists():
            return False
        try:
            self.load(sha256)
            return True
        except FerryError:
            corrupt = self.path(sha256).with_name(f".corrupt-{sha256[:12]}-{time.time_ns()}")
            os.replace(self.path(sha256), corrupt)
            return False

    def store(self, manifest: dict, tensors: dict[str, np.ndarray], sha256: str) -> None:
        """Verify a received backbone against ``sha256`` and store it; refuse it otherwise."""
        artifact = BackboneArtifact(manifest, tensors)
        verify(artifact, sha256)
        # Its code must be here (a name by import path: installed and trusted), else refuse
        # now, naming what to install, rather than at the first round.
        backbone_spec(str(manifest.get("architecture", "")))
        save_artifact(artifact, private_dir(self.path(sha256)), private=True)

    def load(self, sha256: str) -> tuple[BackboneArtifact, nn.Module]:
        """The verified artifact and its frozen, eval-mode trunk."""
        key = (str(self.root), sha256)
        if key not in _LOADED:
            if not self.path(sha256).exists():
                raise FerryError(f"backbone {sha256[:12]} is not in the cache at {self.root}")
            artifact = load_artifact(self.path(sha256), expected_sha256=sha256)
            _LOADED[key] = (artifact, instantiate(artifact))
        return _LOADED[key]
