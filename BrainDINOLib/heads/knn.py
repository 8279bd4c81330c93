"""kNN probe: cosine k-nearest-neighbour classification of subjects on mean-pooled slice tokens.

No training: the head stores the standardised (per-feature z-score), L2-normalised subject vectors of the
fitting set and their classes; a subject gets the vote fractions of its k most similar stored subjects.
`sweep_k` scores a range of k on validation subjects so fitting can pick one (and report the sweep).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DEFAULT_K_SWEEP
from .registry import register_head_kind
from .subject import Bag
from .tasks import KNN


def subject_vector(bag: Bag) -> Tensor:
    """Mean slice token of each modality, concatenated."""
    return torch.cat([tokens.mean(dim=0) for tokens in bag])


@register_head_kind("knn", KNN)
class KNNHead(nn.Module):
    def __init__(self, feature_dim: int, num_items: int, num_classes: int, k: int = 5):
        super().__init__()
        self.k = min(k, num_items)
        self.num_classes = num_classes
        self.register_buffer("centre", torch.zeros(feature_dim))
        self.register_buffer("scale", torch.ones(feature_dim))
        self.register_buffer("bank", torch.zeros(num_items, feature_dim))
        self.register_buffer("labels", torch.zeros(num_items, dtype=torch.long))

    def remember(self, vectors: Tensor, labels: Tensor) -> None:
        self.centre.copy_(vectors.mean(dim=0))
        self.scale.copy_(vectors.std(dim=0).clamp_min(1e-4))
        self.bank.copy_(self.normalise(vectors))
        self.labels.copy_(labels)

    def normalise(self, vectors: Tensor) -> Tensor:
        return F.normalize((vectors - self.centre) / self.scale, dim=1)

    def votes(self, vectors: Tensor, k: int) -> Tensor:
        """Vote fractions [N, K] of the k most cosine-similar stored subjects."""
        similarity = self.normalise(vectors) @ self.bank.T
        nearest = similarity.topk(min(k, self.bank.shape[0]), dim=1).indices
        one_hot = F.one_hot(self.labels[nearest], self.num_classes).float()
        return one_hot.mean(dim=1)

    def forward(self, bags: Sequence[Bag]) -> Tensor:
        return self.votes(torch.stack([subject_vector(b) for b in bags]), self.k)


def sweep_k(head: KNNHead, vectors: Tensor, labels: np.ndarray,
            ks: Sequence[int] = DEFAULT_K_SWEEP) -> dict[int, float]:
    """Accuracy on (vectors, labels) for each k that the stored set allows."""
    out = {}
    for k in ks:
        if k <= head.bank.shape[0]:
            predicted = head.votes(vectors, k).argmax(dim=1).numpy()
            out[int(k)] = float((predicted == labels).mean())
    return out
