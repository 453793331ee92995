"""Trainable parts: which part of a pretrained model an institution trains, by name.

A backbone (an ``nn.Sequential`` of named stages, :mod:`common.backbones`) plus a task head
is split into a frozen **trunk** and a **tail** (:func:`split_model`). The trunk runs once
per example (the client caches its outputs, the *split-point activations*); every DP-SGD
step runs only the tail. Only the tail's trainable parameters are trained, clipped, noised,
sent and aggregated (:func:`trainable_state`, :func:`load_trainable_state`).

Parts (``TrainableSpec.kind``):

* ``head``: the tail is the head alone, on the backbone's features.
* ``last-block``: the tail is the backbone from ``BackboneSpec.last_stage`` on, all of it
  trainable, plus the head.
* ``conv-adapter``: the tail is the backbone from ``last_stage`` on, frozen, with a zero-init
  bottleneck adapter beside every Conv2d (:class:`common.adapters.ConvAdapter`), plus the head.
* ``lora``: the tail is the backbone from the first stage holding a LoRA target on, frozen,
  with every target Linear wrapped in LoRA (:class:`common.adapters.LoRALinear`), plus the
  head. Targets are ``fnmatch`` patterns on module names relative to the backbone (e.g.
  ``block11.self_attention.qlinear``), matched after the tail's ``nn.MultiheadAttention``
  layers are converted to :class:`common.adapters.DPAttention` (Opacus'
  ``DPMultiheadAttention`` layout).

Contract of a tail: every BatchNorm in it is a fixed affine map of its pretraining statistics
(:class:`common.adapters.FrozenBatchNorm`), so no statistic of an institution's data is
computed outside DP-SGD; it passes Opacus' module validation; at round 0 adapters and LoRA
add exactly zero, so the tail computes what the pretrained model computes. The trunk's
modules are never replaced or changed (the tail's stages are deep copies). Names in a tail
are the backbone's (``block11.mlp.0.lora_A.weight``); the head is ``output`` (for ``head``,
the tail *is* the head, whose names are unprefixed: ``weight``, ``bias``).
"""

from __future__ import annotations

import copy
import fnmatch
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ferry.common.adapters import (
    ConvAdapter,
    DPAttention,
    FrozenBatchNorm,
    LoRALinear,
    replace_module,
)
from ferry.common.backbones.registry import BackboneSpec
from ferry.common.errors import FerryError
from ferry.common.heads import build_head

TRAINABLE_PARTS = ("head", "lora", "conv-adapter", "last-block")
HEAD_NAME = "output"


@dataclass(frozen=True)
class TrainableSpec:
    """What an institution trains (see the module docstring)."""

    kind: str = "head"
    head: str = "linear"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()  # () = the backbone's default
    adapter_dim: int = 16

    def validate(self) -> TrainableSpec:
        if self.kind not in TRAINABLE_PARTS:
            raise FerryError(
                f"unknown trainable part {self.kind!r}: choose one of {', '.join(TRAINABLE_PARTS)}"
            )
        if self.lora_rank <= 0:
            raise FerryError(
                f"LoRA rank must be >= 1, got {self.lora_rank}: use e.g. --lora-rank 8"
            )
        if not self.lora_alpha > 0:
            raise FerryError(
                f"LoRA alpha must be > 0, got {self.lora_alpha}: use e.g. --lora-alpha 16"
            )
        if self.adapter_dim <= 0:
            raise FerryError(
                f"adapter bottleneck must be >= 1, got {self.adapter_dim}: use --adapter-dim 16"
            )
        return self


@dataclass
class SplitModel:
    """A backbone split for training: ``tail(trunk(x))`` is the model's output."""

    trunk: nn.Module  # frozen (requires_grad False), eval(); preprocessed input -> activations
    tail: nn.Module  # split-point activations -> outputs (logits / regression value)
    split: str  # name of the first backbone stage inside the tail; "" = the tail is the head


