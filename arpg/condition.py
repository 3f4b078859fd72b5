"""What a model is conditioned on: class labels today, behind one small interface.

The sampler, the training loop and the data never look inside a condition; they ask the model's
`condition` to check it, to make its unconditional counterpart (classifier-free guidance) and to
drop it at random (guidance training), and the model embeds it. A text or image condition is a
new class here with the same four methods, plus its embedding in the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from arpg.errors import require


class ClassCondition:
    """One class id in [0, num_classes) per image; `NULL` (-1) marks the unconditional class."""

    NULL = -1

    def __init__(self, num_classes: int):
        require(num_classes >= 1, f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes

    def check(self, labels: Sequence[int] | Tensor, batch: Optional[int] = None,
              device: torch.device | str | None = None) -> Tensor:
        """Labels as an int64 (B,) tensor on `device`, after checking shape, dtype and range."""
        if not isinstance(labels, Tensor):
            labels = torch.as_tensor(list(labels), dtype=torch.long)
        want = f"({batch},)" if batch is not None else "(B,) with B >= 1"
        require(labels.ndim == 1 and labels.numel() >= 1 and (batch is None or labels.shape[0] == batch)
                and not labels.dtype.is_floating_point and labels.dtype != torch.bool,
                f"labels must be integer class ids of shape {want}, got {labels.dtype} {tuple(labels.shape)}")
        require(bool(((labels >= 0) & (labels < self.num_classes)).all()),
                f"labels must be class ids in [0, {self.num_classes}) (num_classes), "
                f"got values in [{int(labels.min())}, {int(labels.max())}]")
        return labels.to(device=device, dtype=torch.long)

    def unconditional(self, labels: Tensor) -> Tensor:
        """The null condition for each of `labels` (the guidance's unconditional rows)."""
        return torch.full_like(labels, self.NULL)

    def drop(self, labels: Tensor, prob: float, generator: Optional[torch.Generator] = None) -> Tensor:
        """Replace each label by the null class with probability `prob` (guidance training)."""
        if prob <= 0:
            return labels
        dropped = torch.rand(labels.shape, device=labels.device, generator=generator) < prob
        return torch.where(dropped, self.NULL, labels)
