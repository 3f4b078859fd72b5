"""The ARPG transformer: a guided decoder for random-order autoregressive image generation.

One file, read top to bottom:

* `ARPGConfig`: the hyper-parameters, named as in the published ModelArgs so configs map 1:1.
* `SelfDecoder` blocks (first half): causal self-attention over the content sequence
  `[class, t_order[0], t_order[1], ...]`, each token rotated by the 2-D RoPE of its own position.
* One shared K/V projected from the normalised self-decoder output (`shared_kv`).
* `CrossDecoder` blocks (second half): content-free `target_queries` (the mask embedding, rotated
  by the position it must predict) attend causally to the shared K/V, so query k sees the class
  token and the first k content tokens of the order and predicts the token at `order[k]`.
* `ARPG`: the model, its teacher-forced `forward`, and the cached step-wise entry points
  (`new_cache`, `extend`, `predict`) that `ARPGDecoder` drives for the sampler.

The module tree and parameter names equal the published implementation's, so its checkpoints load
with `strict=True` (see `arpg.checkpoint`). The shared math (RMSNorm, SwiGLU, RoPE, attention) is
in `arpg.models.layers`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from arpg.condition import ClassCondition
from arpg.errors import require
from arpg.orders import DecodeRules
from arpg.models.layers import (FeedForward, RMSNorm, apply_rope, attention, merge_heads, raster_rope, split_heads,
                                swiglu_hidden_dim, write_cache)

CLS_ROPE_CHOICES = ("zeros", "identity")


@dataclass
class ARPGConfig:
    """Hyper-parameters of an ARPG model (field names follow the published `ModelArgs`).

    `cls_rope` is the one addition: the rotation given to the class token. "zeros" (published,
    required by the released checkpoints) zeroes the class token's q and k, so every query scores
    it at exactly 0; "identity" (cos 1, sin 0) leaves them free, which learns class conditioning
    noticeably faster on small data.
    """

    dim: int = 1024
    n_layer: int = 24
    n_head: int = 16
    vocab_size: int = 16384
    block_size: int = 256  # tokens per image, a square grid (16x16 for VQ-16 at 256px)
    num_classes: int = 1000
    cls_token_num: int = 1
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    class_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    cls_rope: str = "zeros"

    def __post_init__(self) -> None:
        for name in ("dim", "n_layer", "n_head", "vocab_size", "block_size", "num_classes", "multiple_of"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.n_layer % 2 == 0,
                f"n_layer must be even (half self-decoder, half cross-decoder), got {self.n_layer}")
        require(self.dim % self.n_head == 0, f"dim must be divisible by n_head, got dim={self.dim}, n_head={self.n_head}")
        require(self.head_dim % 4 == 0, f"dim // n_head must be a multiple of 4 for 2-D RoPE, got {self.head_dim}")
        require(math.isqrt(self.block_size) ** 2 == self.block_size,
                f"block_size must be a perfect square (a square token grid), got {self.block_size}")
        require(self.cls_token_num == 1, f"cls_token_num must be 1 (as in the published model), got {self.cls_token_num}")
        require(self.cls_rope in CLS_ROPE_CHOICES, f"cls_rope must be one of {CLS_ROPE_CHOICES}, got {self.cls_rope!r}")
        for name in ("token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p", "class_dropout_prob"):
            require(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def ffn_hidden_dim(self) -> int:
        return swiglu_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    # Embedding-table layout (published): [0, V) image tokens, V mask token (query input),
    # V + 1 + c class c, V + C + 1 null class (unconditional), V + C + 2 unused.
    @property
    def mask_token_id(self) -> int:
        return self.vocab_size

    @property
    def class_token_offset(self) -> int:
        return self.vocab_size + 1

    @property
    def null_class_id(self) -> int:
        return self.vocab_size + self.num_classes + 1

    @property
    def embedding_rows(self) -> int:
        return self.vocab_size + self.num_classes + 3

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Blocks (the shared math is in arpg.models.layers; the names here are the published ones)
# ---------------------------------------------------------------------------------------------

class _AttentionOutput(nn.Module):
    """Scaled dot-product attention followed by the output projection (shared by both halves)."""

    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.n_head = config.n_head
        self.attn_dropout_p = config.attn_dropout_p
        self.proj = nn.Linear(config.dim, config.dim, bias=False)
        self.proj_drop = nn.Dropout(config.resid_dropout_p)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool, attn_mask: Optional[Tensor]) -> Tensor:
        # q (B, H, Tq, D), k/v (B, H, Tk, D)
        out = attention(q, k, v, is_causal, attn_mask, self.attn_dropout_p if self.training else 0.0)
        return self.proj_drop(self.proj(merge_heads(out)))


class SelfAttention(_AttentionOutput):
    def __init__(self, config: ARPGConfig):
        super().__init__(config)
        self.to_q = nn.Linear(config.dim, config.dim, bias=False)
        self.to_k = nn.Linear(config.dim, config.dim, bias=False)
        self.to_v = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: Tensor, rope: Tensor, is_causal: bool = True, attn_mask: Optional[Tensor] = None,
                cache: Optional[tuple[Tensor, Tensor, int]] = None) -> Tensor:
        """x (B, T, dim), rope (B|1, T, D/2, 2). With `cache` = (k_cache, v_cache, start), the new keys
        and values are written at [start, start + T) of the preallocated (B, H, S, D) buffers and
        the queries attend to everything written so far."""
        q = apply_rope(split_heads(self.to_q(x), self.n_head), rope).transpose(1, 2)  # (B, H, T, D)
        k = apply_rope(split_heads(self.to_k(x), self.n_head), rope).transpose(1, 2)
        v = split_heads(self.to_v(x), self.n_head).transpose(1, 2)
        if cache is not None:
            k, v = write_cache(k, v, *cache)
        return self._attend(q, k, v, is_causal, attn_mask)


class CrossAttention(_AttentionOutput):
    """Target queries attend to the shared K/V; only the query projection is owned per block."""

    def __init__(self, config: ARPGConfig):
        super().__init__(config)
        self.to_q = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: Tensor, shared_k: Tensor, shared_v: Tensor, target_rope: Tensor,
                is_causal: bool = True) -> Tensor:
        q = apply_rope(split_heads(self.to_q(x), self.n_head), target_rope).transpose(1, 2)
        return self._attend(q, shared_k, shared_v, is_causal, None)


class SelfDecoder(nn.Module):
    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.attn = SelfAttention(config)
        self.ffn = FeedForward(config.dim, config.ffn_hidden_dim, config.ffn_dropout_p)
        self.attn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, **attn_kwargs) -> Tensor:
        h = x + self.attn(self.attn_norm(x), rope, **attn_kwargs)
        return h + self.ffn(self.ffn_norm(h))


class CrossDecoder(nn.Module):
    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.attn = CrossAttention(config)
        self.ffn = FeedForward(config.dim, config.ffn_hidden_dim, config.ffn_dropout_p)
        self.attn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)

    def forward(self, x: Tensor, shared_k: Tensor, shared_v: Tensor, target_rope: Tensor,
                is_causal: bool = True) -> Tensor:
        h = x + self.attn(self.attn_norm(x), shared_k, shared_v, target_rope, is_causal)
        return h + self.ffn(self.ffn_norm(h))


class GuidedDecoder(nn.Module):
    """The two halves and the shared K/V projection between them (`layers.*` in checkpoints)."""

    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.n_head = config.n_head
        self.self_dec = nn.ModuleList(SelfDecoder(config) for _ in range(config.n_layer // 2))
        self.cross_dec = nn.ModuleList(CrossDecoder(config) for _ in range(config.n_layer // 2))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.to_k = nn.Linear(config.dim, config.dim, bias=False)
        self.to_v = nn.Linear(config.dim, config.dim, bias=False)

    def shared_kv(self, content: Tensor, rope: Tensor) -> tuple[Tensor, Tensor]:
        """Project the self-decoder output (B, T, dim) to the one K/V set all cross blocks read.
        K carries the content tokens' own positions. Returns (B, H, T, D) each."""
        x = self.norm(content)
        k = apply_rope(split_heads(self.to_k(x), self.n_head), rope).transpose(1, 2)
        v = split_heads(self.to_v(x), self.n_head).transpose(1, 2)
        return k, v


