"""Small torch helpers shared by the engine's modules (attribution, circuits, outputs, training).

They live here, not in `attribution`, so that a module needing eval mode or a batch split
does not import the attribution engine for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from circuitray.errors import InputError


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for reading node values; restores the caller's mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def split_batch(item: object, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images and labels (None when absent) from a batch that is a tensor or a tuple."""
    if torch.is_tensor(item):
        return item, None
    if isinstance(item, (tuple, list)) and item and torch.is_tensor(item[0]):
        labels = item[1] if len(item) > 1 and torch.is_tensor(item[1]) else None
        return item[0], labels
    raise InputError(f"{where}: expected an image tensor or (images, labels, ...), "
                     f"got {type(item).__name__}")
