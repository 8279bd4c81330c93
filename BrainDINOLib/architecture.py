"""`Architecture`: everything needed to build a DINOv3 or DINOv2 ViT backbone with timm, as plain data.

DINOv3 ViTs are timm's `Eva` with DINOv3 RoPE; DINOv2 ViTs are timm's `VisionTransformer`. We never
re-implement the backbone (the one exception, DINOv2 position-grid resizing, is explained on
`HubOffsetVisionTransformer`). An `Architecture` is read off a checkpoint's tensors (`checkpoints.py`), stored
in model cards as JSON, and used by training to build students and teachers of the same shape.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, SwiGLUPacked
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

Family = Literal["dinov3", "dinov2"]
FAMILY_NAMES = {"dinov3": "DINOv3", "dinov2": "DINOv2"}

# The feed-forward block of each transformer layer, as Meta's checkpoints store it.
FEED_FORWARDS = {
    "mlp": "GELU MLP (fc1, fc2)",
    "swiglu": "SwiGLU with separate gate and value projections (w1, w2, w3): DINOv3 ViT-S+/L+/H+/7B",
    "swiglu-packed": "SwiGLU with packed gate and value projections (w12, w3): DINOv2 ViT-g",
}

# How an input's patch grid gets its positions. The tensors cannot tell which convention a DINOv2 model was
# trained with; Meta's hub decides it per model, and `default_pos_embed_resize` follows the hub:
ROPE = "rope"  # DINOv3: rotary positions, computed for any grid
BICUBIC_OFFSET = "bicubic-offset"  # Meta's DINOv2 hub models without registers
BICUBIC_ANTIALIAS = "bicubic-antialias"  # Meta's DINOv2 hub models with registers; timm's only convention
POS_EMBED_RESIZES = {
    ROPE: "not resized: RoPE positions are computed for any grid",
    BICUBIC_OFFSET: "bicubic, antialias off, scale factor (n + 0.1) / grid",
    BICUBIC_ANTIALIAS: "bicubic, antialias on, output size n",
}
HUB_INTERPOLATE_OFFSET = 0.1  # Meta's DINOv2 `interpolate_offset` for the models without registers

# Meta's public releases by (family, embed dim, depth, gated FFN): the name a user knows them by.
PUBLIC_VARIANTS = {
    ("dinov2", 384, 12, False): "ViT-S", ("dinov2", 768, 12, False): "ViT-B",
    ("dinov2", 1024, 24, False): "ViT-L", ("dinov2", 1536, 40, True): "ViT-g",
    ("dinov3", 384, 12, False): "ViT-S", ("dinov3", 384, 12, True): "ViT-S+",
    ("dinov3", 768, 12, False): "ViT-B", ("dinov3", 1024, 24, False): "ViT-L",
    ("dinov3", 1024, 24, True): "ViT-L+", ("dinov3", 1280, 32, True): "ViT-H+",
    ("dinov3", 4096, 40, True): "ViT-7B",
}


def default_pos_embed_resize(family: str, num_register_tokens: int) -> str:
    """The convention Meta's hub runs a model of this family with: DINOv3 uses RoPE; DINOv2 models without
    registers resize with the hub's offset kludge, those with registers the way timm does."""
    if family == "dinov3":
        return ROPE
    return BICUBIC_ANTIALIAS if num_register_tokens else BICUBIC_OFFSET


