"""`Architecture`: everything needed to build a DINOv3 or DINOv2 ViT backbone with timm, as plain data.

DINOv3 ViTs are timm's `Eva` with DINOv3 RoPE; DINOv2 ViTs are timm's `VisionTransformer`. We never
re-implement the backbone. An `Architecture` is read off a checkpoint's tensors (`checkpoints.py`), stored
in model cards as JSON, and used by training to build students and teachers of the same shape.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any, Literal

from timm.layers import LayerNorm
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

Family = Literal["dinov3", "dinov2"]


@dataclass(frozen=True)
class Architecture:
    family: Family
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    in_chans: int = 3
    num_register_tokens: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    layer_scale: bool = True
    norm_eps: float = 1e-6
    rope_base: float = 100.0  # DINOv3 only
    pos_embed_grid: int = 0  # DINOv2 only: side of the learned position-embedding grid

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

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
        return (f"{self.family} ViT (embed {self.embed_dim}, depth {self.depth}, {self.num_heads} heads, "
                f"patch {self.patch_size}, {self.num_register_tokens} registers)")

    def build(self, drop_path_rate: float = 0.0) -> nn.Module:
        """A freshly initialised timm backbone of this shape (no classifier head)."""
        norm_layer = partial(LayerNorm, eps=self.norm_eps)
        common = dict(patch_size=self.patch_size, in_chans=self.in_chans, num_classes=0, global_pool="token",
                      embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                      mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, norm_layer=norm_layer,
                      init_values=1e-5 if self.layer_scale else None, dynamic_img_size=True,
                      drop_path_rate=drop_path_rate)
        if self.family == "dinov3":
            return Eva(img_size=224, num_reg_tokens=self.num_register_tokens, use_abs_pos_emb=False,
                       use_rot_pos_emb=True, rope_type="dinov3", rope_temperature=self.rope_base,
                       rope_rotate_half=True, use_fc_norm=False, **common)
        if self.family == "dinov2":
            return VisionTransformer(img_size=self.pos_embed_grid * self.patch_size,
                                     reg_tokens=self.num_register_tokens,
                                     no_embed_class=self.num_register_tokens > 0, fc_norm=False, **common)
        raise ValueError(f"unknown architecture family {self.family!r}")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
