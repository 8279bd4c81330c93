"""The one optimisation loop every torch head uses: AdamW, mini-batches, early stopping on validation.

Heads are small and their inputs are cached features, so the whole training set lives in memory and an
epoch is a shuffled pass over index batches. The caller supplies the loss of a batch of training indices
and (optionally) a validation loss; the best state by validation loss is restored at the end.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..errors import CancelledError
from ..threads import torch_threads
from .config import HeadTrainingConfig

log = logging.getLogger(__name__)


@dataclass
class History:
    """Loss per epoch (validation loss where a validation set was given) and the epoch that was kept."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1

    def to_dict(self) -> dict:
        return asdict(self)


def train_module(module: nn.Module, batch_loss: Callable[[nn.Module, Tensor], Tensor], num_items: int,
                 config: HeadTrainingConfig, val_loss: Callable[[nn.Module], float] | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 cancel: Callable[[], bool] | None = None) -> History:
    """Optimise `module` in place; `batch_loss(module, indices)` is the mean loss of training items `indices`."""
    with torch_threads(config.threads):
        return _train(module, batch_loss, num_items, config, val_loss, progress, cancel)


def _train(module: nn.Module, batch_loss: Callable[[nn.Module, Tensor], Tensor], num_items: int,
           config: HeadTrainingConfig, val_loss: Callable[[nn.Module], float] | None,
           progress: Callable[[int, int], None] | None, cancel: Callable[[], bool] | None) -> History:
    generator = torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad],
                                  lr=config.learning_rate, weight_decay=config.weight_decay)
    batch = config.batch_size or num_items
    history = History()
    best_loss, best_state, stale = float("inf"), None, 0
    for epoch in range(config.max_epochs):
        if cancel is not None and cancel():
            raise CancelledError("head fitting cancelled")
        module.train()
        order = torch.randperm(num_items, generator=generator)
        total = 0.0
        for start in range(0, num_items, batch):
            indices = order[start:start + batch]
            if len(indices) < 2 and num_items >= 2:  # BatchNorm needs two items; fold a lone item into the next epoch
                continue
            loss = batch_loss(module, indices)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(indices)
        history.train_loss.append(total / num_items)
        module.eval()
        monitored = history.train_loss[-1]
        if val_loss is not None:
            with torch.no_grad():
                monitored = float(val_loss(module))
            history.val_loss.append(monitored)
        if monitored < best_loss - 1e-6:
            best_loss, best_state, stale = monitored, copy.deepcopy(module.state_dict()), 0
            history.best_epoch = epoch
        else:
            stale += 1
        if progress:
            progress(epoch + 1, config.max_epochs)
        if val_loss is not None and stale >= config.patience:
            log.info("early stop at epoch %d (best %d, loss %.4f)", epoch, history.best_epoch, best_loss)
            break
    if best_state is not None:
        module.load_state_dict(best_state)
    return history