@dataclass(frozen=True)
class Architecture:
    """A DINOv2/DINOv3 ViT's shape and the settings that decide its features, including the two no tensor
    can tell (`norm_eps`, `pos_embed_resize`). Unknown combinations are refused with a ValueError."""

    family: Family
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    in_chans: int = 3
    num_register_tokens: int = 4
    mlp_ratio: float = 4.0  # width of the FFN's hidden activation (after gating) / embed_dim
    qkv_bias: bool = False
    layer_scale: bool = True
    norm_eps: float = 1e-6
    rope_base: float = 100.0  # DINOv3 only
    pos_embed_grid: int = 0  # DINOv2 only: side of the learned position-embedding grid
    ffn: str = "mlp"  # a key of FEED_FORWARDS
    pos_embed_resize: str = ""  # a key of POS_EMBED_RESIZES; empty: the family's (default_pos_embed_resize)

    def __post_init__(self) -> None:
        if not self.pos_embed_resize:
            object.__setattr__(self, "pos_embed_resize",
                               default_pos_embed_resize(self.family, self.num_register_tokens))
        allowed = {"dinov3": ({"mlp", "swiglu"}, {ROPE}),
                   "dinov2": ({"mlp", "swiglu-packed"}, {BICUBIC_OFFSET, BICUBIC_ANTIALIAS})}
        if self.family not in allowed:
            raise ValueError(f"unknown architecture family {self.family!r}")
        ffns, resizes = allowed[self.family]
        if self.ffn not in ffns:
            raise ValueError(f"a {self.family} backbone with FFN {self.ffn!r} is not supported "
                             f"(supported: {', '.join(sorted(ffns))})")
        if self.pos_embed_resize not in resizes:
            raise ValueError(f"position-embedding convention {self.pos_embed_resize!r} does not apply to "
                             f"{self.family} (use one of: {', '.join(sorted(resizes))})")
        if self.pos_embed_resize == BICUBIC_OFFSET and self.num_register_tokens:
            raise ValueError(f"{BICUBIC_OFFSET!r} is the convention of DINOv2 models without registers")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Width of the FFN's hidden activation: fc1 rows (MLP), w1 rows (SwiGLU), half the w12 rows (packed)."""
        return round(self.embed_dim * self.mlp_ratio)

    @property
    def variant(self) -> str:
        """Meta's name for this shape (`ViT-S+/16`, `ViT-g/14`, ...), or `custom ViT/<patch>` for any other."""
        key = (self.family, self.embed_dim, self.depth, self.ffn != "mlp")
        return f"{PUBLIC_VARIANTS.get(key, 'custom ViT')}/{self.patch_size}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Architecture:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown architecture field(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def describe(self) -> str:
        """One line for logs and messages, e.g. `DINOv3 ViT-S+/16: embed 384, depth 12, 6 heads, ...`."""
        return (f"{FAMILY_NAMES[self.family]} {self.variant}: embed {self.embed_dim}, depth {self.depth}, "
                f"{self.num_heads} heads, patch {self.patch_size}, {self.num_register_tokens} registers, "
                f"{self.ffn} FFN {self.ffn_hidden_dim}")

    def build(self, drop_path_rate: float = 0.0) -> nn.Module:
        """A freshly initialised timm backbone of this shape (no classifier head), on torch's default device
        (build under `with torch.device("meta"):` to get its shapes without allocating any memory)."""
        norm_layer = partial(LayerNorm, eps=self.norm_eps)
        # timm sizes the FFN as int(embed_dim * mlp_ratio); half a unit above the exact width makes that
        # truncation land on the width itself, whatever the float rounding of the ratio.
        timm_width = 2 * self.ffn_hidden_dim if self.ffn == "swiglu-packed" else self.ffn_hidden_dim
        common = dict(patch_size=self.patch_size, in_chans=self.in_chans, num_classes=0, global_pool="token",
                      embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                      mlp_ratio=(timm_width + 0.5) / self.embed_dim, qkv_bias=self.qkv_bias, norm_layer=norm_layer,
                      init_values=1e-5 if self.layer_scale else None, dynamic_img_size=True,
                      drop_path_rate=drop_path_rate)
        if self.family == "dinov3":
            # swiglu_align_to: any non-zero value selects timm's split SwiGLU (w1, w2 -> fc1_g, fc1_x);
            # 1 keeps the width exactly as given.
            return Eva(img_size=224, num_reg_tokens=self.num_register_tokens, use_abs_pos_emb=False,
                       use_rot_pos_emb=True, rope_type="dinov3", rope_temperature=self.rope_base,
                       rope_rotate_half=True, use_fc_norm=False, swiglu_mlp=self.ffn == "swiglu",
                       swiglu_align_to=1 if self.ffn == "swiglu" else 0, **common)
        if self.ffn == "swiglu-packed":  # timm's DINOv2-g: SiLU(first half of fc1) * second half
            common.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
        vit = HubOffsetVisionTransformer if self.pos_embed_resize == BICUBIC_OFFSET else VisionTransformer
        return vit(img_size=self.pos_embed_grid * self.patch_size, reg_tokens=self.num_register_tokens,
                   no_embed_class=self.num_register_tokens > 0, fc_norm=False, **common)


def resize_pos_embed_hub_offset(pos_embed: Tensor, rows: int, cols: int,
                                offset: float = HUB_INTERPOLATE_OFFSET) -> Tensor:
    """[1, 1 + g*g, D] class + grid positions -> [1, 1 + rows*cols, D], resized as Meta's DINOv2 hub models
    without registers do: bicubic, antialias off, scale factor ((rows + offset) / g, (cols + offset) / g).

    A scale factor samples the grid at slightly different points than an output size does (the offset only
    makes the output size come out right), so the two conventions give different features.
    """
    grid = math.isqrt(pos_embed.shape[1] - 1)
    if (rows, cols) == (grid, grid):
        return pos_embed
    class_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:].float()
    patch_pos = patch_pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, scale_factor=((rows + offset) / grid, (cols + offset) / grid),
                              mode="bicubic", antialias=False)
    if patch_pos.shape[-2:] != (rows, cols):
        raise ValueError(f"position grid {grid}x{grid} resized to {tuple(patch_pos.shape[-2:])}, not {rows}x{cols}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, -1).to(pos_embed.dtype)
    return torch.cat([class_pos, patch_pos], dim=1)


class HubOffsetVisionTransformer(VisionTransformer):
    """timm's DINOv2 ViT, resizing its position grid as Meta's hub models without registers were trained and run.

    timm always resizes a position grid to the output size with antialias on (the convention of Meta's
    register models); it has no option for the antialias-off, scale-factor resizing of the models without
    registers, which moves every patch token (max abs 1.6 on the dinov2_vits14 fixture). So only
    `_pos_embed` is replaced, for this case only (class token, no registers); everything else is timm's.
    """

    def _pos_embed(self, x: Tensor) -> Tensor:
        batch, rows, cols, dim = x.shape  # dynamic_img_size: patch embeddings arrive as [B, h, w, D]
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, rows * cols, dim)], dim=1)
        return self.pos_drop(tokens + resize_pos_embed_hub_offset(self.pos_embed, rows, cols))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
