"""From logits to tokens: temperature, top-k / top-p filtering, and an inverse-CDF draw.

A token is drawn with a uniform number given per decode slot, which is exactly sampling from the
filtered softmax and makes each sample's result depend only on its own noise: with one generator
per sample, a batch reproduces its single-sample runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus, along the last dim.

    Works on any shape (..., V). top_k = 0 (or >= V) keeps all; ties with the k-th value are kept.
    top_p keeps the smallest set of most likely tokens whose probability sums to >= top_p (after
    top-k), and always the most likely token; top_p = 1 keeps all.
    """
    if 0 < top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        mass_before = F.pad(cumulative[..., :-1], (1, 0))  # probability of the tokens ranked above
        drop_sorted = mass_before >= top_p  # the top token has mass_before 0 < top_p: always kept
        drop = drop_sorted.scatter(-1, sorted_ids, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw_tokens(logits: Tensor, uniforms: Tensor) -> Tensor:
    """Draw one token per row of logits (..., V) with uniforms (...,) in [0, 1) -> (...,) int64.

    Inverse-CDF sampling from softmax(logits): the token is the first whose cumulative weight
    exceeds u * total. The weights exp(logits - max) are left unnormalised (the total does that)
    and computed in place, so a step with many tokens makes no extra vocabulary-sized copies.
    The target stays strictly below the total, so a token of weight 0 (logit -inf) is never drawn.
    """
    cdf = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_().cumsum_(dim=-1)
    total = cdf[..., -1:]
    target = torch.minimum(uniforms[..., None].to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


@dataclass(frozen=True)
class TokenSampler:
    """Chooses the tokens of a decode step: temperature, top-k, top-p, then a draw with the
    uniforms of the step's targets. Temperature 0 is greedy (argmax).

    Called as `sampler(step, slots, logits)` with `slots` the step's targets (a slice of the N
    targets, or (B, n) target indices) and `logits` (B, n, V) float32, which it may overwrite;
    returns tokens (B, n).
    """

    uniforms: Tensor  # (B, N) one per target, drawn up front
    temperature: float | Sequence[float] = 1.0  # one for every step, or one per step
    top_k: int = 0
    top_p: float = 1.0

    def __call__(self, step: int, slots: slice | Tensor, logits: Tensor) -> Tensor:
        temperature = self.temperature if isinstance(self.temperature, (int, float)) else self.temperature[step]
        if temperature == 0:
            return logits.argmax(dim=-1)
        if temperature != 1.0:
            logits = logits.div_(temperature)
        uniforms = self.uniforms[:, slots] if isinstance(slots, slice) else self.uniforms.gather(1, slots)
        return draw_tokens(filter_logits(logits, self.top_k, self.top_p), uniforms)