def split_model(
    backbone: nn.Sequential,
    spec: BackboneSpec,
    part: TrainableSpec,
    out_dim: int,
    seed: int = 0,
) -> SplitModel:
    """Split ``backbone`` (of architecture ``spec``) for training ``part`` with a head of
    ``out_dim`` outputs; adapters, LoRA and the head are initialised from ``seed``.
    Raises FerryError when the part does not apply to this backbone."""
    part.validate()
    stages = list(backbone.named_children())
    if not isinstance(backbone, nn.Sequential) or not stages:
        raise FerryError(
            f"backbone {spec.name} is not a sequence of named stages: rebuild it with its "
            "registered builder"
        )
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = build_head(part.head, spec.feature_dim, out_dim)
    if part.kind == "head":
        backbone.requires_grad_(False).eval()
        _check_opacus(head, spec, part)
        return SplitModel(backbone, head.eval(), "")

    names = [name for name, _ in stages]
    if HEAD_NAME in names:
        raise ValueError(f"backbone {spec.name} has a stage called {HEAD_NAME!r}")
    targets = _lora_targets(backbone, spec, part) if part.kind == "lora" else []
    if targets:  # the first stage holding a target
        split = next(name for name in names if any(t.split(".")[0] == name for t in targets))
    else:
        split = _last_stage(spec, part.kind, names)
    first = names.index(split)
    trunk = nn.Sequential(OrderedDict(stages[:first])).requires_grad_(False).eval()
    # Deep-copied together: the tail never shares a module or tensor with the trunk.
    body = copy.deepcopy(nn.Sequential(OrderedDict(stages[first:])))
    _freeze_statistics(body)
    body.requires_grad_(part.kind == "last-block")
    if part.kind == "conv-adapter":
        _add_conv_adapters(body, spec, part, generator)
    for name in targets:
        lora = LoRALinear(body.get_submodule(name), part.lora_rank, part.lora_alpha, generator)
        replace_module(body, name, lora)
    tail = nn.Sequential(OrderedDict([*body.named_children(), (HEAD_NAME, head)]))
    _check_opacus(tail, spec, part)
    return SplitModel(trunk, tail.eval(), split)


def trainable_state(tail: nn.Module) -> dict[str, np.ndarray]:
    """The arrays that travel: every parameter of ``tail`` that trains, by name (copies)."""
    return {
        name: p.detach().cpu().numpy().copy()
        for name, p in tail.named_parameters()
        if p.requires_grad
    }


