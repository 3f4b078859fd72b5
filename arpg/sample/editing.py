"""Zero-shot editing with ARPG: inpainting, outpainting and resolution expansion.

Because an ARPG model can be asked for any set of positions, the known tokens are simply fed as
context after the condition and the unknown positions are decoded as targets, with the
same decode loop as `generate`. Larger canvases use extended 2-D RoPE (`outpaint`) or position
interpolation (`expand`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from arpg.errors import require
from arpg.models.arpg import ARPG
from arpg.models.arpg_steps import ARPGStepEngine
from arpg.models.layers import rope_2d
from arpg.orders import SCHEDULE_AWARE_ORDERS, decode_schedule, locality_order, make_order, random_order
from arpg.sample.decode import (Generators, StepEngine, cfg_scales, decode, engine_options, prepare_draws,
                                resolve_decoding)
from arpg.sample.options import SamplingOptions


def inpaint(model: ARPG, tokens: Tensor, keep_mask: Tensor, conditions: Any,
            options: Optional[SamplingOptions] = None, *, generator: Generators = None, tokenizer: Any = None,
            position_scale: float = 1.0, progress: bool = False, **overrides: Any) -> Tensor:
    """Regenerate the tokens outside `keep_mask`, conditioned on the kept ones (zero-shot).

    The kept tokens enter as context, fed in one call right after the class token, in a random
    order, and attending to each other block-wise like the tokens of any decode step (causally
    with `causal_within_step`): block-wise context predicts the hidden tokens better than a
    causal prefix (measured in docs/sampling.md, "Why editing works this way"). The unknown
    positions are then decoded as queries, `steps` steps of `schedule` over the number of
    unknown tokens (steps is capped at that number). Kept tokens are never predicted, sampled or
    changed.

    The canvas may be larger than the training grid (see `outpaint`): position (r, c) gets the
    2-D RoPE of (r, c) * position_scale, whatever the canvas size.

    Samples whose masks leave different numbers of unknown tokens are decoded in separate batched
    runs, one per count. Their noise is drawn per canvas position up front, so the grouping
    changes no sample's draws.

    Args:
        tokens: (B, H, W) token grid; values outside keep_mask are ignored.
        keep_mask: bool (B, H, W) or (H, W), True where a token is kept.
        conditions: B conditions of the model's `condition` (class ids; prompts for a text model).
        options, overrides: the `SamplingOptions`, as in `generate`; `order` orders the unknown
            positions (a name, or a permutation of the H * W canvas positions, restricted to the
            unknown ones); unset steps, schedule and order are ARPG's own (64, arccos, random).
        position_scale: factor from canvas coordinates to RoPE coordinates (`expand` uses 1/factor).
        generator, tokenizer, progress: as in `generate`.
    Returns:
        tokens (B, H, W), or images with a tokenizer.
    """
    require(isinstance(model, ARPG), f"model: editing needs an ARPG model (any position can be queried), "
                                     f"got {model.system}")
    draws = prepare_draws(model, conditions, options, overrides, generator, tokenizer)
    options, conditions, B, device, condition = draws.options, draws.conditions, draws.batch, draws.device, model.condition
    tokens, known = _check_canvas(model, tokens, keep_mask, B)
    H, W = tokens.shape[1:]
    order, steps, schedule = resolve_decoding(model.decode_rules, options)
    require(options.steps is None or options.steps <= H * W, f"steps must be in [1, {H * W}] (canvas tokens), "
                                                             f"got {options.steps}")
    require(position_scale > 0, f"position_scale must be > 0, got {position_scale}")

    # All randomness up front, per generator part: a random context order, the decode order
    # (both as ranks over canvas positions), then the draws' noise per canvas position.
    parts = draws.parts
    context_rank = _ranks(torch.cat([random_order(rows, H * W, g, device) for rows, g in parts]))
    if isinstance(order, Tensor):
        order_rank = _ranks(make_order(order, B, H, W, device=device))
    else:
        order_rank = _ranks(torch.cat([make_order(order, rows, H, W, g, device) for rows, g in parts]))
    draws.draw_noise(H * W, steps if steps is not None else len(schedule))  # the most steps any count's decode takes
    coordinates = torch.arange(H * W, device=device)
    rope = rope_2d((coordinates // W) * position_scale, (coordinates % W) * position_scale,
                   model.config.head_dim, model.config.rope_base)  # (H*W, D/2, 2)

    tokens, known = tokens.flatten(1).clone(), known.flatten(1)  # (B, H*W)
    unknown_counts = (~known).sum(1)  # (B,)
    for N in sorted(set(unknown_counts.tolist()) - {0}):
        rows = (unknown_counts == N).nonzero().flatten()
        K = H * W - N
        # ranks < H*W, so sorting on H*W * flag + rank puts the known positions first in
        # random-context order, or the unknown ones first in decode order.
        context_pos = (H * W * (~known[rows]).long() + context_rank[rows]).argsort(dim=1)[:, :K]  # (G, K)
        target_pos = (H * W * known[rows].long() + order_rank[rows]).argsort(dim=1)[:, :N]  # (G, N)
        tokens_per_step = decode_schedule(N, min(steps, N) if steps is not None else None, schedule)
        if isinstance(order, str) and order in SCHEDULE_AWARE_ORDERS:  # spread around the known tokens
            target_pos = locality_order(order_rank[rows].argsort(dim=1), H, W, tokens_per_step, known[rows])
        context_ids = tokens[rows].gather(1, context_pos)
        sampler, select = draws.rules(target_pos, tokens_per_step, K, H * W, rows)  # a selector sees the unknown only
        runtime = engine_options(options, query_open=select is not None)

        def make_engine(engine_rows: Any, cache_dtype: torch.dtype) -> StepEngine:
            repeat = condition.batch_size(engine_rows) // context_ids.shape[0]  # 2 with guidance: the same context
            return ARPGStepEngine(model, engine_rows, rope[target_pos], tokens_per_step,
                               context_ids=context_ids.repeat(repeat, 1), context_rope=rope[context_pos],
                               cache_dtype=cache_dtype, **runtime)

        scales = cfg_scales(options, tokens_per_step, known=K, total=H * W)
        new = decode(model, condition.take(conditions, rows), make_engine, tokens_per_step, sampler, scales, progress,
                     select, bf16=draws.bf16)
        tokens[rows] = tokens[rows].scatter(1, target_pos, new)
    return draws.output(tokens.view(B, H, W))


def outpaint(model: ARPG, tokens: Tensor, conditions: Any, size: tuple[int, int],
             offset: Optional[tuple[int, int]] = None, options: Optional[SamplingOptions] = None,
             **kwargs: Any) -> Tensor:
    """Place `tokens` (B, h, w) on a larger (H, W) = `size` canvas at `offset` (top, left; default
    centred) and generate everything around them; the canvas may exceed the training grid
    (e.g. 8x32 tokens from an 8x8 digits model). `options` and `kwargs` are `inpaint`'s.

    Method: extended 2-D RoPE, the whole canvas in one decode. RoPE is relative, so every query
    still sees its neighbours at the offsets it was trained on; only the sequence gets longer
    (one pass rather than overlapping windows, which leave seams: docs/sampling.md).
    """
    require(tokens.ndim == 3, f"tokens must have shape (B, h, w), got {tuple(tokens.shape)}")
    B, h, w = tokens.shape
    H, W = size
    require(H >= h and W >= w, f"size must be at least the tokens' grid ({h}, {w}), got {tuple(size)}")
    top, left = offset if offset is not None else ((H - h) // 2, (W - w) // 2)
    require(0 <= top <= H - h and 0 <= left <= W - w,
            f"offset must be in [0, {H - h}] x [0, {W - w}] to fit the tokens, got {(top, left)}")
    canvas = tokens.new_zeros(B, H, W)
    canvas[:, top:top + h, left:left + w] = tokens
    keep = torch.zeros(H, W, dtype=torch.bool, device=tokens.device)
    keep[top:top + h, left:left + w] = True
    return inpaint(model, canvas, keep, conditions, options, **kwargs)


def expand(model: ARPG, tokens: Tensor, conditions: Any, factor: int = 2,
           options: Optional[SamplingOptions] = None, **kwargs: Any) -> Tensor:
    """Resolution expansion: a (B, factor*h, factor*w) grid that contains the low-resolution grid
    `tokens` (B, h, w) at every factor-th position, (i, j) -> (factor*i, factor*j), the rest
    generated. `options` and `kwargs` are `inpaint`'s (except position_scale).

    Method: position interpolation. The fine grid's RoPE coordinates are its positions divided
    by `factor`, so every low-resolution token keeps exactly the coordinates it has in the
    training grid (the context is one whole in-distribution image) and the new tokens sit at the
    fractional coordinates between them (rather than extended RoPE or windows, which see zoomed
    crops unlike any training image: docs/sampling.md).
    """
    require(tokens.ndim == 3, f"tokens must have shape (B, h, w), got {tuple(tokens.shape)}")
    require(isinstance(factor, int) and factor >= 1, f"factor must be an int >= 1, got {factor!r}")
    B, h, w = tokens.shape
    canvas = tokens.new_zeros(B, factor * h, factor * w)
    canvas[:, ::factor, ::factor] = tokens
    keep = torch.zeros(factor * h, factor * w, dtype=torch.bool, device=tokens.device)
    keep[::factor, ::factor] = True
    return inpaint(model, canvas, keep, conditions, options, position_scale=1.0 / factor, **kwargs)


def _check_canvas(model: ARPG, tokens: Tensor, keep_mask: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """Validate tokens (B, H, W) and keep_mask (B, H, W) or (H, W) -> both (B, H, W) on the model's device."""
    device = model.head.weight.device
    require(isinstance(tokens, Tensor) and tokens.ndim == 3 and tokens.shape[0] == batch
            and not tokens.dtype.is_floating_point,
            f"tokens must be an integer tensor of shape ({batch}, H, W) (one grid per label), "
            f"got {getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
    H, W = tokens.shape[1:]
    require(isinstance(keep_mask, Tensor) and keep_mask.dtype == torch.bool and keep_mask.shape in ((batch, H, W), (H, W)),
            f"keep_mask must be a bool tensor of shape ({batch}, {H}, {W}) or ({H}, {W}), got "
            f"{getattr(keep_mask, 'dtype', type(keep_mask).__name__)} {tuple(getattr(keep_mask, 'shape', ()))}")
    tokens, known = tokens.to(device).long(), keep_mask.to(device).expand(batch, H, W)
    kept = tokens[known]
    require(not kept.numel() or bool(kept.min() >= 0) and bool(kept.max() < model.config.vocab_size),
            f"tokens must be in [0, {model.config.vocab_size}) (vocab_size) where keep_mask is True")
    return tokens, known


def _ranks(order: Tensor) -> Tensor:
    """order (B, T) of positions -> rank (B, T): rank[b, p] = index of position p in order[b]."""
    return order.argsort(dim=1)
