"""The ARPG transformer: a guided decoder for random-order autoregressive image generation.

One file, read top to bottom:

* `ARPGConfig`: the hyper-parameters, named as in the published ModelArgs so configs map 1:1.
* 2-D RoPE helpers: every content token is rotated by its own grid position, every query by the
  grid position it must predict (its *target*).
* `SelfDecoder` blocks (first half): causal self-attention over the content sequence
  `[class, t_order[0], t_order[1], ...]`.
* One shared K/V projected from the normalised self-decoder output (`shared_kv`).
* `CrossDecoder` blocks (second half): content-free `target_queries` (the mask embedding, rotated
  by the target position) attend causally to the shared K/V, so query k sees the class token and
  the first k content tokens of the order and predicts the token at `order[k]`.

The module tree and parameter names equal the published implementation's, so its checkpoints load
with `strict=True` (see `arpg.checkpoint`). The cached, step-wise entry points used by the sampler
(`KVCache`, `ARPG.extend`, `ARPG.predict`) live here too, next to the layers they drive.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

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
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        for name in ("dim", "n_layer", "n_head", "vocab_size", "block_size", "num_classes", "multiple_of"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.n_layer % 2 == 0, f"n_layer must be even (half self-decoder, half cross-decoder), got {self.n_layer}")
        need(self.dim % self.n_head == 0, f"dim must be divisible by n_head, got dim={self.dim}, n_head={self.n_head}")
        need(self.head_dim % 4 == 0, f"dim // n_head must be a multiple of 4 for 2-D RoPE, got {self.head_dim}")
        need(math.isqrt(self.block_size) ** 2 == self.block_size,
             f"block_size must be a perfect square (a square token grid), got {self.block_size}")
        need(self.cls_token_num == 1, f"cls_token_num must be 1 (as in the published model), got {self.cls_token_num}")
        need(self.cls_rope in CLS_ROPE_CHOICES, f"cls_rope must be one of {CLS_ROPE_CHOICES}, got {self.cls_rope!r}")
        for name in ("token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p", "class_dropout_prob"):
            need(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: 2/3 * 4 * dim (times the multiplier), rounded up to `multiple_of`."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

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
# 2-D rotary position embedding
# ---------------------------------------------------------------------------------------------

def rope_2d(rows: Tensor, cols: Tensor, head_dim: int, base: float = 10000.0) -> Tensor:
    """Rotation table for grid positions: (...,) rows and cols -> (..., head_dim // 2, 2) (cos, sin).

    The first head_dim/4 rotation slots turn with the row index, the last head_dim/4 with the
    column index, at frequencies base^(-2m / (head_dim/2)) for m < head_dim/4. Positions are
    plain integers, so a grid larger than the training grid (outpainting, resolution expansion)
    simply gets larger angles.
    """
    half = head_dim // 2
    freqs = base ** (-torch.arange(0, half, 2, device=rows.device, dtype=torch.float32) / half)  # (head_dim/4,)
    angles = torch.cat([rows.float()[..., None] * freqs, cols.float()[..., None] * freqs], dim=-1)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x (B, T, H, D) by rope (B or 1, T, D/2, 2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).type_as(x)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 for stability under bf16, as the published model does.
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU MLP without biases."""

    def __init__(self, config: ARPGConfig):
        super().__init__()
        hidden = config.ffn_hidden_dim
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def _split_heads(x: Tensor, n_head: int) -> Tensor:
    return x.unflatten(-1, (n_head, -1))  # (B, T, dim) -> (B, T, H, D)


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
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.attn_dropout_p if self.training else 0.0,
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))


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
        q = apply_rope(_split_heads(self.to_q(x), self.n_head), rope).transpose(1, 2)  # (B, H, T, D)
        k = apply_rope(_split_heads(self.to_k(x), self.n_head), rope).transpose(1, 2)
        v = _split_heads(self.to_v(x), self.n_head).transpose(1, 2)
        if cache is not None:
            k_cache, v_cache, start = cache
            end = start + x.shape[1]
            k_cache[:, :, start:end] = k
            v_cache[:, :, start:end] = v
            k, v = k_cache[:, :, :end], v_cache[:, :, :end]
        return self._attend(q, k, v, is_causal, attn_mask)


