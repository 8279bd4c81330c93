"""Subject-level heads: slice tokens pooled over the volume, then an MLP.

Each embedded slice contributes one token: its CLS token concatenated with the foreground-weighted mean of
its patch tokens ([S, 2D], `slice_tokens`). A volume's slices are pooled into one vector by their mean (the
BrainDINO paper's choice) or by gated-attention MIL pooling (Ilse et al., 2018: a learned weight per slice,
softmax over slices). Several volumes of one subject (modalities, e.g. T1c + FLAIR) are pooled separately
and their vectors concatenated (late fusion). One MLP serves classification (K logits), regression (one
standardised value) and survival (one log-risk).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import BrainDINOError
from ..features import VolumeFeatures
from .card import HeadCard
from .head import Head
from .registry import register_head_kind, register_predictor
from .tasks import CLASS_TASKS, CLASSIFICATION, KNN, REGRESSION, SEGMENTATION, SUBJECT_TASKS, SURVIVAL

Bag = list[Tensor]  # one subject: slice tokens [S_m, F] per modality


def slice_tokens(features: VolumeFeatures) -> Tensor:
    """One token per embedded slice: CLS concatenated with the foreground-weighted mean patch token, [S, 2D]."""
    weights = features.patch_foreground().clamp_min(0)[..., None]  # [S, h, w, 1]
    patches = features.patches.float()
    mean_patch = (patches * weights).sum(dim=(1, 2)) / weights.sum(dim=(1, 2)).clamp_min(1e-6)
    return torch.cat([features.cls.float(), mean_patch], dim=1)


class GatedAttentionPool(nn.Module):
    """Gated-attention MIL pooling: weights softmax(w . (tanh(V h) * sigmoid(U h))) over the slices."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.value = nn.Linear(dim, hidden)
        self.gate = nn.Linear(dim, hidden)
        self.score = nn.Linear(hidden, 1)

    def weights(self, tokens: Tensor) -> Tensor:
        scores = self.score(torch.tanh(self.value(tokens)) * torch.sigmoid(self.gate(tokens)))[:, 0]
        return torch.softmax(scores, dim=0)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.weights(tokens) @ tokens


class MeanPool(nn.Module):
    def forward(self, tokens: Tensor) -> Tensor:
        return tokens.mean(dim=0)


@register_head_kind("subject-mlp", CLASSIFICATION, REGRESSION, SURVIVAL)
class SubjectHead(nn.Module):
    """Pool each modality's slice tokens, standardise, concatenate, MLP -> `out_dim` outputs per subject.

    `hidden=0` makes the MLP a single linear layer (a linear probe; steadier on a few dozen subjects).
    The standardisation (mean, std per input feature of the training subjects) is stored as buffers, so a
    saved head carries it."""

    def __init__(self, token_dim: int, out_dim: int, modalities: int = 1, pooling: str = "mean",
                 hidden: int = 256, dropout: float = 0.2):
        super().__init__()
        if pooling not in ("mean", "attention"):
            raise ValueError(f"unknown pooling {pooling!r}; use 'mean' or 'attention'")
        self.pools = nn.ModuleList(MeanPool() if pooling == "mean" else GatedAttentionPool(token_dim)
                                   for _ in range(modalities))
        self.register_buffer("token_mean", torch.zeros(token_dim))
        self.register_buffer("token_std", torch.ones(token_dim))
        fused = token_dim * modalities
        if hidden:
            layers = [nn.Linear(fused, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)]
        else:
            layers = [nn.Linear(fused, out_dim)]
        self.mlp = nn.Sequential(nn.Dropout(dropout), *layers)

    def set_standardisation(self, tokens: Tensor) -> None:
        """Standardise inputs with the statistics of these training slice tokens [N, F]."""
        self.token_mean.copy_(tokens.mean(dim=0))
        self.token_std.copy_(tokens.std(dim=0).clamp_min(1e-4))

    def embed(self, bag: Bag) -> Tensor:
        """The fused subject vector (before the MLP)."""
        return torch.cat([pool((tokens - self.token_mean) / self.token_std) for pool, tokens in zip(self.pools, bag)])

    def forward(self, bags: Sequence[Bag]) -> Tensor:
        return self.mlp(torch.stack([self.embed(bag) for bag in bags]))


def subject_bag(card: HeadCard, features: VolumeFeatures | Sequence[VolumeFeatures]) -> Bag:
    """Check one subject's features (one per modality, from the head's encoder) and make slice tokens."""
    items = [features] if isinstance(features, VolumeFeatures) else list(features)
    expected = max(1, len(card.modalities))
    if len(items) != expected:
        names = ", ".join(card.modalities) or "one volume"
        raise BrainDINOError("input", f"this {card.task} head needs {expected} volume(s) per subject ({names}), "
                                      f"got {len(items)}")
    for item in items:
        card.check_encoder(item.model_id, item.source or None)
    return [slice_tokens(item) for item in items]


@torch.no_grad()
def subject_outputs(head: Head, bags: Sequence[Bag]) -> np.ndarray:
    """Raw head outputs for subjects (logits / standardised value / log-risk), [N, out]."""
    head.module.eval()
    return head.module(bags).numpy().astype(np.float64)


def class_probabilities(card: HeadCard, outputs: np.ndarray) -> np.ndarray:
    """Classification logits -> softmax probabilities; kNN outputs already are vote fractions. [N, K]"""
    if card.task == KNN:
        return outputs
    shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def regression_values(card: HeadCard, outputs: np.ndarray) -> np.ndarray:
    """Standardised regression outputs [N, 1] -> values in the target's units [N]."""
    return outputs[:, 0] * card.extra["target_std"] + card.extra["target_mean"]


def interpret(card: HeadCard, outputs: np.ndarray) -> list[dict]:
    """Raw outputs of subjects [N, out] as readable prediction dicts."""
    if card.task in CLASS_TASKS:
        return [{"class": card.classes[int(np.argmax(p))].name,
                 "probabilities": {c.name: float(x) for c, x in zip(card.classes, p)}}
                for p in class_probabilities(card, outputs)]
    if card.task == REGRESSION:
        return [{"value": float(v)} for v in regression_values(card, outputs)]
    return [{"risk": float(r), "risk_group": "high" if r > card.extra["median_risk"] else "low"} for r in outputs[:, 0]]


@register_predictor(*SUBJECT_TASKS)
def predict_subject(head: Head, features_list: VolumeFeatures | Sequence[VolumeFeatures]) -> dict:
    """Predict for one subject: classification -> {class, probabilities}, regression -> {value},
    survival -> {risk, risk_group (split at the training median)}, knn -> {class, probabilities (votes)}."""
    card = head.card
    if card.task == SEGMENTATION:
        raise BrainDINOError(card.task, "this is a segmentation head; use segment()")
    return interpret(card, subject_outputs(head, [subject_bag(card, features_list)]))[0]
