"""Backbone artifacts: safetensors weights + a JSON manifest, identified by sha256.

On disk a backbone is a directory holding ``backbone.safetensors`` (never pickle) and
``manifest.json`` (architecture, feature dimension, input shape, preprocessing, how it was
pretrained, and ``sha256``). The identity ``sha256`` covers the manifest (without its own
``sha256`` field, as canonical JSON) and every tensor (name, dtype, shape, raw bytes, in name
order), so it does not depend on file layout and changes if any weight or any manifest field
does. A client never runs weights whose hash it did not verify.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ferry.common.atomic_files import atomic_path, write_atomic
from ferry.common.backbones.registry import backbone_spec
from ferry.common.errors import FerryError

FORMAT = "ferry-backbone/1"
WEIGHTS_FILE = "backbone.safetensors"
MANIFEST_FILE = "manifest.json"


@dataclass
class BackboneArtifact:
    """A verified backbone: its manifest (with ``sha256``) and its tensors as numpy arrays."""

    manifest: dict
    tensors: dict[str, np.ndarray]

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]

    @property
    def nbytes(self) -> int:
        return sum(int(t.nbytes) for t in self.tensors.values())


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def backbone_digest(manifest: dict, tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(canonical_json({k: v for k, v in manifest.items() if k != "sha256"}))
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name])
        h.update(canonical_json([name, t.dtype.str, list(t.shape)]))
        h.update(t.tobytes())
    return h.hexdigest()


def make_artifact(manifest: dict, module: nn.Module) -> BackboneArtifact:
    """Freeze ``module``'s state into an artifact with a fresh sha256."""
    tensors = {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}
    manifest = {**manifest, "format": FORMAT}
    manifest.pop("sha256", None)
    manifest["sha256"] = backbone_digest(manifest, tensors)
    return BackboneArtifact(manifest, tensors)


def verify(artifact: BackboneArtifact, expected_sha256: str | None = None) -> None:
    """Raise :class:`FerryError` unless the content hashes to the manifest's (and expected) sha."""
    actual = backbone_digest(artifact.manifest, artifact.tensors)
    claimed = artifact.manifest.get("sha256")
    if actual != claimed or (expected_sha256 is not None and actual != expected_sha256):
        raise FerryError(
            f"backbone hash mismatch: content hashes to {actual[:12]}, expected "
            f"{(expected_sha256 or claimed or '?')[:12]}; the weights were altered or corrupted, "
            "so they are refused (re-create them with `ferry pretrain`)"
        )


def save_artifact(
    artifact: BackboneArtifact, directory: str | os.PathLike, private: bool = False
) -> Path:
    """Write ``artifact`` into ``directory`` atomically (each file replaced only when complete,
    :mod:`common.atomic_files`). The weights are 0600 (as they always were); ``private``: the
    manifest too (a client's cache: which backbone it holds is its own business)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in artifact.tensors.items()}
    manifest = json.dumps(artifact.manifest, indent=2)
    with atomic_path(directory / WEIGHTS_FILE, mode=0o600) as tmp:
        save_file(tensors, str(tmp))
        write_atomic(directory / MANIFEST_FILE, manifest, mode=0o600 if private else None)
    return directory


def load_artifact(path: str | os.PathLike, expected_sha256: str | None = None) -> BackboneArtifact:
    """Load and verify a backbone directory (or its weights/manifest file)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    directory = path.parent if path.suffix in (".safetensors", ".json") else path
    weights, manifest_path = directory / WEIGHTS_FILE, directory / MANIFEST_FILE
    if not weights.is_file() or not manifest_path.is_file():
        raise FerryError(
            f"no backbone weights at {directory} (need {WEIGHTS_FILE} and {MANIFEST_FILE}): "
            f"run `ferry pretrain --out {directory}` or pass --weights random"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} manifest")
        tensors = load_file(str(weights))
    except (ValueError, SafetensorError, OSError) as exc:
        raise FerryError(
            f"backbone at {directory} is corrupt ({_first_line(exc)}): re-create it with "
            f"`ferry pretrain --out {directory}`"
        ) from None
    artifact = BackboneArtifact(manifest, tensors)
    verify(artifact, expected_sha256)
    return artifact


def instantiate(artifact: BackboneArtifact) -> nn.Module:
    """Build the manifest's architecture, load the verified weights, freeze it, eval mode."""
    arch = artifact.manifest.get("architecture", "")
    module = backbone_spec(arch).builder(tuple(artifact.manifest["input_shape"]))
    state = {k: torch.from_numpy(np.array(v)) for k, v in artifact.tensors.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        # torch's first line is a header; the next one names the tensor and its shapes.
        detail = next(
            (line.strip() for line in str(exc).splitlines()[1:] if line.strip()),
            _first_line(exc),
        )
        raise FerryError(
            f"weights do not match architecture {arch!r} ({detail[:200]}): "
            f"use weights produced for {arch} by `ferry pretrain --arch {arch}`"
        ) from None
    module.requires_grad_(False)
    return module.eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
