"""``vit_b_16``: torchvision's ViT-B/16 cut into stages.

Stages: ``embed`` (:class:`PatchEmbedding`: patch projection, class token, position
embedding, dropout), ``block0`` .. ``block11`` (torchvision's ``EncoderBlock``s, unchanged),
``norm`` (the final LayerNorm), ``cls`` (token 0): 768 features. ``last_stage`` is
``block11``. Default LoRA targets: the query/value projections and both MLP Linears of the
last two blocks; ``qlinear``/``vlinear`` exist once the trainable tail's
``nn.MultiheadAttention`` is converted to :class:`common.adapters.DPAttention` (separate
query/key/value Linears; Opacus 1.6's ``DPMultiheadAttention`` mis-orders heads for
batch-first inputs, meta-pytorch/opacus#825).

Any image size that is a multiple of 16 works (``VisionTransformer(image_size=S)``); the
position embedding then has (S/16)^2 + 1 rows, so the manifest's ``input_shape`` fixes it.
Checkpoints for another size are fitted by interpolating their position embeddings
(torchvision's ``interpolate_embeddings``, bicubic).
"""

import torch
from torch import nn

from ferry.common.backbones.origins import (
    Origin,
    check_image_shape,
    image_preprocessing,
    named_stages,
    register_origin,
    torchvision_imagenet,
)
from ferry.common.backbones.registry import register_backbone

LORA_TARGETS = (
    "block10.self_attention.qlinear",
    "block10.self_attention.vlinear",
    "block10.mlp.0",
    "block10.mlp.3",
    "block11.self_attention.qlinear",
    "block11.self_attention.vlinear",
    "block11.mlp.0",
    "block11.mlp.3",
)


class PatchEmbedding(nn.Module):
    """(n, 3, S, S) images -> (n, 1 + (S/16)^2, 768) tokens: the start of torchvision's
    ``VisionTransformer.forward`` (``_process_input``, class token, ``Encoder`` position
    embedding and dropout), holding the original's own parameters."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.image_size = vit.image_size
        self.patch_size = vit.patch_size
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(
                f"vit_b_16 was built for {self.image_size}x{self.image_size} images, got {h}x{w}"
            )
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class ClassToken(nn.Module):
    """(n, tokens, d) -> (n, d): the class token's final state."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


def vit_stages(vit: nn.Module) -> nn.Sequential:
    blocks = {f"block{i}": layer for i, layer in enumerate(vit.encoder.layers)}
    return named_stages(embed=PatchEmbedding(vit), **blocks, norm=vit.encoder.ln, cls=ClassToken())


def _original(input_shape: tuple[int, ...]) -> nn.Module:
    size = check_image_shape("vit_b_16", input_shape, min_size=16, multiple_of=16)
    from torchvision.models import vit_b_16  # slow to import: only when building

    return vit_b_16(weights=None, image_size=size)


def fit_position_embedding(state: dict[str, torch.Tensor], trunk: nn.Module) -> dict:
    """Interpolate a checkpoint's position embedding to ``trunk``'s image size."""
    key = "embed.pos_embedding"
    want = trunk.embed.pos_embedding.shape
    if key in state and state[key].shape != want and state[key].shape[2:] == want[2:]:
        from torchvision.models.vision_transformer import interpolate_embeddings

        embed = trunk.embed
        fitted = interpolate_embeddings(
            embed.image_size, embed.patch_size, {"encoder.pos_embedding": state[key]}
        )
        state = {**state, key: fitted["encoder.pos_embedding"]}
    return state


VIT_B_16 = register_origin(
    "vit_b_16",
    Origin(
        _original,
        vit_stages,
        torchvision_imagenet("ViT_B_16_Weights"),
        head=("heads.",),
        fit_state=fit_position_embedding,
    ),
)


@register_backbone(
    "vit_b_16",
    feature_dim=768,
    input_shape=(3, 224, 224),
    preprocessing=image_preprocessing(224),
    last_stage="block11",
    lora_targets=LORA_TARGETS,
    description="torchvision ViT-B/16 (85.8M parameters), 768 features (class token)",
)
def build_vit_b_16(input_shape: tuple[int, ...] = (3, 224, 224)) -> nn.Sequential:
    return VIT_B_16.build(input_shape)
