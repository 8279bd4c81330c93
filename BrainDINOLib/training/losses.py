"""DINO, iBOT and KoLeo losses, and the two ways of turning teacher scores into targets.

Re-implemented from the papers (DINO, Caron et al. 2021; iBOT, Zhou et al. 2022; DINOv2, Oquab et al.
2024; KoLeo, Sablayrolles et al. 2019):
- teacher targets: Sinkhorn-Knopp (an equipartitioned soft assignment of the batch to the prototypes,
  computed over all processes) or centering (softmax after subtracting an EMA of the mean teacher score);
- DINO: cross-entropy between the teacher's targets for each global crop and the student's prediction for
  every other crop (global and local), on the CLS token;
- iBOT: the same cross-entropy between teacher and student patch tokens at the masked positions;
- KoLeo: -log of each CLS embedding's distance to its nearest neighbour in the batch (spreads features).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import BrainDINOError


def _all_reduce(tensor: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, temperature: float, iterations: int = 3) -> Tensor:
    """Soft assignments [B, K] of the samples to K prototypes, rows summing to 1, prototypes used equally
    across the whole (multi-process) batch."""
    scores = scores.float()
    # Subtracting each sample's max changes nothing after the column normalisation, and avoids overflow.
    q = torch.exp((scores - scores.max(dim=1, keepdim=True).values) / temperature).t()  # [K, B]
    prototypes = q.shape[0]
    samples = _all_reduce(torch.tensor(float(q.shape[1]), device=q.device))
    q /= _all_reduce(q.sum())
    for _ in range(iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))
        q /= prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= samples
    return (q * samples).t()


class TeacherTargets(nn.Module):
    """Teacher scores -> target distributions, by Sinkhorn-Knopp or by centering (its centre is a buffer,
    saved with the training checkpoint)."""

    def __init__(self, prototypes: int, method: str, sinkhorn_iterations: int, center_momentum: float):
        super().__init__()
        if method not in ("sinkhorn", "centering"):
            raise BrainDINOError(f"teacher target method {method!r}", "unknown; use sinkhorn or centering")
        self.method, self.iterations, self.momentum = method, sinkhorn_iterations, center_momentum
        self.register_buffer("center", torch.zeros(1, prototypes))

    @torch.no_grad()
    def forward(self, scores: Tensor, temperature: float) -> Tensor:
        if self.method == "sinkhorn":
            return sinkhorn_knopp(scores, temperature, self.iterations)
        targets = F.softmax((scores.float() - self.center) / temperature, dim=-1)
        self._update_center(scores.float())
        return targets

    def _update_center(self, scores: Tensor) -> None:
        total = _all_reduce(scores.sum(dim=0, keepdim=True))
        count = _all_reduce(torch.tensor(float(scores.shape[0]), device=scores.device))
        self.center.mul_(self.momentum).add_(total / count, alpha=1 - self.momentum)


def cross_entropy(targets: Tensor, student_scores: Tensor, temperature: float) -> Tensor:
    """Mean over rows of -sum_k target_k log softmax(student / temperature)_k."""
    return -(targets * F.log_softmax(student_scores.float() / temperature, dim=-1)).sum(dim=-1).mean()


def dino_loss(teacher_targets: Tensor, student_global: Tensor, student_local: Tensor | None,
              temperature: float) -> Tensor:
    """DINO cross-view loss. Targets [2B, K] and student global scores [2B, K] are view-major
    (first views, then second views); local scores [N B, K]. Averaged over (teacher view, other crop) pairs."""
    targets = teacher_targets.chunk(2)
    student_views = list(student_global.chunk(2))
    if student_local is not None:
        student_views += list(student_local.chunk(student_local.shape[0] // targets[0].shape[0]))
    terms = [cross_entropy(t, s, temperature) for i, t in enumerate(targets)
             for j, s in enumerate(student_views) if i != j]
    return torch.stack(terms).mean()


def koleo_loss(embeddings: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko entropy regulariser on L2-normalised embeddings [B, D] (needs B >= 2)."""
    if embeddings.shape[0] < 2:
        return embeddings.new_zeros(())
    x = F.normalize(embeddings.float(), dim=-1, eps=eps)
    similarity = x @ x.t()
    similarity.fill_diagonal_(-2.0)  # never one's own neighbour
    nearest = similarity.argmax(dim=1)
    distance = (x - x[nearest]).norm(dim=-1)
    return -torch.log(distance + eps).mean()
