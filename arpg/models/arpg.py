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
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from arpg.condition import ClassCondition
from arpg.errors import require
from arpg.models.base import GridGenerator, TransformerConfig
from arpg.orders import DecodeRules, random_order
from arpg.models.layers import (FeedForward, RMSNorm, Rotation, attention, block_causal_mask, merge_heads,
                                published_init_, raster_rope, rms_norm, rotate, rotation, split_heads, swiglu,
                                write_cache, write_cache_at)

CLS_ROPE_CHOICES = ("zeros", "identity")


@dataclass
class ARPGConfig(TransformerConfig):
    """Hyper-parameters of an ARPG model (field names follow the published `ModelArgs`; the
    shared ones are in `TransformerConfig`).

    `cls_rope` is the one addition: the rotation given to the class token. "zeros" (published,
    required by the released checkpoints) zeroes the class token's q and k, so every query scores
    it at exactly 0; "identity" (cos 1, sin 0) leaves them free, which learns class conditioning
    noticeably faster on small data.
    """

    cls_rope: str = "zeros"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.n_layer % 2 == 0,
                f"n_layer must be even (half self-decoder, half cross-decoder), got {self.n_layer}")
        require(self.cls_rope in CLS_ROPE_CHOICES, f"cls_rope must be one of {CLS_ROPE_CHOICES}, got {self.cls_rope!r}")

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


# ---------------------------------------------------------------------------------------------
# Blocks (the shared math is in arpg.models.layers; the names here are the published ones)
# ---------------------------------------------------------------------------------------------

class BlockWeights(NamedTuple):
    """One block's weights in the form its math uses. A training forward builds them from the
    parameters on every call (the concatenations are differentiable); a decode builds them once
    (`ARPG.decode_weights`), in the dtype it computes in."""

    attn_norm: Tensor  # (dim,)
    qkv: Tensor  # self blocks: [to_q; to_k; to_v] (3 dim, dim); cross blocks: to_q (dim, dim)
    proj: Tensor  # (dim, dim)
    ffn_norm: Tensor  # (dim,)
    w1: Tensor  # SwiGLU (hidden, dim)
    w3: Tensor  # (hidden, dim)
    w2: Tensor  # (dim, hidden)


class SelfAttention(nn.Module):
    """The attention parameters of a self-decoder block (published names; the math is `SelfDecoder`'s)."""

    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.proj = nn.Linear(config.dim, config.dim, bias=False)
        self.proj_drop = nn.Dropout(config.resid_dropout_p)
        self.to_q = nn.Linear(config.dim, config.dim, bias=False)
        self.to_k = nn.Linear(config.dim, config.dim, bias=False)
        self.to_v = nn.Linear(config.dim, config.dim, bias=False)

    def qkv_weight(self) -> Tensor:
        return torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])


class CrossAttention(nn.Module):
    """The attention parameters of a cross-decoder block: target queries attend to the shared K/V,
    so only the query projection is owned per block."""

    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.proj = nn.Linear(config.dim, config.dim, bias=False)
        self.proj_drop = nn.Dropout(config.resid_dropout_p)
        self.to_q = nn.Linear(config.dim, config.dim, bias=False)

    def qkv_weight(self) -> Tensor:
        return self.to_q.weight


class _Block(nn.Module):
    """Pre-norm attention, then a pre-norm SwiGLU, each added to the stream (both halves)."""

    def __init__(self, config: ARPGConfig, attn: nn.Module):
        super().__init__()
        self.attn = attn
        self.ffn = FeedForward(config.dim, config.ffn_hidden_dim, config.ffn_dropout_p)
        self.attn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.n_head, self.eps, self.attn_dropout_p = config.n_head, config.norm_eps, config.attn_dropout_p

    def weights(self) -> BlockWeights:
        """This block's parameters as `BlockWeights` (differentiable)."""
        ffn = self.ffn
        return BlockWeights(self.attn_norm.weight, self.attn.qkv_weight(), self.attn.proj.weight,
                            self.ffn_norm.weight, ffn.w1.weight, ffn.w3.weight, ffn.w2.weight)

    def _attend_then_mlp(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, is_causal: bool,
                         attn_mask: Optional[Tensor], w: BlockWeights) -> Tensor:
        # q (B, H, Tq, D), k/v (B, H, Tk, D); x (B|1, Tq|1, dim) broadcasts to (B, Tq, dim)
        out = attention(q, k, v, is_causal, attn_mask, self.attn_dropout_p if self.training else 0.0)
        x = x + self.attn.proj_drop(F.linear(merge_heads(out), w.proj))
        return x + self.ffn.ffn_dropout(swiglu(rms_norm(x, w.ffn_norm, self.eps), w.w1, w.w3, w.w2))


