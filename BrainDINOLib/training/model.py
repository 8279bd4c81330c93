"""The self-distillation network: a timm ViT backbone, a mask token, and the DINO and iBOT projection heads.

Student and teacher are two copies of `DistillationNetwork`; only the student is trained (and wrapped in
DDP), the teacher follows it by EMA. One `forward` call does all the student's work for a step (masked
global crops and local crops through the backbone, CLS tokens through the DINO head, masked patch tokens
through the iBOT head), which is what DDP needs to reduce gradients once per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.eva import Eva
from torch import Tensor, nn

from ..architecture import Architecture
from ..checkpoints import load_backbone, read_checkpoint
from .config import LossConfig, ModelConfig


class ProjectionHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> cosine scores against L2-normalised prototypes (the DINO head).

    Normalising the prototype vectors in the forward pass is weight normalisation with a fixed unit gain.
    """

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        return F.linear(z, F.normalize(self.prototypes, dim=-1))


@dataclass
class NetworkOutput:
    """What the losses need: backbone CLS of the global crops, DINO logits of global/local CLS, iBOT logits
    of the masked global patches."""

    global_cls: Tensor
    dino_global: Tensor
    dino_local: Tensor | None
    ibot_masked: Tensor


def backbone_tokens(backbone: nn.Module, images: Tensor, masks: Tensor | None = None,
                    mask_token: Tensor | None = None) -> Tensor:
    """All output tokens [B, 1 + R + N, D] after the final norm, with masked patch embeddings replaced by
    `mask_token` before the transformer blocks (iBOT). Follows timm's own `forward_features`."""
    x = backbone.patch_embed(images)  # [B, h, w, D]: the engine builds backbones with dynamic_img_size
    if masks is not None:
        x = torch.where(masks.view(*x.shape[:3], 1), mask_token.to(x.dtype), x)
    if isinstance(backbone, Eva):
        x, rope = backbone._pos_embed(x)
        x = backbone.norm_pre(x)
        for block in backbone.blocks:
            x = block(x, rope=rope)
    else:  # DINOv2 VisionTransformer
        x = backbone.norm_pre(backbone._pos_embed(x))
        x = backbone.blocks(x)
    return backbone.norm(x)


class DistillationNetwork(nn.Module):
    def __init__(self, backbone: nn.Module, architecture: Architecture, loss: LossConfig):
        super().__init__()
        self.architecture = architecture
        self.backbone = backbone
        self.mask_token = nn.Parameter(torch.zeros(1, architecture.embed_dim))
        dim = architecture.embed_dim
        self.dino_head = ProjectionHead(dim, loss.head_hidden_dim, loss.head_bottleneck_dim, loss.prototypes)
        self.ibot_head = ProjectionHead(dim, loss.head_hidden_dim, loss.head_bottleneck_dim, loss.ibot_prototypes)

    @property
    def prefix_tokens(self) -> int:
        return 1 + self.architecture.num_register_tokens

    def forward(self, global_crops: Tensor, local_crops: Tensor | None, masks: Tensor) -> NetworkOutput:
        """Student: masked global crops (+ local crops). Teacher: unmasked global crops, `masks` only says
        which patch outputs to score (pass `local_crops=None`)."""
        student = local_crops is not None
        tokens = backbone_tokens(self.backbone, global_crops, masks if student else None, self.mask_token)
        global_cls = tokens[:, 0]
        patches = tokens[:, self.prefix_tokens:]
        dino_local = None
        if student and local_crops.shape[0] > 0:
            dino_local = self.dino_head(backbone_tokens(self.backbone, local_crops)[:, 0])
        return NetworkOutput(global_cls=global_cls, dino_global=self.dino_head(global_cls), dino_local=dino_local,
                             ibot_masked=self.ibot_head(patches[masks]))


def build_network(model: ModelConfig, loss: LossConfig) -> DistillationNetwork:
    """A fresh student, or one whose backbone continues from `model.init_from` (any checkpoint the engine reads:
    its architecture, including what the tensors cannot tell, and its iBOT mask token when it has one)."""
    if not model.init_from:
        architecture = Architecture(family=model.family, embed_dim=model.embed_dim, depth=model.depth,
                                    num_heads=model.num_heads, patch_size=model.patch_size, in_chans=model.in_chans,
                                    num_register_tokens=model.num_register_tokens)
        backbone = architecture.build(drop_path_rate=model.drop_path_rate)
        for name, parameter in backbone.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                nn.init.constant_(parameter, model.layer_scale_init)
        return DistillationNetwork(backbone.train(), architecture, loss)
    checkpoint = read_checkpoint(model.init_from)
    backbone = load_backbone(checkpoint)
    if model.drop_path_rate:
        fresh = checkpoint.architecture.build(drop_path_rate=model.drop_path_rate)
        fresh.load_state_dict(backbone.state_dict())
        backbone = fresh
    network = DistillationNetwork(backbone.train(), checkpoint.architecture, loss)
    mask_token = checkpoint.state_dict.get("mask_token")
    if mask_token is not None:
        with torch.no_grad():
            network.mask_token.copy_(mask_token.reshape(network.mask_token.shape))
    return network