class CrossAttention(_AttentionOutput):
    """Target queries attend to the shared K/V; only the query projection is owned per block."""

    def __init__(self, config: ARPGConfig):
        super().__init__(config)
        self.to_q = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: Tensor, shared_k: Tensor, shared_v: Tensor, target_rope: Tensor,
                is_causal: bool = True) -> Tensor:
        q = apply_rope(_split_heads(self.to_q(x), self.n_head), target_rope).transpose(1, 2)
        return self._attend(q, shared_k, shared_v, is_causal, None)


class SelfDecoder(nn.Module):
    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.attn = SelfAttention(config)
        self.ffn = FeedForward(config)
        self.attn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, **attn_kwargs) -> Tensor:
        h = x + self.attn(self.attn_norm(x), rope, **attn_kwargs)
        return h + self.ffn(self.ffn_norm(h))


class CrossDecoder(nn.Module):
    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.attn = CrossAttention(config)
        self.ffn = FeedForward(config)
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
        k = apply_rope(_split_heads(self.to_k(x), self.n_head), rope).transpose(1, 2)
        v = _split_heads(self.to_v(x), self.n_head).transpose(1, 2)
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

    def reset(self) -> None:
        """Forget the content; the buffers are reused as they are."""
        self.length = 0


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class ARPG(nn.Module):
    """Guided random-order autoregressive image generator (class-conditional)."""

    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.config = config
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

    # -- positions ------------------------------------------------------------------------------

    def position_rope(self, positions: Tensor, grid_width: Optional[int] = None) -> Tensor:
        """RoPE (..., D/2, 2) of raster positions r = row * grid_width + col (default: the training grid)."""
        w = self.config.grid_size if grid_width is None else grid_width
        return rope_2d(positions // w, positions % w, self.config.head_dim, self.config.rope_base)

    def class_rope(self, batch: int = 1, device: torch.device | str | None = None) -> Tensor:
        """RoPE (batch, 1, D/2, 2) of the class token: all zeros (published) or identity."""
        rope = torch.zeros(batch, 1, self.config.head_dim // 2, 2, device=device)
        if self.config.cls_rope == "identity":
            rope[..., 0] = 1.0
        return rope

    def class_ids(self, labels: Tensor) -> Tensor:
        """Embedding ids (B,) of class labels; label -1 means the null (unconditional) class."""
        return torch.where(labels < 0, self.config.null_class_id, labels + self.config.class_token_offset)

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
        class_ids = self.class_ids(labels)
        if self.training and self.config.class_dropout_prob > 0:
            drop = torch.rand(B, device=device, generator=generator) < self.config.class_dropout_prob
            class_ids = torch.where(drop, self.config.null_class_id, class_ids)

        tokens_in_order = tokens.gather(1, order)  # (B, T)
        content_ids = torch.cat([class_ids[:, None], tokens_in_order[:, :-1]], dim=1)  # (B, T)
        order_rope = self.position_rope(order)  # (B, T, D/2, 2)
        content_rope = torch.cat([self.class_rope(B, device), order_rope[:, :-1]], dim=1)

        content = self.embed_drop(self.embeddings(content_ids))
        for block in self.layers.self_dec:
            content = block(content, content_rope, is_causal=True)
        shared_k, shared_v = self.layers.shared_kv(content, content_rope)
        logits_in_order = self._guided_logits(B, T, shared_k, shared_v, order_rope, is_causal=True)

        loss = F.cross_entropy(logits_in_order.flatten(0, 1), tokens_in_order.flatten())
        logits = torch.empty_like(logits_in_order).scatter_(
            1, order[..., None].expand_as(logits_in_order), logits_in_order)
        return logits, loss

    def _guided_logits(self, batch: int, num_queries: int, shared_k: Tensor, shared_v: Tensor,
                       target_rope: Tensor, is_causal: bool) -> Tensor:
        """Run `num_queries` content-free target queries through the cross half -> float32 logits."""
        mask_embedding = self.embeddings.weight[self.config.mask_token_id]
        target_queries = mask_embedding.expand(batch, num_queries, -1)
        for block in self.layers.cross_dec:
            target_queries = block(target_queries, shared_k, shared_v, target_rope, is_causal)
        return self.head(self.norm(target_queries)).float()

    @torch.compiler.disable
    def _check_inputs(self, tokens: Tensor, labels: Tensor, order: Optional[Tensor]) -> tuple[int, int]:
        cfg = self.config
        if tokens.ndim != 2 or tokens.shape[1] != cfg.block_size:
            raise ValueError(f"tokens must have shape (B, {cfg.block_size}), got {tuple(tokens.shape)}")
        B, T = tokens.shape
        if tokens.dtype.is_floating_point or tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
            raise ValueError(f"tokens must be integers in [0, {cfg.vocab_size}) (vocab_size)")
        check_labels(labels, cfg.num_classes, B)
        if order is not None:
            if order.shape != (B, T) or order.dtype.is_floating_point:
                raise ValueError(f"order must be an integer tensor of shape ({B}, {T}), got "
                                 f"{order.dtype} {tuple(order.shape)}")
            expected = torch.arange(T, device=order.device).expand(B, T)
            if not torch.equal(order.sort(dim=1).values, expected):
                raise ValueError(f"order must hold a permutation of 0..{T - 1} in every row")
        return B, T

    # -- cached, step-wise inference (used by arpg.sample) --------------------------------------

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
        if end > cache.max_len:
            raise ValueError(f"cache holds {cache.max_len} positions; feeding {n} after {start} overflows it")
        attn_mask = None
        if causal and n > 1:
            # new token i sees cache[:start] and new tokens 0..i
            attn_mask = torch.ones(n, end, dtype=torch.bool, device=ids.device).tril(diagonal=start)
        x = self.embeddings(ids)
        for i, block in enumerate(self.layers.self_dec):
            x = block(x, rope, is_causal=False, attn_mask=attn_mask,
                      cache=(cache.self_k[i], cache.self_v[i], start))
        k, v = self.layers.shared_kv(x, rope)
        cache.shared_k[:, :, start:end] = k
        cache.shared_v[:, :, start:end] = v
        cache.length = end

    def predict(self, target_rope: Tensor, cache: KVCache) -> Tensor:
        """Logits (B, n, vocab_size) float32 for n target positions given by their RoPE (B|1, n, D/2, 2),
        each query attending to all cached content. Queries never see one another, so a query's
        logits do not depend on how many run in parallel."""
        end = cache.length
        k, v = cache.shared_k[:, :, :end], cache.shared_v[:, :, :end]
        batch = k.shape[0]
        return self._guided_logits(batch, target_rope.shape[1], k, v,
                                   target_rope.expand(batch, -1, -1, -1), is_causal=False)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def check_labels(labels: Tensor, num_classes: int, batch: Optional[int] = None) -> None:
    """Raise ValueError unless labels is an integer (B,) tensor with values in [0, num_classes)."""
    if labels.ndim != 1 or (batch is not None and labels.shape[0] != batch) or labels.dtype.is_floating_point:
        want = f"({batch},)" if batch is not None else "(B,)"
        raise ValueError(f"labels must be an integer tensor of shape {want}, got {labels.dtype} {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be class ids in [0, {num_classes}) (num_classes), "
                         f"got values in [{int(labels.min())}, {int(labels.max())}]")


# ---------------------------------------------------------------------------------------------
# Size registry
# ---------------------------------------------------------------------------------------------

MODEL_SIZES: dict[str, dict] = {
    "ARPG-tiny": dict(n_layer=4, n_head=4, dim=128),
    "ARPG-S": dict(n_layer=12, n_head=6, dim=384),
    "ARPG-B": dict(n_layer=12, n_head=12, dim=768),
    "ARPG-L": dict(n_layer=24, n_head=16, dim=1024),
    "ARPG-XL": dict(n_layer=36, n_head=20, dim=1280),
    "ARPG-XXL": dict(n_layer=48, n_head=24, dim=1536),
}


def model_config(name: str, **overrides) -> ARPGConfig:
    """The `ARPGConfig` of a registered size with `overrides` applied."""
    if name not in MODEL_SIZES:
        raise ValueError(f"model name must be one of {sorted(MODEL_SIZES)}, got {name!r}")
    unknown = set(overrides) - set(ARPGConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown ARPGConfig fields {sorted(unknown)}; allowed: {sorted(ARPGConfig.__dataclass_fields__)}")
    return replace(ARPGConfig(**MODEL_SIZES[name]), **overrides)


def create_model(name: str, **overrides) -> ARPG:
    """Build a registered model size, e.g. `create_model("ARPG-L")` or
    `create_model("ARPG-tiny", vocab_size=17, block_size=64, num_classes=10)`."""
    return ARPG(model_config(name, **overrides))