class SelfDecoder(_Block):
    def __init__(self, config: ARPGConfig):
        super().__init__(config, SelfAttention(config))

    def forward(self, x: Tensor, rope: Rotation, is_causal: bool = True, attn_mask: Optional[Tensor] = None,
                cache: Optional[tuple[Tensor, Tensor, int | Tensor]] = None,
                weights: Optional[BlockWeights] = None) -> Tensor:
        """x (B, T, dim), each token rotated by `rope` (B, T, D) -> (B, T, dim).

        With `cache` = (k_cache, v_cache, where) the new keys and values go into the preallocated
        (B, H, S, D) buffers: `where` an int start writes [start, start + T) and the queries attend
        to the filled prefix; `where` a device tensor of T positions writes there and the queries
        attend to the whole cache under `attn_mask` (static shapes). `weights` default to the
        parameters'."""
        w = self.weights() if weights is None else weights
        qkv = F.linear(rms_norm(x, w.attn_norm, self.eps), w.qkv).unflatten(-1, (3, self.n_head, -1))  # (B, T, 3, H, D)
        q, k = rotate(qkv[:, :, :2], rope).to(qkv.dtype).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
        v = qkv[:, :, 2].transpose(1, 2)
        if cache is not None:
            k_cache, v_cache, where = cache
            write = write_cache if isinstance(where, int) else write_cache_at
            k, v = write(k, v, k_cache, v_cache, where)
        return self._attend_then_mlp(x, q, k, v, is_causal, attn_mask, w)


class CrossDecoder(_Block):
    def __init__(self, config: ARPGConfig):
        super().__init__(config, CrossAttention(config))

    def forward(self, x: Tensor, shared_k: Tensor, shared_v: Tensor, target_rope: Rotation,
                is_causal: bool = True, attn_mask: Optional[Tensor] = None,
                weights: Optional[BlockWeights] = None) -> Tensor:
        """Target queries x (B|1, T|1, dim), rotated by `target_rope` (B, T, D), read the shared K/V
        (B, H, S, D) -> (B, T, dim). The first block gets the one mask embedding (1, 1, dim): its
        query projection runs once and the rotation spreads it over the targets."""
        w = self.weights() if weights is None else weights
        q = split_heads(F.linear(rms_norm(x, w.attn_norm, self.eps), w.qkv), self.n_head)  # (B|1, T|1, H, D)
        q = rotate(q, target_rope).to(q.dtype).transpose(1, 2)  # (B, H, T, D)
        return self._attend_then_mlp(x, q, shared_k, shared_v, is_causal, attn_mask, w)


