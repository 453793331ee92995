"""A backbone from the user's own ``nn.Module``: ``ferry.simulate(backbone=net, split="fc")``.

The frozen trunk is ``net`` run up to the module named ``split``: what ``split`` would
receive, flattened, is the feature vector; ``split`` and everything after it are replaced by
Ferry's trainable head (DP-SGD trains the head only). Any forward pass works (a torchvision
ResNet, a timm model, the user's own class): the trunk stops it when it reaches ``split``.

The trunk's weights become an ordinary backbone artifact (safetensors + manifest, hashed).
Its code is the user's object: in simulation it reaches each Ray worker as a pickle of the
module written by the researcher's own process (:func:`save_module`), checked against its
sha256 before it is loaded (:func:`register_saved_module`). Deployments never load pickles:
they name backbones by import path (:mod:`common.backbones.registry`).
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ferry.common.backbones.registry import BackboneSpec, register_spec
from ferry.common.errors import FerryError
from ferry.common.private_files import write_private

MODULE_FILE = "module.pickle"
PREFIX = "own/"
MODALITY_BY_RANK = {3: "image", 1: "tabular"}


class _Reached(Exception):
    def __init__(self, value: torch.Tensor):
        self.value = value


class UpTo(nn.Module):
    """``net``'s forward pass up to (not into) its submodule ``split``; returns the input
    ``split`` would get, flattened to ``(n, features)``."""

    def __init__(self, net: nn.Module, split: str):
        super().__init__()
        modules = dict(net.named_modules())
        if not split or split not in modules:
            names = [name for name in modules if name and "." not in name]
            raise FerryError(
                f"split {split!r} names no module of {type(net).__name__}: name the module "
                f"the trainable head replaces, one of {', '.join(names[:12]) or '(none)'}"
            )
        self.net = net
        self.split = split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def stop(_module, args):
            raise _Reached(args[0])

        handle = self.net.get_submodule(self.split).register_forward_pre_hook(stop)
        try:
            self.net(x)
        except _Reached as reached:
            return reached.value.flatten(1)
        finally:
            handle.remove()
        raise FerryError(
            f"{type(self.net).__name__}'s forward pass never reached {self.split!r}: split at "
            "a module the forward pass calls"
        )


def own_name(net: nn.Module, split: str) -> str:
    """The architecture name of ``net`` cut at ``split``: class, split and a digest of its
    tensors' names, shapes and dtypes (a same-class module built differently differs)."""
    layout = hashlib.sha256(
        repr([(k, tuple(v.shape), str(v.dtype)) for k, v in net.state_dict().items()]).encode()
    ).hexdigest()[:12]
    return f"{PREFIX}{type(net).__name__}@{split}/{layout}"


def trunk_of(net: nn.Module, split: str, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """The frozen trunk (one named stage, as :func:`common.trainable.split_model` expects) and
    its feature width, found by running it once on zeros of ``input_shape``."""
    trunk = nn.Sequential(OrderedDict(trunk=UpTo(copy.deepcopy(net).cpu(), split)))
    trunk.requires_grad_(False).eval()
    try:
        with torch.no_grad():
            features = trunk(torch.zeros(2, *input_shape))
    except FerryError:
        raise
    except Exception as exc:
        raise FerryError(
            f"{type(net).__name__} does not run on inputs of shape {tuple(input_shape)} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}): give data shaped as "
            "the module expects"
        ) from None
    return trunk, int(features.shape[1])


def register_module(net: nn.Module, split: str, input_shape: tuple[int, ...]) -> BackboneSpec:
    """Register ``net`` cut at ``split`` as a backbone of this process; its spec."""
    if not isinstance(net, nn.Module):
        raise FerryError(
            f"backbone must be a torch.nn.Module or a backbone name, not {type(net).__name__}"
        )
    input_shape = tuple(int(d) for d in input_shape)
    modality = MODALITY_BY_RANK.get(len(input_shape))
    if modality is None:
        raise FerryError(
            f"examples of shape {input_shape} are neither images (c, h, w) nor table "
            "rows (d,): reshape the arrays"
        )
    template, width = trunk_of(net, split, input_shape)  # a copy: later edits to net miss it

    def build(_shape: tuple[int, ...] = input_shape) -> nn.Module:
        return copy.deepcopy(template)

    spec = BackboneSpec(
        own_name(net, split),
        width,
        input_shape,
        {"kind": modality},  # the arrays are the module's inputs, as given
        build,
        modality,
        description=f"your {type(net).__name__}, frozen up to {split}",
    )
    return register_spec(spec)


def pickled(spec: BackboneSpec) -> bytes:
    """``spec`` (its trunk, code and weights) for the researcher's own Ray workers."""
    import cloudpickle  # the user's class may live in __main__: pickled by value

    return cloudpickle.dumps(spec)


def code_digest(net: nn.Module) -> str:
    """sha256 of what ``net`` computes beyond its weights: its class's source (else the
    class pickled by value) and its module tree. In the manifest, so editing ``forward``
    makes a new backbone hash (and new cached features), not a stale reuse."""
    import inspect

    import cloudpickle

    try:
        code = inspect.getsource(type(net)).encode()
    except (OSError, TypeError):  # e.g. a class typed into a notebook
        code = cloudpickle.dumps(type(net))
    return hashlib.sha256(code + repr(net).encode()).hexdigest()


def save_module(data: bytes, folder: Path) -> str:
    """Write :func:`pickled`'s bytes beside the artifact (0600); their sha256."""
    write_private(Path(folder) / MODULE_FILE, data)
    return hashlib.sha256(data).hexdigest()


_LOADED: set[str] = set()


def register_saved_module(folder: str, sha256: str) -> None:
    """Register the trunk :func:`save_module` wrote, in this (worker) process, once; a pickle
    whose bytes do not hash to ``sha256`` is refused before it is loaded."""
    if sha256 in _LOADED:
        return
    import cloudpickle

    data = (Path(folder) / MODULE_FILE).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise FerryError(
            f"the module backbone at {folder} changed after the run started: run it again"
        )
    register_spec(cloudpickle.loads(data))  # noqa: S301  (written by this run's own process)
    _LOADED.add(sha256)
