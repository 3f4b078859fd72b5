"""LlamaGen's GPT (class-conditional, or text-to-image), and PAR on it: a standard causal AR transformer.

One file, read top to bottom:

* `LlamaGenConfig`: the hyper-parameters, named as in LlamaGen's `ModelArgs`, plus `regions`,
  PAR's n. n = 1 is plain LlamaGen: raster order, one token per step. n = 4 or 16 is PAR: the grid
  is cut into a sqrt(n) x sqrt(n) arrangement of regions and the tokens are reordered so that
  slot k holds local token k // n of region k % n (`arpg.orders.regions_order`).
* The training sequence (PAR, Wang et al. 2024): `[condition, t0 .. t(n-1), M0 .. M(n-2), t(n) .. t(T-2)]`
  with the n - 1 learnable transition tokens M. Input j predicts slot j, so the first n slots come
  one at a time and every later group of n inputs predicts the next n slots at once. Attention is
  causal plus full inside each such group (`block_causal_mask` over the decode steps: the mask IS
  the decoding schedule). Every image token is rotated by the 2-D RoPE of its own grid position;
  the condition rows and transition tokens get all-zero rotations (published). The condition is
  the class token, or the 120 caption rows of LlamaGen's text-to-image GPT (`model_type` "t2i",
  `arpg.condition.TextCondition`), whose padded rows no other row attends to.
* `TransformerBlock` etc.: the module tree and parameter names of LlamaGen's GPT (and PAR's
  `spe_tok_embeddings`), so published checkpoints load with strict key and shape checks. The math
  (RMSNorm, SwiGLU, RoPE, attention) is `arpg.models.layers`, shared with ARPG.
* `LlamaGenStepEngine`: the step engine the shared sampler drives (`arpg.sample.decode`). It feeds
  each decode step's inputs at their training positions over a preallocated KV cache: the condition
  rows, n - 1 single tokens, one transition step (slot n - 1 and the transition tokens), then n
  tokens per step: T/n + n - 1 forward calls for T tokens.

Deliberate differences from the published code (see the reference notes): the model always has a
null-class row; the tokens are reordered on every training path; eval mode is as causal as train
mode; decoding keeps no state in the modules.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from arpg.errors import require
from arpg.models.base import GridGenerator, TransformerConfig
from arpg.models.layers import (FeedForward, RMSNorm, apply_rope, attention, block_causal_mask, merge_heads,
                                published_init_, raster_rope, split_heads, write_cache)
from arpg.orders import DecodeRules, regions_order, regions_schedule

# n -> the name of the order the model decodes in (arpg.orders.ORDERS)
REGION_ORDERS = {1: "raster", 4: "regions4", 16: "regions16"}


@dataclass
class LlamaGenConfig(TransformerConfig):
    """Hyper-parameters of a LlamaGen / PAR model (field names follow LlamaGen's `ModelArgs`, the
    shared ones are in `TransformerConfig`, with its text-to-image fields `model_type`, `caption_dim`
    and `cls_token_num`; its cache-size fields are left out). `regions` is PAR's n: 1 (LlamaGen), 4
    or 16; block_size is 576 (24x24) for 384px models."""

    n_kv_head: Optional[int] = None  # None = n_head; every published size has it
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly over the layers to this rate
    regions: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.n_kv_head in (None, self.n_head),
                f"n_kv_head must be None or n_head={self.n_head} (grouped-query attention is not supported; "
                f"no published size uses it), got {self.n_kv_head}")
        require(0.0 <= self.drop_path_rate < 1.0, f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        require(self.regions in REGION_ORDERS, f"regions must be one of {list(REGION_ORDERS)} (1: LlamaGen, "
                                               f"4 or 16: PAR), got {self.regions}")
        side = math.isqrt(self.regions)
        require(self.grid_size % side == 0 and self.regions < self.block_size,
                f"regions={self.regions} needs a grid side divisible by {side} and more than {self.regions} "
                f"tokens, got a {self.grid_size}x{self.grid_size} grid (block_size {self.block_size})")

    @property
    def null_class_id(self) -> int:
        """Row of `cls_embedding.embedding_table` for the unconditional class (its last row)."""
        return self.num_classes


# ---------------------------------------------------------------------------------------------
# Modules (the shared math is in arpg.models.layers; the names here are the published ones)
# ---------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection (rows: q, then k, then v)."""

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.n_head = config.n_head
        self.attn_dropout_p = config.attn_dropout_p
        self.wqkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)

    def forward(self, x: Tensor, rope: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                cache: Optional[tuple[Tensor, Tensor, int]] = None) -> Tensor:
        """x (B, T, dim), rope (B|1, T, D/2, 2). With `cache` = (k_cache, v_cache, start), the new keys and
        values are written at [start, start + T) of the preallocated (B, H, S, D) buffers and the
        queries attend to everything written so far."""
        q, k, v = (split_heads(t, self.n_head) for t in self.wqkv(x).chunk(3, dim=-1))  # (B, T, H, D) each
        q, k = apply_rope(q, rope).transpose(1, 2), apply_rope(k, rope).transpose(1, 2)  # (B, H, T, D)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = write_cache(k, v, *cache)
        out = attention(q, k, v, is_causal, attn_mask, self.attn_dropout_p if self.training else 0.0)
        return self.resid_dropout(self.wo(merge_heads(out)))


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaGenConfig, drop_path: float):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden_dim, config.ffn_dropout_p)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        if drop_path > 0:
            from timm.layers import DropPath  # only when asked for: timm takes seconds to import

            self.drop_path = DropPath(drop_path)
        else:
            self.drop_path = nn.Identity()

    def forward(self, x: Tensor, rope: Tensor, **attn_kwargs) -> Tensor:
        h = x + self.drop_path(self.attention(self.attention_norm(x), rope, **attn_kwargs))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


