"""Attention map: where the last block's CLS token looks, per head and averaged over heads.

timm computes attention with a fused kernel that never exposes the weights, so they are recomputed here
from the last block's own modules, exactly as its attention does: the tokens entering the block (captured
with a forward pre-hook during a normal forward pass, together with the rotary embedding the model hands
it) -> `norm1` -> `qkv` (with the q/v biases when the model has them) -> q/k norms -> RoPE on the patch
tokens (timm's `apply_rot_embed_cat`, prefix tokens untouched) -> softmax(q k^T * scale). `weights @ values`
reproduces the block's attention output (checked in the tests). Works for timm `Eva` (DINOv3, with RoPE)
and `VisionTransformer` (DINOv2, without).

Values are attention probabilities: the share of the CLS token's attention that goes to each patch (the
rest goes to the CLS and register tokens).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from timm.layers import apply_rot_embed_cat
from torch import Tensor

from ..embedding import Cancel, Progress, for_each_batch
from ..encoder import Encoder
from ..features import VoxelMapping
from ..session import FeatureSession
from ..volume import Volume

log = logging.getLogger(__name__)


@dataclass
class LastBlockAttention:
    """The last block's attention for a batch: its input tokens [B, N, C], the RoPE it was given (or None),
    the softmax weights [B, H, N, N] and the values [B, H, N, head_dim]."""

    inputs: Tensor
    rope: Tensor | None
    weights: Tensor
    values: Tensor


@dataclass
class AttentionMap:
    """`mean`: float32 [Z, Y, X] (mean over heads); `heads`: float32 [Z, Y, X, H]."""

    mean: Volume
    heads: Volume


@torch.inference_mode()
def last_block_attention(encoder: Encoder, images: Tensor) -> LastBlockAttention:
    """Run `encoder.model` on model-ready `images` [B, C, H, W] and recompute its last block's attention."""
    block = encoder.model.blocks[-1]
    attn = block.attn
    if getattr(attn, "qkv", None) is None:
        raise ValueError("attention maps need a fused qkv projection (timm Eva or VisionTransformer)")
    captured: dict[str, Tensor | None] = {}

    def capture(module, args, kwargs):
        captured["inputs"] = args[0] if args else kwargs["x"]
        captured["rope"] = kwargs.get("rope")

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        encoder.model.forward_features(images.to(encoder.device))
    finally:
        handle.remove()

    inputs, rope = captured["inputs"].float(), captured["rope"]
    x = block.norm1(inputs)
    batch, tokens, _ = x.shape
    bias = attn.qkv.bias
    if getattr(attn, "q_bias", None) is not None:
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    qkv = torch.nn.functional.linear(x, attn.qkv.weight, bias)
    q, k, v = qkv.reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        prefix, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :prefix], apply_rot_embed_cat(q[:, :, prefix:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :prefix], apply_rot_embed_cat(k[:, :, prefix:], rope, half=half)], dim=2).type_as(v)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return LastBlockAttention(inputs=inputs, rope=rope, weights=weights, values=v)


def attention_map(session: FeatureSession, volume: Volume, progress: Progress | None = None,
                  cancel: Cancel | None = None) -> AttentionMap:
    """Last-block CLS-to-patch attention of the slices `session` embeds, upsampled once to the input grid.

    Batched like `embed_volume` (same slices and resolution, `progress(done, total)`, `cancel()` between batches).
    """
    encoder = session.encoder
    stack = session.slice_stack(volume)
    h, w = stack.geometry.grid
    prefix = encoder.model.num_prefix_tokens
    heads = encoder.architecture.num_heads
    per_patch = torch.empty((len(stack), h, w, heads), dtype=torch.float32)

    def attend(start: int, stop: int, images: Tensor) -> None:
        cls_to_patches = last_block_attention(encoder, images).weights[:, :, 0, prefix:]  # [B * N^2, H, h'*w']
        side = stack.geometry.patches
        windows = cls_to_patches.reshape(len(images), heads, side, side).permute(0, 2, 3, 1)
        per_patch[start:stop] = stack.interleave(windows.cpu())

    for_each_batch(stack, encoder, attend, session.batch_size, progress, cancel, what="attention map")
    mapping = VoxelMapping.of_stack(stack, volume, session.policy.upsampling)
    return AttentionMap(mean=mapping.to_volume(per_patch.mean(dim=-1)), heads=mapping.to_volume(per_patch))
