"""Modules that make a pretrained tail trainable under DP-SGD without changing what it computes.

* :class:`LoRALinear`: ``y = W x + (alpha / r) * B(A(x))`` around a frozen Linear ``W``;
  ``A`` Kaiming-uniform (seeded), ``B`` zeros, so a fresh LoRA layer computes exactly ``W x``.
* :class:`ConvAdapter`: ``y = conv(x) + up(relu(down(x)))`` beside a frozen Conv2d; ``down`` is
  a 1x1 convolution with the conv's stride, aligned on the conv's receptive-field centres;
  ``up`` is zero-initialised, so a fresh adapter computes exactly ``conv(x)``.
* :class:`FrozenBatchNorm`: a BatchNorm (any dimensionality) as a fixed affine map of its
  pretraining statistics; it never computes batch statistics, so no statistic of an
  institution's examples enters the model outside the DP-SGD mechanism.
* :class:`DPAttention`: ``nn.MultiheadAttention`` with the same weights, in Opacus'
  ``DPMultiheadAttention`` layout (separate ``qlinear``/``klinear``/``vlinear``/``out_proj``
  Linears that LoRA can wrap and Opacus can compute per-example gradients for).

Every module here is built from Linear/Conv2d layers Opacus has grad samplers for.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ferry.common.errors import FerryError


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable rank-``rank`` update scaled by ``alpha / rank``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        with torch.no_grad():
            # nn.Linear's own initialisation (Kaiming-uniform, a=sqrt(5)), from a seeded generator.
            bound = 1.0 / math.sqrt(base.in_features)
            self.lora_A.weight.uniform_(-bound, bound, generator=generator)
            self.lora_B.weight.zero_()
        self.to(base.weight.device, base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))


class ConvAdapter(nn.Module):
    """A frozen Conv2d plus a parallel bottleneck ``up(relu(down(x)))`` (``up`` zero-init).

    ``down`` is a 1x1 convolution with the conv's stride; the input is padded (or cropped) so
    that each adapter output reads the input position at the centre of its conv output's
    receptive field, and so that the adapter's output has the conv's size. Convs that pad
    inside their own ``forward`` (TensorFlow-style "same" padding, e.g. EfficientNet-Lite's)
    are assumed to pad ``total // 2`` before and the rest after, as that convention does.
    A grouped conv's adapter keeps its grouping: each of the ``groups`` groups gets
    ``max(1, dim // groups)`` bottleneck channels, so the adapter mixes only channels the conv
    mixes (a depthwise conv gets a per-channel branch) and costs no more than a dense conv's.
    """

    def __init__(self, conv: nn.Conv2d, dim: int, generator: torch.Generator):
        super().__init__()
        self.conv = conv.requires_grad_(False)
        groups = conv.groups
        width = groups * max(1, dim // groups)
        self.down = nn.Conv2d(
            conv.in_channels, width, 1, stride=conv.stride, groups=groups, bias=False
        )
        self.up = nn.Conv2d(width, conv.out_channels, 1, groups=groups, bias=False)
        # Padding before the first row/column, where the conv's own attributes say it.
        self.before: tuple[int, int] | None = None
        if type(conv) is nn.Conv2d:
            if conv.padding == "valid":
                self.before = (0, 0)
            elif conv.padding == "same":
                self.before = tuple(
                    d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size, strict=True)
                )
            else:
                self.before = tuple(conv.padding)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.down.weight[0].numel())
            self.down.weight.uniform_(-bound, bound, generator=generator)
            self.up.weight.zero_()
        self.to(conv.weight.device, conv.weight.dtype)

    def _pad(self, size: int, out: int, dim: int) -> tuple[int, int]:
        stride, dilation = self.conv.stride[dim], self.conv.dilation[dim]
        reach = dilation * (self.conv.kernel_size[dim] - 1)
        if self.before is not None:
            before = self.before[dim]
        else:
            before = max(0, (out - 1) * stride + reach + 1 - size) // 2
        first = before - reach // 2  # > 0: pad; < 0: crop (F.pad takes negative padding)
        return first, (out - 1) * stride + 1 - size - first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        top, bottom = self._pad(x.shape[-2], y.shape[-2], 0)
        left, right = self._pad(x.shape[-1], y.shape[-1], 1)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return y + self.up(F.relu(self.down(x)))


class FrozenBatchNorm(nn.Module):
    """A BatchNorm's eval-mode computation with its statistics and affine held as buffers.

    The same ``F.batch_norm(training=False)`` call the original runs in eval mode, so outputs
    are identical; nothing here is a parameter, so nothing here trains, and no statistic is
    ever updated."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise FerryError(
                f"{bn} has no running statistics (track_running_stats=False), so it would "
                "normalise with statistics of each private batch: train a part of the model "
                "that does not contain it (e.g. --trainable head)"
            )
        self.num_features = bn.num_features
        self.eps = bn.eps
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        weight = None if bn.weight is None else bn.weight.detach().clone()
        bias = None if bn.bias is None else bn.bias.detach().clone()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class DPAttention(nn.Module):
    """Multi-head attention built from four Linears, in Opacus' ``DPMultiheadAttention``
    layout (``qlinear``, ``klinear``, ``vlinear``, ``out_proj``), so LoRA can wrap the
    projections and Opacus computes per-example gradients with its Linear grad sampler.

    Not Opacus' class itself: Opacus 1.6 reshapes the batch-first output ``(n*heads, L, d)``
    straight to ``(n, L, E)``, splicing heads into positions (meta-pytorch/opacus#825), and
    torchvision's ViT blocks are batch-first. Here the Linears always see batch-first
    ``(n, L, E)`` inputs (Opacus' per-example gradients assume the batch dimension first),
    whatever ``batch_first`` says about this module's inputs. No masks (torchvision's encoder
    blocks pass none)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise FerryError(
                "attention with add_bias_kv or add_zero_attn cannot be trained with DP-SGD "
                "here: train a part of the model after it (e.g. --trainable head)"
            )
        embed, bias = mha.embed_dim, mha.in_proj_bias is not None
        self.embed_dim, self.num_heads, self.head_dim = embed, mha.num_heads, mha.head_dim
        self.batch_first = mha.batch_first
        self.qlinear = nn.Linear(embed, embed, bias=bias)
        self.klinear = nn.Linear(mha.kdim, embed, bias=bias)
        self.vlinear = nn.Linear(mha.vdim, embed, bias=bias)
        self.out_proj = nn.Linear(embed, embed, bias=mha.out_proj.bias is not None)
        self.dropout = nn.Dropout(mha.dropout)
        if mha.in_proj_weight is not None:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if bias else (None,) * 3
        with torch.no_grad():
            for linear, w, b in zip(
                (self.qlinear, self.klinear, self.vlinear), weights, biases, strict=True
            ):
                linear.weight.copy_(w)
                if b is not None:
                    linear.bias.copy_(b)
            self.out_proj.load_state_dict(mha.out_proj.state_dict())
        self.to(weights[0].device, weights[0].dtype)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ValueError("DPAttention supports no attention masks")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, _ = query.shape
        q = self.qlinear(query) * float(self.head_dim) ** -0.5
        k, v = self.klinear(key), self.vlinear(value)
        q, k, v = (
            t.reshape(n, -1, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v)
        )
        weights = self.dropout(torch.softmax(q @ k.transpose(-2, -1), dim=-1))
        out = self.out_proj((weights @ v).transpose(1, 2).reshape(n, length, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_attn_weights else weights


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` is in ``root``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