class TransitionTokens(nn.Module):
    """PAR's n - 1 learnable transition tokens, fed between the first n slots and the rest."""

    def __init__(self, count: int, dim: int):
        super().__init__()
        self.special_embeddings = nn.Embedding(count, dim)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class LlamaGen(GridGenerator):
    """Causal AR image generator: LlamaGen (regions = 1) or PAR (regions = 4, 16), conditioned on
    class labels or captions (`condition`, whose embedding is `cls_embedding`)."""

    family = "llamagen"
    _no_split_modules = ["TransformerBlock"]  # FSDP wraps these (accelerate reads this name)

    def __init__(self, config: LlamaGenConfig):
        super().__init__(config)
        self.cls_embedding = self.condition.embedding(config.dim)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        if config.regions > 1:
            self.spe_tok_embeddings = TransitionTokens(config.regions - 1, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        last = max(1, config.n_layer - 1)  # plain floats: the model may be built on the meta device
        self.layers = nn.ModuleList(TransformerBlock(config, config.drop_path_rate * i / last)
                                    for i in range(config.n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Published init: N(0, initializer_range) for linears and embeddings, zero head, unit norms."""
        published_init_(self, self.config.initializer_range)
        nn.init.zeros_(self.output.weight)

    @property
    def decode_rules(self) -> DecodeRules:
        """Trained on one sequence, decoded along it only: raster one token per step (n = 1), or
        PAR's regions order with its natural schedule."""
        n = self.config.regions
        text = "one token per step" if n == 1 else f"'regions': {n} single tokens, then {n} per step"
        return DecodeRules(order=REGION_ORDERS[n], steps=None, schedule="regions", fixed=True, schedule_text=text)

    # -- the sequence ---------------------------------------------------------------------------

    def slot_order(self, device: torch.device | str | None = None) -> Tensor:
        """(T,) the raster position of each slot: raster for n = 1, PAR's region order otherwise."""
        h, w = self.grid
        return regions_order(h, w, self.config.regions, device)

    def decode_steps(self) -> tuple[int, ...]:
        """Slots predicted by each forward call of a decode: n ones, then n per call."""
        h, w = self.grid
        return tuple(regions_schedule(h, w, self.config.regions))

    def sequence_positions(self, device: torch.device | str | None = None) -> Tensor:
        """(P + T + n - 1,) the raster position of each input of the full sequence [P condition rows,
        slots 0..n-1, n - 1 transitions, slots n..T-1]; -1 for the condition and transition tokens."""
        order, n = self.slot_order(device), self.config.regions
        none = order.new_full((max(self.condition.rows, n - 1),), -1)
        return torch.cat([none[:self.condition.rows], order[:n], none[:n - 1], order[n:]])

    def sequence_rope(self, positions: Tensor) -> Tensor:
        """RoPE (..., D/2, 2) of sequence inputs at raster `positions` (...,), all zeros where -1."""
        cfg = self.config
        rope = raster_rope(positions.clamp(min=0), cfg.grid_size, cfg.head_dim, cfg.rope_base)
        return rope.masked_fill((positions < 0)[..., None, None], 0.0)

    def sequence_mask(self, device: torch.device | str | None = None) -> Tensor:
        """(L, L) bool over the L = P + T + n - 1 inputs, True where input i may attend to input j:
        causal, plus full attention inside each group of n inputs after the first n (the
        reference's group mask)."""
        steps = self.decode_steps()  # steps[0] = 1: the last condition row predicts slot 0
        return block_causal_mask([1] * self.condition.rows + [*steps[1:], self.config.regions], device=device)

    def attention_mask(self, conditions: Any, length: int,
                       device: torch.device | str | None = None) -> Optional[Tensor]:
        """The mask of the first `length` inputs: (length, length), or (B, 1, length, length) when
        the condition hides some of its rows (padded caption rows: no other row attends to them,
        each still attends to itself, as published); None for plain causal attention."""
        keys = self.condition.key_mask(conditions)  # (B, P) or None
        if keys is None and self.config.regions == 1:
            return None
        mask = self.sequence_mask(device)[:length, :length]
        if keys is None:
            return mask
        visible = F.pad(keys, (0, length - keys.shape[1]), value=True)[:, None, :]  # (B, 1, length)
        return (mask & (visible | torch.eye(length, dtype=torch.bool, device=device)))[:, None]

    def transition_embeddings(self, batch: int) -> Tensor:
        """(batch, n - 1, dim): the transition tokens (none for n = 1)."""
        if self.config.regions == 1:
            return self.tok_embeddings.weight.new_zeros(batch, 0, self.config.dim)
        return self.spe_tok_embeddings.special_embeddings.weight.expand(batch, -1, -1)

    # -- the network ----------------------------------------------------------------------------

    def transformer(self, x: Tensor, rope: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                    cache: Optional[tuple[Tensor, Tensor, int]] = None) -> Tensor:
        """The blocks over inputs x (B, L, dim) with RoPE (B|1, L, D/2, 2) -> (B, L, dim). `cache` =
        (k_cache, v_cache, start), (n_layer, B, H, S, D) each: write at [start, start + L) and attend
        to all that is cached."""
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else (cache[0][i], cache[1][i], cache[2])
            x = block(x, rope, attn_mask=attn_mask, is_causal=is_causal, cache=layer_cache)
        return x

    def head(self, h: Tensor) -> Tensor:
        """Float32 logits (..., vocab_size) of block outputs (..., dim)."""
        return self.output(self.norm(h)).float()

    @property
    def system(self) -> str:
        return "PAR" if self.config.regions > 1 else "LlamaGen"

    # -- training forward -----------------------------------------------------------------------

    def forward(self, tokens: Tensor, conditions: Any, generator: Optional[torch.Generator] = None,
                check: bool = True, drop_labels: bool = True,
                return_logits: bool = True) -> tuple[Optional[Tensor], Tensor]:
        """Teacher-forced pass over the model's own sequence (raster, or PAR's regions).

        Args:
            tokens: (B, T) image tokens in raster order, values in [0, vocab_size); reordered here.
            conditions: a batch of B conditions of the model's `condition` (class ids (B,), or
                `Captions`).
            generator: RNG for condition dropout (training only).
            check: validate the values of tokens and conditions (`check_inputs`); shapes and
                dtypes are always checked.
            drop_labels, return_logits: as in `ARPG.forward` (the training loop drops the conditions
                itself and needs only the loss).
        Returns:
            logits (B, T, vocab_size) float32 in raster order (None without `return_logits`), and
            the mean cross-entropy.
        """
        B, T = self.check_inputs(tokens, conditions, values=check)
        n, P, device = self.config.regions, self.condition.rows, tokens.device
        if self.training and drop_labels:
            conditions = self.condition.drop(conditions, self.config.class_dropout_prob, generator)
        order = self.slot_order(device)  # (T,)
        slots = tokens[:, order]  # (B, T) in slot order
        fed = self.tok_embeddings(slots[:, :-1])  # the last slot is only a target
        x = torch.cat([self.cls_embedding(conditions), fed[:, :n], self.transition_embeddings(B),
                       fed[:, n:]], dim=1)  # (B, P + T + n - 2, dim)
        length = x.shape[1]
        rope = self.sequence_rope(self.sequence_positions(device)[:length])[None]
        # Plain causal attention (flash kernels) unless PAR's groups or padded captions need a mask.
        mask = self.attention_mask(conditions, length, device)
        h = self.transformer(self.tok_dropout(x), rope, attn_mask=mask, is_causal=mask is None)
        # the last condition row predicts slot 0, input P - 1 + k slot k; the last n - 1 inputs are unused
        logits_in_slots = self.head(h[:, P - 1:P - 1 + T])
        loss = F.cross_entropy(logits_in_slots.flatten(0, 1), slots.flatten())
        if not return_logits:
            return None, loss
        return torch.empty_like(logits_in_slots).index_copy_(1, order, logits_in_slots), loss

    # -- decoding and checkpoints ---------------------------------------------------------------

    def step_engine(self, conditions: Any, order: Tensor, tokens_per_step: Sequence[int], grid: tuple[int, int],
                **runtime) -> LlamaGenStepEngine:
        """The step engine of one decode (see `LlamaGenStepEngine`)."""
        return LlamaGenStepEngine(self, conditions, order, tokens_per_step, grid, **runtime)

    @staticmethod
    def fields_from_state_dict(state: Mapping[str, Tensor]) -> Optional[dict]:
        """The config fields a LlamaGen / PAR state dict's shapes determine (dim, n_layer, vocab_size,
        regions, and num_classes, or for a text-to-image model model_type, caption_dim and
        cls_token_num), or None when it is not this family's layout."""
        classes = state.get("cls_embedding.embedding_table.weight")
        captions = state.get("cls_embedding.uncond_embedding")
        if "tok_embeddings.weight" not in state or (classes is None and captions is None):
            return None
        vocab_size, dim = state["tok_embeddings.weight"].shape
        transitions = state.get("spe_tok_embeddings.special_embeddings.weight")
        if classes is not None:
            condition = {"num_classes": classes.shape[0] - 1}
        else:
            condition = {"model_type": "t2i", "cls_token_num": captions.shape[0], "caption_dim": captions.shape[1]}
        return {"dim": dim, "n_layer": sum(1 for k in state if k.endswith(".attention_norm.weight")),
                "vocab_size": vocab_size, "regions": 1 if transitions is None else transitions.shape[0] + 1,
                **condition}


# ---------------------------------------------------------------------------------------------
# The step engine of the sampler
# ---------------------------------------------------------------------------------------------

def _cached_step(model: LlamaGen, x: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, start: int,
                 attn_mask: Optional[Tensor] = None) -> Tensor:
    """One cached forward call: inputs x (B, m, dim) at sequence positions [start, start + m) see
    everything cached and each other (they form one group of the mask), except where `attn_mask`
    (B|1, 1, m, start + m) hides keys -> logits (B, m, V)."""
    return model.head(model.transformer(x, rope, attn_mask=attn_mask, cache=(k_cache, v_cache, start)))


@functools.cache
def _compiled_step() -> Callable[..., Tensor]:
    return torch.compile(_cached_step, dynamic=True)


class LlamaGenStepEngine:
    """The forward passes of one LlamaGen / PAR decode: call it with the tokens chosen at the
    previous step (None at the first) and it returns the float32 logits (rows, m, V) of this
    step's slots.

    Call 0 feeds the P condition rows at sequence positions [0, P); its last row predicts slot 0.
    Call c > 0 feeds m_c inputs at [P - 1 + e_(c-1), P - 1 + e_c) (e_c: the slots predicted by
    calls 0..c, m_c = `tokens_per_step[c]`), which predict the next m_c slots: calls 1 .. n-1 the
    previous slot; call n slot n - 1 and the n - 1 transition tokens; later calls the previous n
    slots. The positions, RoPE and attention are the training ones, so each conditional logit
    equals the teacher-forced logit of its slot. The KV cache lives here, never in the model.

    Args:
        conditions: a batch of `rows` conditions (the unconditional ones for the guidance rows).
        order, tokens_per_step, grid: the plan; they must be the model's own (`decode_rules`).
        causal_within_step: not supported (the family attends fully within a group, as trained).
        use_cache: False recomputes the whole prefix at every call (same logits; for tests).
        compile: torch.compile the cached call (dynamic shapes).
        static: not supported (fixed-shape steps are ARPG's).
        cache_dtype: dtype of the KV cache (default: the weights').
    """

    def __init__(self, model: LlamaGen, conditions: Any, order: Tensor, tokens_per_step: Sequence[int],
                 grid: tuple[int, int], causal_within_step: bool = False, use_cache: bool = True,
                 compile: bool = False, static: bool = False, cache_dtype: Optional[torch.dtype] = None):
        cfg, device = model.config, model.tok_embeddings.weight.device
        rows = model.condition.batch_size(conditions)
        require(not static, "static=True is for ARPG only: LlamaGen and PAR decode with growing cache slices; "
                            "leave it False")
        require(not causal_within_step, "causal_within_step=True is for ARPG only: LlamaGen and PAR decode as they "
                                        "are trained (full attention within each group of n); leave it False")
        require(tuple(grid) == model.grid, f"grid: the model decodes its own {model.grid} grid, got {tuple(grid)}")
        require(tuple(tokens_per_step) == model.decode_steps(),
                f"tokens_per_step must be the model's own schedule (n = {cfg.regions}: {cfg.regions} single steps, "
                f"then {cfg.regions} per step), got {list(tokens_per_step)}")
        own = model.slot_order(device)
        require(order.shape[-1] == own.shape[0] and torch.equal(order.to(device), own.expand_as(order)),
                f"order must be the model's own ({REGION_ORDERS[cfg.regions]!r})")
        self.model, self.step = model, 0
        P = model.condition.rows
        self.tokens_per_step = list(tokens_per_step)
        ends = [P - 1 + e for e in itertools.accumulate(tokens_per_step)]
        self.bounds = [(0, P), *zip(ends[:-1], ends[1:])]  # sequence positions fed by each call
        self.rope = model.sequence_rope(model.sequence_positions(device))[None]  # (1, P + T + n - 1, D/2, 2)
        self.prefix = model.cls_embedding(conditions)  # (rows, P, dim)
        length = ends[-1]  # the inputs fed: positions 0 .. P - 2 + T (the last group is never fed)
        # None: every call attends to all that is cached (class tokens); else (rows|1, 1, length, length)
        self.mask = model.attention_mask(conditions, length, device) if P > 1 else None
        dtype = model.tok_embeddings.weight.dtype
        if use_cache:
            shape = (cfg.n_layer, rows, cfg.n_head, length, cfg.head_dim)
            self.k_cache = torch.zeros(shape, dtype=cache_dtype or dtype, device=device)
            self.v_cache = torch.zeros(shape, dtype=cache_dtype or dtype, device=device)
            self.step_fn = _compiled_step() if compile else _cached_step
        else:
            self.k_cache = None
            self.inputs = torch.zeros(rows, length, cfg.dim, dtype=dtype, device=device)
            if self.mask is None:
                self.mask = model.sequence_mask(device)[:length, :length]

    def __call__(self, fed: Optional[Tensor]) -> Tensor:
        model, n = self.model, self.model.config.regions
        start, end = self.bounds[self.step]
        if fed is None:
            x = self.prefix
        else:
            x = model.tok_embeddings(fed)  # (rows, m, dim)
            if self.step == n:  # the transition step: slot n - 1, then the transition tokens
                x = torch.cat([x, model.transition_embeddings(x.shape[0])], dim=1)
        m = self.tokens_per_step[self.step]  # the slots predicted: the last m inputs' outputs
        self.step += 1
        if self.k_cache is not None:
            mask = None if self.mask is None else self.mask[..., start:end, :end]
            logits = self.step_fn(model, x, self.rope[:, start:end], self.k_cache, self.v_cache, start, mask)
            return logits if logits.shape[1] == m else logits[:, -m:].contiguous()  # the sampler works in place
        self.inputs[:, start:end] = x
        h = model.transformer(self.inputs[:, :end], self.rope[:, :end], attn_mask=self.mask[..., :end, :end])
        return model.head(h[:, end - m:end])