class GuidedDecoder(nn.Module):
    """The two halves and the shared K/V projection between them (`layers.*` in checkpoints)."""

    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.n_head, self.eps = config.n_head, config.norm_eps
        self.self_dec = nn.ModuleList(SelfDecoder(config) for _ in range(config.n_layer // 2))
        self.cross_dec = nn.ModuleList(CrossDecoder(config) for _ in range(config.n_layer // 2))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.to_k = nn.Linear(config.dim, config.dim, bias=False)
        self.to_v = nn.Linear(config.dim, config.dim, bias=False)

    def kv_weights(self) -> tuple[Tensor, Tensor]:
        """(norm weight, [to_k; to_v] (2 dim, dim)) of the shared K/V projection (differentiable)."""
        return self.norm.weight, torch.cat([self.to_k.weight, self.to_v.weight])

    def shared_kv(self, content: Tensor, rope: Rotation,
                  weights: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        """Project the self-decoder output (B, T, dim) to the one K/V set all cross blocks read.
        K carries the content tokens' own positions. Returns (B, H, T, D) each."""
        norm_weight, kv_weight = self.kv_weights() if weights is None else weights
        kv = F.linear(rms_norm(content, norm_weight, self.eps), kv_weight).unflatten(-1, (2, self.n_head, -1))
        k = rotate(kv[:, :, 0], rope).to(kv.dtype).transpose(1, 2)
        return k, kv[:, :, 1].transpose(1, 2)


class DecodeWeights(NamedTuple):
    """Every weight a cached decode step multiplies by, prepared once per decode
    (`ARPG.decode_weights`): fused projections, matrices in the dtype the decode computes in."""

    self_blocks: tuple[BlockWeights, ...]
    cross_blocks: tuple[BlockWeights, ...]
    shared_kv: tuple[Tensor, Tensor]  # (norm weight, [to_k; to_v])
    norm: Tensor  # (dim,) the final norm's weight
    head: Tensor  # (vocab_size, dim)


# ---------------------------------------------------------------------------------------------
# Inference cache
# ---------------------------------------------------------------------------------------------

class KVCache:
    """Preallocated keys/values for one sampling call, written in place as content is fed, and the
    `DecodeWeights` the steps multiply by (in the cache's dtype).

    Holds per self-decoder layer K/V and the one shared K/V, each (B, H, max_len, D) where
    max_len = class token + all image tokens; `length` is how many content positions are filled.
    """

    def __init__(self, config: ARPGConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str, weights: DecodeWeights):
        shape = (config.n_layer // 2, batch, config.n_head, max_len, config.head_dim)
        self.self_k = torch.zeros(shape, dtype=dtype, device=device)
        self.self_v = torch.zeros(shape, dtype=dtype, device=device)
        self.shared_k = torch.zeros(shape[1:], dtype=dtype, device=device)
        self.shared_v = torch.zeros(shape[1:], dtype=dtype, device=device)
        self.weights = weights
        self.max_len = max_len
        self.length = 0

    def tensors(self) -> list[Tensor]:
        """Every tensor the decode steps read or write in place (for `torch._dynamo.mark_static_address`)."""
        return [self.self_k, self.self_v, self.shared_k, self.shared_v, *_leaves(self.weights)]


def _leaves(tree) -> list[Tensor]:
    if isinstance(tree, Tensor):
        return [tree]
    return [leaf for item in tree for leaf in _leaves(item)]


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class ARPG(GridGenerator):
    """Guided random-order autoregressive image generator (class-conditional)."""

    family = "arpg"
    # The published sampler's defaults; any order and schedule can be decoded.
    decode_rules = DecodeRules(order="random", steps=64, schedule="arccos")
    _no_split_modules = ["SelfDecoder", "CrossDecoder"]  # FSDP wraps these (accelerate reads this name)

    def __init__(self, config: ARPGConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.embedding_rows, config.dim)
        self.embed_drop = nn.Dropout(config.token_dropout_p)
        self.layers = GuidedDecoder(config)
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Published init: N(0, initializer_range) for linears and embeddings, zero head, unit norms."""
        published_init_(self, self.config.initializer_range)
        nn.init.zeros_(self.head.weight)

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
                generator: Optional[torch.Generator] = None, check: bool = True) -> tuple[Tensor, Tensor]:
        """Teacher-forced pass over a random (or given) order.

        Args:
            tokens: (B, T) image tokens in raster order, values in [0, vocab_size).
            labels: (B,) class ids in [0, num_classes).
            order: (B, T) per-sample permutations of raster positions, `order[b, k]` being the
                position predicted k-th; a fresh random permutation per sample when None.
            generator: RNG for the random order and class dropout (training only).
            check: validate the values of tokens, labels and order (`check_inputs`: host syncs on
                a GPU); shapes and dtypes are always checked. The training loop, which checks its
                batches on the CPU and makes its own orders, turns it off.
        Returns:
            logits (B, T, vocab_size) float32 in raster order, and the mean cross-entropy.
        """
        B, T = self.check_inputs(tokens, labels, order, values=check)
        device = tokens.device
        if order is None:
            order = random_order(B, T, generator, device)
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

    def content_kv(self, content_ids: Tensor, content_rope: Tensor | Rotation, is_causal: bool = True,
                   attn_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """The self half over a whole content sequence (B, L) -> the shared K/V, (B, H, L, D) each."""
        rope = _as_rotation(content_rope)
        content = self.embed_drop(self.embeddings(content_ids))
        for block in self.layers.self_dec:
            content = block(content, rope, is_causal=is_causal, attn_mask=attn_mask)
        return self.layers.shared_kv(content, rope)

    def target_logits(self, shared_k: Tensor, shared_v: Tensor, target_rope: Tensor | Rotation, is_causal: bool,
                      attn_mask: Optional[Tensor] = None, weights: Optional[DecodeWeights] = None) -> Tensor:
        """The guided half: one content-free target query per position of `target_rope`
        (B|1, n, D/2, 2) (or its `Rotation`) reads the shared K/V -> float32 logits (B, n, vocab_size).
        `weights` default to the parameters'."""
        rope = _as_rotation(target_rope)
        batch = shared_k.shape[0]
        rope = Rotation(rope.turns.expand(batch, -1, -1))
        # Every query starts as the mask embedding: the first block projects it once.
        queries = self.embeddings.weight[self.config.mask_token_id].view(1, 1, -1)
        blocks = weights.cross_blocks if weights is not None else (None,) * len(self.layers.cross_dec)
        for block, block_weights in zip(self.layers.cross_dec, blocks):
            queries = block(queries, shared_k, shared_v, rope, is_causal, attn_mask, weights=block_weights)
        if weights is None:  # module calls: under FSDP2 a wrapped module unshards its weight on call
            return self.head(self.norm(queries)).float()
        return F.linear(rms_norm(queries, weights.norm, self.config.norm_eps), weights.head).float()

    @torch.compiler.disable
    def check_inputs(self, tokens: Tensor, labels: Tensor, order: Optional[Tensor] = None,
                     values: bool = True) -> tuple[int, int]:
        """`GridGenerator.check_inputs`, and an `order` (B, T) of integers; with `values`, every
        order row must be a permutation."""
        B, T = super().check_inputs(tokens, labels, values=values)
        if order is not None:
            require(order.shape == (B, T) and not order.dtype.is_floating_point,
                    f"order must be an integer tensor of shape ({B}, {T}), got {order.dtype} {tuple(order.shape)}")
            if values:
                expected = torch.arange(T, device=order.device).expand(B, T)
                require(torch.equal(order.sort(dim=1).values, expected),
                        f"order must hold a permutation of 0..{T - 1} in every row")
        return B, T

    # -- cached, step-wise inference (driven by ARPGDecoder) ------------------------------------

    @torch.no_grad()
    def decode_weights(self, dtype: Optional[torch.dtype] = None) -> DecodeWeights:
        """The weights of a cached decode, built from the parameters: q/k/v and k/v concatenated
        (one matmul each), matrices cast to `dtype` (default: the parameters'), so a
        step neither concatenates nor casts. The module tree and state dict are untouched."""
        def cast(block: BlockWeights) -> BlockWeights:
            return block._replace(qkv=block.qkv.to(dtype), proj=block.proj.to(dtype), w1=block.w1.to(dtype),
                                  w3=block.w3.to(dtype), w2=block.w2.to(dtype))

        dtype = dtype or self.head.weight.dtype
        norm_weight, kv_weight = self.layers.kv_weights()
        return DecodeWeights(tuple(cast(b.weights()) for b in self.layers.self_dec),
                             tuple(cast(b.weights()) for b in self.layers.cross_dec),
                             (norm_weight, kv_weight.to(dtype)), self.norm.weight, self.head.weight.to(dtype))

    def new_cache(self, batch: int, max_len: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> KVCache:
        """Preallocate a KV cache for `batch` sequences of up to `max_len` content positions
        (default: class token + block_size), with the decode weights in its dtype."""
        param = self.head.weight
        max_len = self.config.cls_token_num + self.config.block_size if max_len is None else max_len
        dtype = dtype or param.dtype
        return KVCache(self.config, batch, max_len, dtype, param.device, self.decode_weights(dtype))

    def extend(self, ids: Tensor, rope: Tensor | Rotation, cache: KVCache, causal: bool = False, *,
               positions: Optional[Tensor] = None, visible: Optional[Tensor] = None) -> None:
        """Feed content ids (B, n) with their RoPE (B|1, n, D/2, 2) (or its `Rotation`) through the
        self-decoder half, writing their per-layer K/V and shared K/V into `cache` in place.

        The new tokens see everything already cached; among themselves they attend block-wise
        (both directions, as the published sampler and the paper's few-step results) unless
        `causal` keeps the training-time causal mask.

        Static shapes (`positions` (n,) and `visible` (n|1, S) given, device tensors): the tokens
        are written at `positions` and attend to the whole cache where `visible`; `cache.length`
        is neither read nor advanced, so the step's shapes depend on n alone.
        """
        rope = _as_rotation(rope)
        if positions is None:
            start, n = cache.length, ids.shape[1]
            end = start + n
            require(end <= cache.max_len, f"cache holds {cache.max_len} positions; feeding {n} after {start} overflows it")
            where, visible = start, None
            if causal and n > 1:
                # new token i sees cache[:start] and new tokens 0..i
                visible = torch.ones(n, end, dtype=torch.bool, device=ids.device).tril(diagonal=start)
            cache.length = end
        else:
            where = positions
        weights = cache.weights
        x = self.embeddings(ids)
        for i, (block, block_weights) in enumerate(zip(self.layers.self_dec, weights.self_blocks)):
            x = block(x, rope, is_causal=False, attn_mask=visible, cache=(cache.self_k[i], cache.self_v[i], where),
                      weights=block_weights)
        k, v = self.layers.shared_kv(x, rope, weights.shared_kv)
        (write_cache if positions is None else write_cache_at)(k, v, cache.shared_k, cache.shared_v, where)

    def predict(self, target_rope: Tensor | Rotation, cache: KVCache, *, visible: Optional[Tensor] = None) -> Tensor:
        """Logits (B, n, vocab_size) float32 for n target positions given by their RoPE (B|1, n, D/2, 2)
        (or its `Rotation`), each query attending to all cached content (static shapes: to the
        whole cache where `visible` (1, S)). Queries never see one another, so a query's logits do
        not depend on how many run in parallel."""
        if visible is None:
            k, v = cache.shared_k[:, :, :cache.length], cache.shared_v[:, :, :cache.length]
        else:
            k, v = cache.shared_k, cache.shared_v
        return self.target_logits(k, v, target_rope, is_causal=False, attn_mask=visible, weights=cache.weights)

    def decoder(self, conditions: Tensor, order: Tensor, tokens_per_step: Sequence[int],
                grid: tuple[int, int], **runtime) -> ARPGDecoder:
        """The step engine of one decode of whole grids along `order` (rows, T) (see `ARPGDecoder`)."""
        return ARPGDecoder(self, conditions, self.position_rope(order, grid_width=grid[1]), tokens_per_step,
                           **runtime)

    @staticmethod
    def fields_from_state_dict(state: Mapping[str, Tensor]) -> Optional[dict]:
        """The config fields an ARPG state dict's shapes determine (dim, n_layer, vocab_size,
        num_classes), or None when it is not this family's layout."""
        if "embeddings.weight" not in state or "head.weight" not in state:
            return None
        rows, dim = state["embeddings.weight"].shape
        vocab_size = state["head.weight"].shape[0]
        n_layer = 2 * sum(1 for k in state if k.startswith("layers.self_dec.") and k.endswith(".attn_norm.weight"))
        return {"dim": dim, "n_layer": n_layer, "vocab_size": vocab_size, "num_classes": rows - vocab_size - 3}


def _as_rotation(rope: Tensor | Rotation) -> Rotation:
    return rope if isinstance(rope, Rotation) else rotation(rope)


# ---------------------------------------------------------------------------------------------
# The step engine of the sampler
# ---------------------------------------------------------------------------------------------

def _static_extend(model: ARPG, cache: KVCache, ids: Tensor, rope: Rotation, positions: Tensor,
                   visible: Tensor) -> None:
    model.extend(ids, rope, cache, positions=positions, visible=visible)


def _static_predict(model: ARPG, cache: KVCache, target_rope: Rotation, visible: Tensor) -> Tensor:
    return model.predict(target_rope, cache, visible=visible)


@functools.cache
def _compiled(fn: Callable, mode: Optional[str]) -> Callable:
    """`fn` compiled once per process; the sizes that vary between steps are marked dynamic by
    the decoder (`_mark_step_size`), everything else is traced static."""
    return torch.compile(fn, mode=mode)


def _mark_step_size(tensor: Tensor, dim: int) -> None:
    """Trace `dim` of `tensor` (a padded step size, >= 2) as a symbol: one graph for every bucket."""
    torch._dynamo.mark_dynamic(tensor, dim)


# The caches of compiled decodes, per model: {(dtype, device): KVCache}.
_COMPILED_CACHES: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def _reusable_cache(model: ARPG, batch: int, max_len: int, dtype: Optional[torch.dtype]) -> KVCache:
    """The cache of compiled decodes: one per model, dtype and device, reused by every compiled
    decode, because the compiled steps trace its shapes statically and CUDA graphs capture its
    addresses (marked static for torch.compile). A decode of fewer rows or positions runs in it
    (padded); a larger one replaces it, freeing the old one first. Its decode weights are
    refreshed in place when the parameters changed since (see `release_compiled_caches`)."""
    dtype = dtype or model.head.weight.dtype
    pool = _COMPILED_CACHES.setdefault(model, {})
    key = (dtype, model.head.weight.device)
    cache = pool.get(key)
    if cache is None or cache.self_k.shape[1] < batch or cache.max_len < max_len:
        if cache is not None:
            batch, max_len = max(batch, cache.self_k.shape[1]), max(max_len, cache.max_len)
            del pool[key], cache
        cache = pool[key] = model.new_cache(batch, max_len=max_len, dtype=dtype)
        for tensor in cache.tensors():
            torch._dynamo.mark_static_address(tensor)
    elif cache.version != _parameter_version(model):
        with torch.no_grad():
            for kept, fresh in zip(_leaves(cache.weights), _leaves(model.decode_weights(dtype))):
                if kept.data_ptr() != fresh.data_ptr():  # an uncast weight is the parameter itself
                    kept.copy_(fresh)
    cache.version, cache.length = _parameter_version(model), 0
    return cache


def release_compiled_caches(model: Optional[nn.Module] = None) -> None:
    """Free the KV caches kept for compiled decodes of `model` (default: of every model), e.g.
    before measuring another decode's peak memory. The next compiled decode allocates a new one
    (CUDA graphs then record again once)."""
    if model is None:
        _COMPILED_CACHES.clear()
    else:
        _COMPILED_CACHES.pop(model, None)


def _parameter_version(model: nn.Module) -> tuple:
    """Changes whenever a parameter is replaced or modified in place."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def _batch_rope(rope: Tensor, batch: int) -> Tensor:
    """RoPE (1 or b, n, D/2, 2) -> (batch, n, D/2, 2), repeating a per-sample table for the guidance rows."""
    return rope.expand(batch, -1, -1, -1) if rope.shape[0] == 1 else rope.repeat(batch // rope.shape[0], 1, 1, 1)


def query_bucket(n: int) -> int:
    """The padded size of a static step of n queries: the next power of two, at least 2 (a
    compile would trace a size of 1 as a constant: a graph of its own), so a decode of T tokens
    runs at most log2(T) shapes per function, all in one compiled graph."""
    return max(2, 1 << (n - 1).bit_length())


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    """x (r, ...) -> (rows, ...), repeating row 0 (a valid input whose results are dropped)."""
    return x if x.shape[0] == rows else torch.cat([x, x[:1].expand(rows - x.shape[0], *x.shape[1:])])


# The float32 logits of open targets a query_open step holds at once (see `ARPGDecoder`).
OPEN_LOGITS_BYTES = 256 * 2**20


class _StaticStep(NamedTuple):
    """The fixed-shape inputs of one static step, made before the loop (no host work inside it)."""

    fed: int  # tokens fed at this step (0 at the first)
    fed_rope: Optional[Rotation]  # (rows, bucket(fed), D)
    positions: Optional[Tensor]  # (bucket(fed),) cache positions written
    fed_visible: Optional[Tensor]  # (bucket(fed)|1, S) what the fed tokens see
    targets: int
    target_rope: Rotation  # (rows, bucket(targets), D)
    target_visible: Tensor  # (1, S)


class ARPGDecoder:
    """The forward passes of one ARPG decode: call it with the tokens chosen at the previous step
    (None at the first) and it returns the float32 logits (rows, n, V) of this step's targets.

    Step 0 feeds the condition token alone (it sees only itself, as in training), then the
    context tokens when editing; step s > 0 feeds the tokens chosen at step s - 1 at their own
    positions, then one content-free query per target of step s reads everything fed so far.
    The RoPE rotations of every position are computed once, and the cache carries the decode
    weights (fused projections, see `ARPG.decode_weights`).

    Args:
        conditions: (rows,) labels, `ClassCondition.NULL` for unconditional rows.
        target_rope: (rows|b|1, N, D/2, 2) RoPE of the N positions to decode, in decode order.
        tokens_per_step: how many targets each step predicts (sums to N).
        context_ids, context_rope: (rows, K) known tokens and their RoPE, fed after the condition.
        causal_within_step: tokens fed in one step attend causally (training-like) instead of
            block-wise (published).
        use_cache: False recomputes the whole prefix at every step with the attention pattern the
            cache builds up (same logits, slow; for tests and benchmarks).
        compile: torch.compile the fixed-shape steps (see `static`; the only shapes a compile
            reuses from step to step): one graph for extending and one for predicting, whatever
            the schedule. Their cache is kept for the next compiled decode (`_reusable_cache`):
            a later batch of as many rows or fewer runs in it (padded), with no new graph.
        cache_dtype: dtype of the KV cache and of the decode weights (default: the weights').
        static: fixed-shape steps: attention over the whole preallocated cache under a validity
            mask, fed tokens and queries padded to `query_bucket` sizes. Same tokens as the
            dynamic steps. With `compile` on CUDA, the steps replay as CUDA graphs (mode
            "reduce-overhead").
        query_open: every step queries all N - start targets not yet fed (its own first), and a
            position selector picks which of them the step commits (see `reorder_open`); the
            call then returns an iterator over the open targets' logits in chunks of at most
            `OPEN_LOGITS_BYTES` (batch 64 with guidance and 16384 codes: 32 targets, 256 MiB,
            instead of 2 GiB for all 256 at step 0, and as much for each copy). Not with
            `static` or `compile` (the number of open targets shrinks every step).

    With `query_open`, the decode order is not fixed up front: after step s the caller passes
    `reorder_open` the arrangement of the open targets that puts the committed ones first, and
    step s + 1 feeds those (the cache stays incremental; only the guided half runs for the
    queries that are not committed).
    """

    def __init__(self, model: ARPG, conditions: Tensor, target_rope: Tensor, tokens_per_step: Sequence[int],
                 context_ids: Optional[Tensor] = None, context_rope: Optional[Tensor] = None,
                 causal_within_step: bool = False, use_cache: bool = True, compile: bool = False,
                 cache_dtype: Optional[torch.dtype] = None, static: bool = False, query_open: bool = False):
        require(not ((static or compile) and query_open),
                "static=True and compile=True decode a fixed plan of positions; confidence-guided positions query "
                "every open position: set static=False and compile=False with them")
        rows, device = conditions.shape[0], conditions.device
        self.model, self.causal, self.query_open = model, causal_within_step, query_open
        self.open_chunk = max(1, OPEN_LOGITS_BYTES // (4 * rows * model.config.vocab_size))
        self.tokens_per_step = list(tokens_per_step)
        self.ends = [sum(tokens_per_step[:i + 1]) for i in range(len(tokens_per_step))]
        self.step = 0
        target_rope = _batch_rope(target_rope, rows)
        if query_open:  # rearranged in place by reorder_open: an own copy, not a broadcast view
            target_rope = target_rope.clone()
        prefill = [(model.class_ids(conditions)[:, None], model.class_rope(rows, device))]
        if context_ids is not None and context_ids.shape[1]:
            prefill.append((context_ids, _batch_rope(context_rope, rows)))
        fed_slots = self.ends[-2] if len(self.ends) > 1 else 0  # the last step's tokens are never fed
        prefilled = sum(ids.shape[1] for ids, _ in prefill)
        max_len = prefilled + fed_slots
        self.cache, self.static_steps = None, None
        if not use_cache:
            self.ids = torch.cat([ids for ids, _ in prefill] + [conditions.new_zeros(rows, fed_slots)], dim=1)
            self.rope = torch.cat([rope for _, rope in prefill] + [target_rope[:, :fed_slots]], dim=1)
            self.target_rope = target_rope
            groups = [ids.shape[1] for ids, _ in prefill] + list(tokens_per_step[:-1])
            self.visible = block_causal_mask(groups, causal_within_step, device)  # (L, L)
            self.length = prefilled
            return
        self.rows = rows
        self.graphs = static and compile and device.type == "cuda"
        if static or compile:
            # Room for every token of the canvas and the write of the padded rows (at the last
            # position, never visible): one size for every schedule.
            max_len = prefilled + self.ends[-1]
            if compile:
                self.cache = _reusable_cache(model, rows, max_len, cache_dtype)
            else:
                self.cache = model.new_cache(rows, max_len=max_len, dtype=cache_dtype)
            cache_rows = self.cache.self_k.shape[1]  # more than rows when a larger batch made the cache
            prefill = [(_pad_rows(ids, cache_rows), _pad_rows(rope, cache_rows)) for ids, rope in prefill]
            self.targets = rotation(_pad_rows(target_rope, cache_rows))  # (cache rows, N, D/2)
            self.static_steps = self._static_plan(prefilled, device)
            # One compile serves every bucket (sizes are symbolic); CUDA graphs record one graph per bucket.
            mode = "reduce-overhead" if self.graphs else None
            self.extend_fn = _compiled(_static_extend, mode) if compile else _static_extend
            self.predict_fn = _compiled(_static_predict, mode) if compile else _static_predict
        else:
            self.targets = rotation(target_rope)  # (rows, N, D/2), sliced per step
            self.cache = model.new_cache(rows, max_len=max_len, dtype=cache_dtype)
        for ids, rope in prefill:
            model.extend(ids, rope, self.cache, causal=self.causal)

    def _static_plan(self, prefilled: int, device: torch.device) -> list[_StaticStep]:
        """The padded inputs of every step, made once: rotations padded with zero rows, the cache
        positions each step writes (padded rows: the last position, never visible) and the masks
        of what its fed tokens and its queries see. Bucket sizes are marked dynamic for the compile."""
        pad = query_bucket(max(self.tokens_per_step))
        targets = Rotation(F.pad(self.targets.turns, (0, 0, 0, pad)))  # (rows, N + pad, D/2)
        keys = torch.arange(self.cache.max_len, device=device)  # (S,)
        steps, written = [], prefilled
        for step, m in enumerate(self.tokens_per_step):
            first = self.ends[step - 1] if step else 0  # decode slot of the first target
            fed_rope = positions = fed_visible = None
            fed = self.tokens_per_step[step - 1] if step else 0
            if fed:
                bucket = query_bucket(fed)
                fed_rope = targets.slice(first - fed, first - fed + bucket)
                slots = torch.arange(written, written + bucket, device=device)
                positions = slots.masked_fill(slots >= written + fed, self.cache.max_len - 1)
                # block-wise: everything up to the last fed token; causal: up to the token itself
                limit = slots[:, None] if self.causal else torch.tensor([[written + fed - 1]], device=device)
                fed_visible = keys[None, :] <= limit
                written += fed
                _mark_step_size(fed_rope.turns, 1)
                _mark_step_size(positions, 0)
                if self.causal:  # block-wise, fed_visible is (1, S)
                    _mark_step_size(fed_visible, 0)
            target_rope = targets.slice(first, first + query_bucket(m))
            _mark_step_size(target_rope.turns, 1)
            steps.append(_StaticStep(fed, fed_rope, positions, fed_visible, m, target_rope, keys[None, :] < written))
        return steps

    def reorder_open(self, order: Tensor) -> None:
        """Rearrange the open targets of the step just run (slots start..N): slot start + i takes
        the target at start + order[:, i]. order (B, N - start) is given for the B samples and
        applies to their guidance rows too. Call it between steps, with `query_open`."""
        start = self.ends[self.step - 2] if self.step > 1 else 0
        table = self.targets.turns if self.cache is not None else self.target_rope  # (rows, N, D/2[, 2])
        index = order.repeat(table.shape[0] // order.shape[0], 1)  # (rows, N - start)
        open_targets = table[:, start:]
        index = index.view(*index.shape, *(1,) * (table.ndim - 2)).expand_as(open_targets)
        table[:, start:] = open_targets.gather(1, index)

    def __call__(self, fed: Optional[Tensor]) -> Tensor:
        step = self.step
        self.step += 1
        start = self.ends[step - 1] if step else 0
        if self.static_steps is not None:
            plan = self.static_steps[step]
            if self.graphs:  # a new iteration: the previous step's graph outputs are consumed
                torch.compiler.cudagraph_mark_step_begin()
            if fed is not None:
                ids = F.pad(_pad_rows(fed, self.targets.turns.shape[0]), (0, plan.positions.shape[0] - plan.fed))
                _mark_step_size(ids, 1)
                self.extend_fn(self.model, self.cache, ids, plan.fed_rope, plan.positions, plan.fed_visible)
            logits = self.predict_fn(self.model, self.cache, plan.target_rope, plan.target_visible)
            return logits[:self.rows, :plan.targets].contiguous()  # (rows, n, V); the sampler works in place
        predict = self._feed(fed, self.ends[step - 2] if step > 1 else 0, start)
        if not self.query_open:
            return predict(start, self.ends[step])
        total = self.ends[-1]
        return (predict(a, min(a + self.open_chunk, total)) for a in range(start, total, self.open_chunk))

    def _feed(self, fed: Optional[Tensor], before: int, start: int) -> Callable[[int, int], Tensor]:
        """Feed the tokens of targets [before, start) (dynamic shapes); returns predict(a, b): the
        logits (rows, b - a, V) of targets [a, b) given everything fed."""
        if self.cache is not None:
            if fed is not None:
                self.model.extend(fed, self.targets.slice(before, start), self.cache, causal=self.causal)

            def predict(a: int, b: int) -> Tensor:
                return self.model.predict(self.targets.slice(a, b), self.cache)
            return predict
        if fed is not None:
            self.ids[:, self.length:self.length + fed.shape[1]] = fed
            self.rope[:, self.length:self.length + fed.shape[1]] = self.target_rope[:, before:start]  # maybe reordered
            self.length += fed.shape[1]
        L = self.length
        k, v = self.model.content_kv(self.ids[:, :L], self.rope[:, :L], is_causal=False, attn_mask=self.visible[:L, :L])

        def recompute(a: int, b: int) -> Tensor:
            return self.model.target_logits(k, v, self.target_rope[:, a:b], is_causal=False)
        return recompute
