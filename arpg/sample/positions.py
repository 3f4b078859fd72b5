"""Position selectors: which of the queried positions a decode step commits.

With a fixed plan (`SamplingOptions.positions="plan"`) step s commits the next positions of the
order and no selector runs. With a selector the step engine queries every position not yet
decoded, the loop (`arpg.sample.decode.decode`) draws a token for each, and the selector returns
the open positions rearranged so that the ones to commit come first; the engine feeds those at the
next step, and the rest stay open. The number committed per step is still the plan's, so the
loop never reads a value back from the device.

A new rule is a selector and its builder here, under its name in `SELECTORS`: that name is then
a value of `SamplingOptions.positions`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class ConfidenceSelector:
    """Commits the open positions whose drawn token the model is most sure of.

    score = log p(drawn token) + noise_scales[step] * Gumbel noise, p being the softmax of the
    guided logits. With noise, the n committed positions are a draw without replacement with
    weights p(token)^(1 / scale) (the Gumbel-top-k trick); without, the n most confident ones.

    `selector.score(logits, tokens)` gives the scores (B, m) of m open targets from their
    guided float32 logits (B, m, V) and the tokens (B, m) drawn for them (the decode loop calls
    it on chunks of the open targets); then `selector(step, n, open_targets, scores)` with
    open_targets (B, M) the targets still open (indices into the decode's N targets) and their
    scores (B, M) returns order (B, M), a permutation of 0..M-1 per sample whose first n entries
    are the positions to commit.
    """

    gumbel: Tensor  # (B, S, N) Gumbel noise per step and target, drawn up front
    noise_scales: tuple[float, ...]  # (S,)

    @staticmethod
    def score(logits: Tensor, tokens: Tensor) -> Tensor:
        """log p(token) (B, m) under the softmax of logits (B, m, V)."""
        return logits.gather(-1, tokens[..., None]).squeeze(-1) - logits.logsumexp(dim=-1)

    def __call__(self, step: int, n: int, open_targets: Tensor, log_p: Tensor) -> Tensor:
        if self.noise_scales[step] > 0:
            log_p = log_p + self.noise_scales[step] * self.gumbel[:, step].gather(1, open_targets)
        # stable: equal scores keep the plan's order, on any device and batch size
        return log_p.argsort(dim=1, descending=True, stable=True)


class PositionSelector(Protocol):
    """What the decode loop asks of a selector: `score(logits, tokens)` per chunk of open
    targets, then `selector(step, n, open_targets, scores)` -> order (see `ConfidenceSelector`)."""

    def score(self, logits: Tensor, tokens: Tensor) -> Tensor: ...

    def __call__(self, step: int, n: int, open_targets: Tensor, scores: Tensor) -> Tensor: ...


def confidence_selector(options: Any, tokens_per_step: Sequence[int], known: int, total: int,
                        uniforms: Tensor) -> ConfidenceSelector:
    """The "confidence" rule: Gumbel noise of scale `options.position_noise`, annealed with the
    fraction of the canvas still undetermined before each step."""
    scales, undetermined = [], total - known
    for n in tokens_per_step:
        scales.append(options.position_noise * undetermined / total)
        undetermined -= n
    gumbel = -torch.log(-torch.log(uniforms.clamp(min=torch.finfo(uniforms.dtype).tiny)))
    return ConfidenceSelector(gumbel, tuple(scales))


# rule name -> builder(options, tokens_per_step, known, total, uniforms) of its selector; None: the
# plan's positions, no selector. (This module imports no options, so options.py can read the names.)
SELECTORS: dict[str, Optional[Callable[..., PositionSelector]]] = {
    "plan": None,
    "confidence": confidence_selector,
}


def position_selector(options: Any, tokens_per_step: Sequence[int], known: int, total: int,
                      uniforms: Tensor) -> Optional[PositionSelector]:
    """The selector of the rule `options.positions` (a `SamplingOptions`), or None for "plan".

    Args:
        tokens_per_step: the decode's step sizes.
        known, total: context tokens and all tokens of the canvas (the noise anneals with the
            fraction still undetermined before each step).
        uniforms: (B, S, N) uniforms in (0, 1) for the noise, S >= the number of steps.
    """
    build = SELECTORS[options.positions]
    return None if build is None else build(options, tokens_per_step, known, total, uniforms)
