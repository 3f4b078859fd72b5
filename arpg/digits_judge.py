"""Sample quality of digits models: a judge trained on real digits, and steps-vs-quality.

The CPU analogue of the paper's steps-vs-FID table. For the bundled 8x8 digits a token IS a
pixel (grey level 0..16), so samples need no decoder and a small classifier of real digits
stands in for Inception:

* `DigitsJudge` fits an MLP (one hidden layer of 64 ReLU units, pixels / 16 in) on the even-
  indexed half of scikit-learn's 1,797 digits (899 images), and reports its accuracy on the odd
  half (898 held-out images; about 96.7%).
  - `accuracy(tokens, labels)`: how often the judge recognises the requested class.
  - `features(tokens)`: the hidden-layer activations, the analogue of Inception's pool features.
    Units that fire on fewer than 1% of the reference digits are dropped (with seed 0: 5 never
    fire, 1 fires on a single image): their (near-)zero variance makes covariances (near-)
    singular and the matrix square root of the Frechet distance unreliable.
  - `frechet(tokens)`: Frechet distance of the tokens' features to those of the judge's training
    half, the reference set (as FID's reference is ImageNet-train, the set Inception learnt from).
  - `noise_floor`: the same distance for the 898 held-out real digits, which the judge never saw,
    like samples: what a perfect generator scores (up to sample-size effects: 898 images here,
    1,000 samples per setting in the benchmark). Real images the judge was trained on would not
    do: their features sit measurably closer to the reference than unseen images' do.
* `sample_digits` / `digits_class_accuracy`: class-balanced samples of a digits model, and how
  often the judge reads them as their class. A model of the captioned digits is asked with
  prompts, "a thin <digit>" and "a bold <digit>" in turn (`digit_prompt`). The training run's final check and the quality
  benchmark (`arpg.reports.quality`) use the same judge, so both report one number for one thing.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional

import numpy as np
import torch

from arpg.data import DIGIT_STROKES, DIGITS_TEXT_ENCODER, digit_prompt, digits_dataset
from arpg.errors import require
from arpg.eval import feature_statistics, frechet_distance
from arpg.sample import SamplingOptions, generate

DIGITS_LEVELS = 17  # grey levels 0..16: token ids of the digits data
DIGITS_SIDE = 8
DIGITS_CLASSES = 10
JUDGE_HIDDEN_UNITS = 64
JUDGE_MIN_FIRING = 0.01  # a feature unit must fire on at least this fraction of the reference digits


def _as_pixels(tokens: np.ndarray | torch.Tensor) -> np.ndarray:
    """Digit tokens (N, 8, 8) or (N, 64), ints in [0, 16] -> float64 pixels (N, 64) in [0, 1]."""
    array = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if array.ndim not in (2, 3) or array.shape[1:] not in ((DIGITS_SIDE, DIGITS_SIDE), (DIGITS_SIDE ** 2,)):
        raise ValueError(f"tokens must have shape (N, 8, 8) or (N, 64), got {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"tokens must be integers (grey levels 0..16), got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() >= DIGITS_LEVELS):
        raise ValueError(f"tokens must be grey levels in [0, {DIGITS_LEVELS - 1}], "
                         f"got values in [{array.min()}, {array.max()}]")
    return array.reshape(len(array), -1).astype(np.float64) / (DIGITS_LEVELS - 1)


class DigitsJudge:
    """A classifier of real 8x8 digits that scores generated digits (see the module docstring).

    Deterministic for a given `seed` (the MLP's initialisation). Fitting takes a few seconds;
    `digits_judge()` keeps one per seed.
    """

    def __init__(self, seed: int = 0):
        from sklearn.neural_network import MLPClassifier
        from threadpoolctl import threadpool_limits

        digits = digits_dataset()
        tokens, labels = digits.tokens.numpy(), digits.labels.numpy()
        is_reference = np.arange(len(labels)) % 2 == 0
        self.seed = seed
        self.reference_tokens, self.held_out_tokens = tokens[is_reference], tokens[~is_reference]
        self.held_out_labels = labels[~is_reference]
        self.classifier = MLPClassifier(hidden_layer_sizes=(JUDGE_HIDDEN_UNITS,), max_iter=3000, random_state=seed)
        # One BLAS thread: the matrices are tiny, and threads spinning on shared cores doubled the fit time.
        with threadpool_limits(limits=1):
            self.classifier.fit(_as_pixels(self.reference_tokens), labels[is_reference])
        self.held_out_accuracy = self.accuracy(self.held_out_tokens, self.held_out_labels)
        firing = (self._hidden(_as_pixels(self.reference_tokens)) > 0).mean(axis=0)  # (64,)
        self._active_units = firing >= JUDGE_MIN_FIRING
        self.reference_statistics = feature_statistics(self.features(self.reference_tokens))
        self.noise_floor = self.frechet(self.held_out_tokens)

    def _hidden(self, pixels: np.ndarray) -> np.ndarray:
        weights, bias = self.classifier.coefs_[0], self.classifier.intercepts_[0]
        return np.maximum(pixels @ weights + bias, 0.0)  # (N, 64)

    @property
    def feature_dim(self) -> int:
        return int(self._active_units.sum())

    def predict(self, tokens: np.ndarray | torch.Tensor) -> np.ndarray:
        """The judge's class (N,) for digit tokens (N, 8, 8) or (N, 64)."""
        return self.classifier.predict(_as_pixels(tokens))

    def accuracy(self, tokens: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | list[int]) -> float:
        """Fraction of the digits `tokens` whose class the judge reads as `labels` (N,)."""
        labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        predicted = self.predict(tokens)
        if labels.shape != predicted.shape:
            raise ValueError(f"labels must have shape {predicted.shape} (one per image), got {labels.shape}")
        return float((predicted == labels).mean())

    def features(self, tokens: np.ndarray | torch.Tensor) -> np.ndarray:
        """Hidden-layer activations (N, feature_dim) float64 of digit tokens (N, 8, 8) or (N, 64)."""
        return self._hidden(_as_pixels(tokens))[:, self._active_units]

    def frechet(self, tokens: np.ndarray | torch.Tensor) -> float:
        """Frechet distance between the features of `tokens` (N >= 2) and of the reference half."""
        return frechet_distance(*feature_statistics(self.features(tokens)), *self.reference_statistics)


@lru_cache(maxsize=4)
def digits_judge(seed: int = 0) -> DigitsJudge:
    """The shared `DigitsJudge` for `seed` (fitted once per process)."""
    return DigitsJudge(seed)


def check_digits_model(model: torch.nn.Module) -> None:
    """Raise unless `model` draws 8x8 digits (64 tokens of 17 grey levels, 10 classes or the digits' captions)."""
    c = model.config
    conditioned = c.num_classes == DIGITS_CLASSES if c.model_type == "c2i" else c.text_encoder == DIGITS_TEXT_ENCODER
    require((c.block_size, c.vocab_size) == (DIGITS_SIDE ** 2, DIGITS_LEVELS) and conditioned,
            f"model must be a digits model (block_size 64, vocab_size 17, num_classes 10 or the digits' captions), "
            f"got block_size {c.block_size}, vocab_size {c.vocab_size}, num_classes {c.num_classes}, "
            f"model_type {c.model_type}")


def digit_conditions(model: torch.nn.Module, labels: torch.Tensor) -> Any:
    """What asks `model` for digits `labels` (N,): the labels, or for a captioned-digits model the
    prompts, "a thin" and "a bold" alternating every 10 samples (so each class gets both)."""
    if model.config.model_type == "c2i":
        return labels
    return [digit_prompt(int(c), DIGIT_STROKES[(i // DIGITS_CLASSES) % 2]) for i, c in enumerate(labels.tolist())]


@torch.no_grad()
def sample_digits(model: torch.nn.Module, num_samples: int, seed: int = 0, batch_size: int = 500,
                  options: Optional[SamplingOptions] = None, **overrides: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced samples of a digits model: tokens (N, 8, 8) and labels (N,), on the CPU.

    Sample i has class i % 10 (`digit_conditions`). One generator seeded with `seed` drives the batches in turn, so
    the result depends on (seed, batch_size). `options` and `overrides` go to
    `arpg.sample.generate` (steps, schedule, cfg, order, ...).
    """
    check_digits_model(model)
    require(num_samples >= 1, f"num_samples must be >= 1, got {num_samples}")
    require(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
    labels = torch.arange(num_samples) % DIGITS_CLASSES
    generator = torch.Generator().manual_seed(seed)
    conditions = digit_conditions(model, labels)
    tokens = [generate(model, conditions[start:start + batch_size], options, generator=generator, **overrides).cpu()
              for start in range(0, num_samples, batch_size)]
    return torch.cat(tokens), labels


def digits_class_accuracy(model: torch.nn.Module, num_samples: int = 1000, seed: int = 0, batch_size: int = 500,
                          options: Optional[SamplingOptions] = None, **overrides: Any) -> float:
    """Fraction of `num_samples` class-balanced samples (`sample_digits`) that the judge reads as
    their requested class."""
    tokens, labels = sample_digits(model, num_samples, seed, batch_size, options, **overrides)
    return digits_judge().accuracy(tokens, labels)