def load_trainable_state(tail: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Set ``tail``'s trainable parameters to ``arrays`` (exactly the names and shapes of
    :func:`trainable_state`); FerryError naming what is missing, extra or mis-shaped."""
    params = {name: p for name, p in tail.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(arrays))
    extra = sorted(set(arrays) - set(params))
    shapes = [
        f"{k} {tuple(np.shape(arrays[k]))} (want {tuple(p.shape)})"
        for k, p in params.items()
        if k in arrays and tuple(np.shape(arrays[k])) != tuple(p.shape)
    ]
    problems = [
        f"{label} {_few(items)}"
        for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape:", shapes))
        if items
    ]
    if problems:
        raise FerryError(
            f"trainable arrays do not fit this model ({'; '.join(problems)}): server and "
            "clients must use the same backbone, input shape, trainable part, head, LoRA "
            "rank/targets and adapter size"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.as_tensor(np.asarray(arrays[name]), dtype=p.dtype))


def set_train_mode(tail: nn.Module) -> nn.Module:
    """Train mode only where something trains: every module whose subtree holds no trainable
    parameter (frozen layers, dropout, frozen norms) runs in eval mode, so the tail stays a
    deterministic function of its input and its trainable parameters."""
    tail.train()
    for module in tail.modules():
        if not any(p.requires_grad for p in module.parameters()):
            module.eval()
    return tail


# --- building blocks ------------------------------------------------------------------


def _last_stage(spec: BackboneSpec, kind: str, names: list[str]) -> str:
    if not spec.last_stage:
        raise FerryError(
            f"backbone {spec.name} has no last block to train with --trainable {kind}: "
            "use --trainable head"
        )
    if spec.last_stage not in names:
        raise FerryError(
            f"backbone {spec.name} has no stage {spec.last_stage!r} (stages: {_few(names)}): "
            "the backbone file does not match its architecture's registration; rebuild it"
        )
    return spec.last_stage


def _freeze_statistics(body: nn.Module) -> None:
    """Every BatchNorm in ``body`` becomes a fixed affine map of its pretraining statistics;
    every nn.MultiheadAttention becomes a DPAttention (same weights)."""
    for name, module in list(body.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            replace_module(body, name, FrozenBatchNorm(module))
        elif isinstance(module, nn.MultiheadAttention):
            replace_module(body, name, DPAttention(module))


def _add_conv_adapters(
    body: nn.Module, spec: BackboneSpec, part: TrainableSpec, generator: torch.Generator
) -> None:
    convs = [name for name, m in body.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise FerryError(
            f"backbone {spec.name} has no Conv2d from stage {spec.last_stage!r} on, so "
            "conv-adapter has nothing to adapt: use --trainable lora or --trainable head"
        )
    for name in convs:
        replace_module(
            body, name, ConvAdapter(body.get_submodule(name), part.adapter_dim, generator)
        )


def _lora_targets(backbone: nn.Module, spec: BackboneSpec, part: TrainableSpec) -> list[str]:
    """Names (relative to the backbone, after attention conversion) of the Linears LoRA wraps,
    in backbone order."""
    patterns = part.lora_targets or spec.lora_targets
    linears = _linear_names(backbone)
    if not patterns:
        raise FerryError(
            f"backbone {spec.name} has no default LoRA targets: name Linear layers with "
            f"--lora-targets ({', '.join(linears[-6:]) or 'it has none'}), or use --trainable "
            "conv-adapter or head"
        )
    kinds = {name: type(m).__name__ for name, m in backbone.named_modules() if name}
    kinds.update({name: "Linear" for name in linears})
    chosen: set[str] = set()
    for pattern in patterns:
        matched = [name for name in kinds if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise FerryError(
                f"LoRA target {pattern!r} matches no layer of backbone {spec.name} (Linear "
                f"layers near the output: {', '.join(linears[-6:]) or 'none'}): fix --lora-targets "
                "or use --trainable conv-adapter or head"
            )
        other = [f"{name} ({kinds[name]})" for name in matched if kinds[name] != "Linear"]
        if other:
            raise FerryError(
                f"LoRA target {pattern!r} matches layers that are not Linear: {_few(other)}; "
                "LoRA adapts Linear layers only: narrow the pattern in --lora-targets"
            )
        chosen.update(matched)
    return [name for name in kinds if name in chosen]


def _linear_names(backbone: nn.Module) -> list[str]:
    """Linear layers by name, with each nn.MultiheadAttention seen as the DPAttention it
    becomes in a tail (``qlinear``, ``klinear``, ``vlinear``, ``out_proj``)."""
    names: list[str] = []
    for name, module in backbone.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            names += [f"{name}.{p}" for p in ("qlinear", "klinear", "vlinear", "out_proj")]
        elif isinstance(module, nn.Linear) and name not in names:
            names.append(name)
    return names


def _check_opacus(tail: nn.Module, spec: BackboneSpec, part: TrainableSpec) -> None:
    """Opacus' own checks on the tail as it will be trained; FerryError listing problems."""
    from opacus.grad_sample import GradSampleModule
    from opacus.validators import ModuleValidator

    set_train_mode(tail)
    problems = [str(e) for e in ModuleValidator.validate(tail, strict=False)]
    problems += [str(e) for e in GradSampleModule.validate(tail, strict=False)]
    tail.eval()
    if not any(p.requires_grad for p in tail.parameters()):
        problems.append("nothing in it trains")
    if problems:
        raise FerryError(
            f"--trainable {part.kind} on backbone {spec.name} cannot be trained with DP-SGD "
            f"({'; '.join(p.splitlines()[0][:160] for p in problems[:3])}): choose another "
            "--trainable part"
        )


def _few(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
