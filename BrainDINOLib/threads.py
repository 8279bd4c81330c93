"""Torch's intra-op thread count, set for the duration of a block."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run torch with `count` intra-op threads inside the block (`None`: leave the setting alone).

    Small workloads (fitting a head on cached features) lose far more to OpenMP synchronisation than they
    gain from a second thread: a few-shot fit took 27 s with 2 threads and 2.7 s with 1 on a 2-core machine
    with one core busy.
    """
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
