"""scikit-learn's bundled 8x8 digits as tokens (with class ids or captions), and the in-memory
token data set that holds them."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from arpg.condition import Captions, ClassCondition, TextCondition
from arpg.data.shards import dataset_identity
from arpg.errors import require


class InMemoryTokenDataset(Dataset):
    """Token sequences held in memory, with the same interface as `TokenDataset`. Items are
    (tokens, class id); with `captions` (a `Captions` batch of `condition`), (tokens, caption) and
    `num_classes` is None (the labels stay for checks of what a model draws)."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor, grid_size: tuple[int, int],
                 codebook_size: int, num_classes: int, tokenizer: str = "unknown",
                 captions: Optional[Captions] = None, condition: Optional[TextCondition] = None):
        if tokens.shape != (labels.shape[0], grid_size[0] * grid_size[1]):
            raise ValueError(f"tokens must have shape ({labels.shape[0]}, {grid_size[0] * grid_size[1]}), "
                             f"got {tuple(tokens.shape)}")
        require((captions is None) == (condition is None), "captions and their condition come together")
        self.tokens = tokens.long()
        self.labels = labels.long()
        self.grid_size = tuple(grid_size)
        self.codebook_size = codebook_size
        self.captions = None if captions is None else condition.check(captions, batch=labels.shape[0])
        self.num_classes = num_classes if captions is None else None
        self.condition = condition or ClassCondition(num_classes)
        self.tokenizer = tokenizer  # the identity of the tokenizer that made the tokens
        self.tokenizer_file = None

    @property
    def identity(self) -> dict[str, Any]:
        """What this data set is (a training run records it, a resume compares it)."""
        return dataset_identity(self)

    def set_epoch(self, epoch: int) -> None:
        """No augmentations to choose from; kept for interface parity with TokenDataset."""

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        if self.captions is not None:
            return self.tokens[index], self.condition.take(self.captions, index)
        return self.tokens[index], int(self.labels[index])


DIGITS_SPLITS = (None, "train", "test")
# Digits with captions ("a thin seven", "a bold two"): the digit's name, and its stroke, "thin"
# when the image has less ink than its class's median, else "bold"; encoded by a fixed word table.
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_STROKES = ("thin", "bold")
DIGITS_TEXT_ENCODER = "words:" + ",".join(("a", *DIGIT_STROKES, *DIGIT_NAMES))
DIGITS_CAPTION_DIM, DIGITS_CAPTION_TOKENS = 16, 4


def digit_prompt(label: int, stroke: str) -> str:
    """The caption of a digit: "a thin seven", "a bold two"."""
    require(stroke in DIGIT_STROKES, f"stroke must be one of {DIGIT_STROKES}, got {stroke!r}")
    return f"a {stroke} {DIGIT_NAMES[label]}"


def digit_strokes(tokens: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """"thin" or "bold" for each digit (N, 64): its ink below or at least the median of the real
    digits of its class (sklearn's full set)."""
    medians = digits_ink_medians()
    ink = tokens.flatten(1).sum(1).double()
    return [DIGIT_STROKES[int(i >= medians[c])] for i, c in zip(ink.tolist(), labels.tolist())]


def digits_ink_medians() -> list[float]:
    """The median ink (sum of grey levels) of the real digits of each class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = digits.images.reshape(-1, 64).sum(1)
    return [float(np.median(ink[digits.target == c])) for c in range(len(DIGIT_NAMES))]


def digits_dataset(split: str | None = None, captions: bool = False) -> InMemoryTokenDataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes) as tokens; nothing is downloaded.

    Each pixel is one token: its grey level 0..16 exactly as sklearn stores it (the
    `PixelTokenizer.digits()` encoding), in raster order, so items are (64,) LongTensors.
    `split`: None for all images, "train" or "test" for a fixed 80/20 split (every fifth image is
    a test image, which keeps the classes balanced). `captions`: condition on captions ("a thin
    seven", see `digit_prompt`) instead of class ids.
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"split must be one of {DIGITS_SPLITS}, got {split!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    tokens = torch.from_numpy(digits.images.reshape(-1, 64).astype(np.int64))  # (1797, 64)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    if split is not None:
        is_test = torch.arange(len(labels)) % 5 == 4
        keep = is_test if split == "test" else ~is_test
        tokens, labels = tokens[keep], labels[keep]
    text = {}
    if captions:
        condition = TextCondition(DIGITS_CAPTION_DIM, DIGITS_CAPTION_TOKENS, DIGITS_TEXT_ENCODER)
        prompts = [digit_prompt(c, stroke) for c, stroke in zip(labels.tolist(), digit_strokes(tokens, labels))]
        text = dict(captions=condition.check(prompts), condition=condition)
    return InMemoryTokenDataset(tokens, labels, grid_size=(8, 8), codebook_size=17, num_classes=10, tokenizer="pixel17",
                                **text)