# ---------------------------------------------------------------------------------------------
# Inference cache
# ---------------------------------------------------------------------------------------------

class KVCache:
    """Preallocated keys/values for one sampling call, written in place as content is fed.

    Holds per self-decoder layer K/V and the one shared K/V, each (B, H, max_len, D) where
    max_len = class token + all image tokens; `length` is how many content positions are filled.
    """

    def __init__(self, config: ARPGConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (config.n_layer // 2, batch, config.n_head, max_len, config.head_dim)
        self.self_k = torch.zeros(shape, dtype=dtype, device=device)
        self.self_v = torch.zeros(shape, dtype=dtype, device=device)
        self.shared_k = torch.zeros(shape[1:], dtype=dtype, device=device)
        self.shared_v = torch.zeros(shape[1:], dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class ARPG(nn.Module):
    """Guided random-order autoregressive image generator (class-conditional)."""

    family = "arpg"
    # The published sampler's defaults; any order and schedule can be decoded.
    decode_rules = DecodeRules(order="random", steps=64, schedule="arccos")

    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.config = config
        self.condition = ClassCondition(config.num_classes)
        self.embeddings = nn.Embedding(config.embedding_rows, config.dim)
        self.embed_drop = nn.Dropout(config.token_dropout_p)
        self.layers = GuidedDecoder(config)
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Published init: N(0, initializer_range) for linears and embeddings, zero head, unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        nn.init.zeros_(self.head.weight)

    @property
    def grid(self) -> tuple[int, int]:
        """The token grid (h, w) the model was trained on."""
        return self.config.grid_size, self.config.grid_size

    # -- positions and the condition --------------------------------------------------------------

    def position_rope(self, positions: Tensor, grid_width: Optional[int] = None) -> Tensor:
        """RoPE (..., D/2, 2) of raster positions r = row * grid_width + col (default: the training grid)."""
        width = self.config.grid_size if grid_width is None else grid_width
        return raster_rope(positions, width, self.config.head_dim, self.config.rope_base)

    def class_rope(self, batch: int = 1, device: torch.device | str | None = None) -> Tensor:
        """RoPE (batch, 1, D/2, 2) of the class token: all zeros (published) or identity."""
        rope = torch.zeros(batch, 1, self.config.head_dim // 2, 2, device=device)
        if self.config.cls_rope == "identity":
            rope[..., 0] = 1.0
        return rope

    def class_ids(self, labels: Tensor) -> Tensor:
        """Embedding ids (B,) of class labels; the null label (`ClassCondition.NULL`) is the unconditional class."""
        return torch.where(labels == ClassCondition.NULL, self.config.null_class_id,
                           labels + self.config.class_token_offset)

    # -- training forward -----------------------------------------------------------------------

    def forward(self, tokens: Tensor, labels: Tensor, order: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """Teacher-forced pass over a random (or given) order.

        Args:
            tokens: (B, T) image tokens in raster order, values in [0, vocab_size).
            labels: (B,) class ids in [0, num_classes).
            order: (B, T) per-sample permutations of raster positions, `order[b, k]` being the
                position predicted k-th; a fresh random permutation per sample when None.
            generator: RNG for the random order and class dropout (training only).
        Returns:
            logits (B, T, vocab_size) float32 in raster order, and the mean cross-entropy.
        """
        B, T = self._check_inputs(tokens, labels, order)
        device = tokens.device
        if order is None:
            order = torch.rand(B, T, device=device, generator=generator).argsort(dim=1)
        if self.training:
            labels = self.condition.drop(labels, self.config.class_dropout_prob, generator)

        tokens_in_order = tokens.gather(1, order)  # (B, T)
        content_ids = torch.cat([self.class_ids(labels)[:, None], tokens_in_order[:, :-1]], dim=1)  # (B, T)
        order_rope = self.position_rope(order)  # (B, T, D/2, 2)
        content_rope = torch.cat([self.class_rope(B, device), order_rope[:, :-1]], dim=1)

        shared_k, shared_v = self.content_kv(content_ids, content_rope, is_causal=True)
        logits_in_order = self.target_logits(shared_k, shared_v, order_rope, is_causal=True)

        loss = F.cross_entropy(logits_in_order.flatten(0, 1), tokens_in_order.flatten())
        logits = torch.empty_like(logits_in_order).scatter_(
            1, order[..., None].expand_as(logits_in_order), logits_in_order)
        return logits, loss

    def content_kv(self, content_ids: Tensor, content_rope: Tensor, is_causal: bool = True,
                   attn_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """The self half over a whole content sequence (B, L) -> the shared K/V, (B, H, L, D) each."""
        content = self.embed_drop(self.embeddings(content_ids))
        for block in self.layers.self_dec:
            content = block(content, content_rope, is_causal=is_causal, attn_mask=attn_mask)
        return self.layers.shared_kv(content, content_rope)

    def target_logits(self, shared_k: Tensor, shared_v: Tensor, target_rope: Tensor, is_causal: bool) -> Tensor:
        """The guided half: one content-free target query per row of `target_rope` (B, n, D/2, 2)
        reads the shared K/V -> float32 logits (B, n, vocab_size)."""
        batch, num_queries = shared_k.shape[0], target_rope.shape[1]
        mask_embedding = self.embeddings.weight[self.config.mask_token_id]
        target_queries = mask_embedding.expand(batch, num_queries, -1)
        target_rope = target_rope.expand(batch, -1, -1, -1)
        for block in self.layers.cross_dec:
            target_queries = block(target_queries, shared_k, shared_v, target_rope, is_causal)
        return self.head(self.norm(target_queries)).float()

    @torch.compiler.disable
    def _check_inputs(self, tokens: Tensor, labels: Tensor, order: Optional[Tensor]) -> tuple[int, int]:
        cfg = self.config
        require(tokens.ndim == 2 and tokens.shape[1] == cfg.block_size,
                f"tokens must have shape (B, {cfg.block_size}), got {tuple(tokens.shape)}")
        B, T = tokens.shape
        require(not tokens.dtype.is_floating_point and bool(tokens.min() >= 0) and bool(tokens.max() < cfg.vocab_size),
                f"tokens must be integers in [0, {cfg.vocab_size}) (vocab_size)")
        self.condition.check(labels, batch=B)
        if order is not None:
            require(order.shape == (B, T) and not order.dtype.is_floating_point,
                    f"order must be an integer tensor of shape ({B}, {T}), got {order.dtype} {tuple(order.shape)}")
            expected = torch.arange(T, device=order.device).expand(B, T)
            require(torch.equal(order.sort(dim=1).values, expected),
                    f"order must hold a permutation of 0..{T - 1} in every row")
        return B, T

    # -- cached, step-wise inference (driven by ARPGDecoder) ------------------------------------

    def new_cache(self, batch: int, max_len: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> KVCache:
        """Preallocate a KV cache for `batch` sequences of up to `max_len` content positions
        (default: class token + block_size)."""
        param = self.head.weight
        max_len = self.config.cls_token_num + self.config.block_size if max_len is None else max_len
        return KVCache(self.config, batch, max_len, dtype or param.dtype, param.device)

    def extend(self, ids: Tensor, rope: Tensor, cache: KVCache, causal: bool = False) -> None:
        """Feed content ids (B, n) with their RoPE (B|1, n, D/2, 2) through the self-decoder half,
        writing their per-layer K/V and shared K/V into `cache` in place.

        The new tokens see everything already cached; among themselves they attend block-wise
        (both directions, as the published sampler and the paper's few-step results) unless
        `causal` keeps the training-time causal mask.
        """
        start, n = cache.length, ids.shape[1]
        end = start + n
        require(end <= cache.max_len, f"cache holds {cache.max_len} positions; feeding {n} after {start} overflows it")
        attn_mask = None
        if causal and n > 1:
            # new token i sees cache[:start] and new tokens 0..i
            attn_mask = torch.ones(n, end, dtype=torch.bool, device=ids.device).tril(diagonal=start)
        x = self.embeddings(ids)
        for i, block in enumerate(self.layers.self_dec):
            x = block(x, rope, is_causal=False, attn_mask=attn_mask,
                      cache=(cache.self_k[i], cache.self_v[i], start))
        k, v = self.layers.shared_kv(x, rope)
        write_cache(k, v, cache.shared_k, cache.shared_v, start)
        cache.length = end

    def predict(self, target_rope: Tensor, cache: KVCache) -> Tensor:
        """Logits (B, n, vocab_size) float32 for n target positions given by their RoPE (B|1, n, D/2, 2),
        each query attending to all cached content. Queries never see one another, so a query's
        logits do not depend on how many run in parallel."""
        end = cache.length
        return self.target_logits(cache.shared_k[:, :, :end], cache.shared_v[:, :, :end], target_rope,
                                  is_causal=False)

    def decoder(self, conditions: Tensor, order: Tensor, tokens_per_step: Sequence[int],
                grid: tuple[int, int], **runtime) -> ARPGDecoder:
        """The step engine of one decode of whole grids along `order` (rows, T) (see `ARPGDecoder`)."""
        return ARPGDecoder(self, conditions, self.position_rope(order, grid_width=grid[1]), tokens_per_step,
                           **runtime)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------------
# The step engine of the sampler
# ---------------------------------------------------------------------------------------------

def _extend_and_predict(model: ARPG, cache: KVCache, ids: Optional[Tensor], rope: Optional[Tensor],
                        target_rope: Tensor, causal: bool) -> Tensor:
    """One cached step: feed ids (B, n) at their RoPE, then predict the targets -> (B, m, V)."""
    if ids is not None:
        model.extend(ids, rope, cache, causal=causal)
    return model.predict(target_rope, cache)


@functools.cache
def _compiled_extend_and_predict() -> Callable[..., Tensor]:
    return torch.compile(_extend_and_predict, dynamic=True)


def _batch_rope(rope: Tensor, batch: int) -> Tensor:
    """RoPE (1 or b, n, D/2, 2) -> (batch, n, D/2, 2), repeating a per-sample table for the guidance rows."""
    return rope.expand(batch, -1, -1, -1) if rope.shape[0] == 1 else rope.repeat(batch // rope.shape[0], 1, 1, 1)


class ARPGDecoder:
    """The forward passes of one ARPG decode: call it with the tokens chosen at the previous step
    (None at the first) and it returns the float32 logits (rows, n, V) of this step's targets.

    Step 0 feeds the condition token alone (it sees only itself, as in training), then the
    context tokens when editing; step s > 0 feeds the tokens chosen at step s - 1 at their own
    positions, then one content-free query per target of step s reads everything fed so far.

    Args:
        conditions: (rows,) labels, `ClassCondition.NULL` for unconditional rows.
        target_rope: (rows|b|1, N, D/2, 2) RoPE of the N positions to decode, in decode order.
        tokens_per_step: how many targets each step predicts (sums to N).
        context_ids, context_rope: (rows, K) known tokens and their RoPE, fed after the condition.
        causal_within_step: tokens fed in one step attend causally (training-like) instead of
            block-wise (published).
        use_cache: False recomputes the whole prefix at every step with the attention pattern the
            cache builds up (same logits, slow; for tests and benchmarks).
        compile: torch.compile the cached step (dynamic shapes).
        cache_dtype: dtype of the KV cache (default: the weights').
        query_open: every step queries all N - start targets not yet fed (its own first), and a
            position selector picks which of them the step commits (see `reorder_open`).

    With `query_open`, the decode order is not fixed up front: after step s the caller passes
    `reorder_open` the arrangement of the open targets that puts the committed ones first, and
    step s + 1 feeds those (the cache stays incremental; only the guided half runs for the
    queries that are not committed).
    """

    def __init__(self, model: ARPG, conditions: Tensor, target_rope: Tensor, tokens_per_step: Sequence[int],
                 context_ids: Optional[Tensor] = None, context_rope: Optional[Tensor] = None,
                 causal_within_step: bool = False, use_cache: bool = True, compile: bool = False,
                 cache_dtype: Optional[torch.dtype] = None, query_open: bool = False):
        rows, device = conditions.shape[0], conditions.device
        self.model, self.causal, self.query_open = model, causal_within_step, query_open
        self.target_rope = _batch_rope(target_rope, rows)
        if query_open:  # rearranged in place by reorder_open: an own copy, not a broadcast view
            self.target_rope = self.target_rope.contiguous()
        self.ends = [sum(tokens_per_step[:i + 1]) for i in range(len(tokens_per_step))]
        self.step = 0
        prefill = [(model.class_ids(conditions)[:, None], model.class_rope(rows, device))]
        if context_ids is not None and context_ids.shape[1]:
            prefill.append((context_ids, _batch_rope(context_rope, rows)))
        fed_slots = self.ends[-2] if len(self.ends) > 1 else 0  # the last step's tokens are never fed
        max_len = sum(ids.shape[1] for ids, _ in prefill) + fed_slots
        if use_cache:
            self.cache = model.new_cache(rows, max_len=max_len, dtype=cache_dtype)
            for ids, rope in prefill:
                model.extend(ids, rope, self.cache, causal=self.causal)
            self.step_fn = _compiled_extend_and_predict() if compile else _extend_and_predict
        else:
            self.cache = None
            self.ids = torch.cat([ids for ids, _ in prefill] + [conditions.new_zeros(rows, fed_slots)], dim=1)
            self.rope = torch.cat([rope for _, rope in prefill] + [self.target_rope[:, :fed_slots]], dim=1)
            groups = [ids.shape[1] for ids, _ in prefill] + list(tokens_per_step[:-1])
            self.visible = _visibility(groups, causal_within_step, device)  # (L, L)
            self.length = max_len - fed_slots

    def reorder_open(self, order: Tensor) -> None:
        """Rearrange the open targets of the step just run (slots start..N): slot start + i takes
        the target at start + order[:, i]. order (B, N - start) is given for the B samples and
        applies to their guidance rows too. Call it between steps, with `query_open`."""
        start = self.ends[self.step - 2] if self.step > 1 else 0
        index = order.repeat(self.target_rope.shape[0] // order.shape[0], 1)  # (rows, N - start)
        open_rope = self.target_rope[:, start:]
        self.target_rope[:, start:] = open_rope.gather(1, index[:, :, None, None].expand_as(open_rope))

    def __call__(self, fed: Optional[Tensor]) -> Tensor:
        start = self.ends[self.step - 1] if self.step else 0
        end = self.ends[self.step]
        targets = self.target_rope[:, start:] if self.query_open else self.target_rope[:, start:end]
        fed_rope = None
        if fed is not None:
            before = self.ends[self.step - 2] if self.step > 1 else 0
            fed_rope = self.target_rope[:, before:start]
        self.step += 1
        if self.cache is not None:
            return self.step_fn(self.model, self.cache, fed, fed_rope, targets, self.causal)
        if fed is not None:
            self.ids[:, self.length:self.length + fed.shape[1]] = fed
            self.rope[:, self.length:self.length + fed.shape[1]] = fed_rope  # targets may have been reordered
            self.length += fed.shape[1]
        L = self.length
        k, v = self.model.content_kv(self.ids[:, :L], self.rope[:, :L], is_causal=False,
                                     attn_mask=self.visible[:L, :L])
        return self.model.target_logits(k, v, targets, is_causal=False)


def _visibility(fed_per_call: Sequence[int], causal: bool, device: torch.device) -> Tensor:
    """(L, L) bool: content i sees content j, for the L tokens fed in calls of `fed_per_call`
    tokens each, as `extend` builds it: a token sees every earlier call and its own call
    (block-wise), or within its call only itself and earlier tokens (causal)."""
    call = torch.repeat_interleave(torch.arange(len(fed_per_call), device=device),
                                   torch.tensor(fed_per_call, device=device), output_size=sum(fed_per_call))  # (L,)
    earlier_call = call[None, :] < call[:, None]
    same_call = call[None, :] == call[:, None]
    if causal:
        same_call &= torch.ones_like(same_call).tril()
    return earlier_call | same_call
