"""The ARPG transformer: a guided decoder for random-order autoregressive image generation.

One file, read top to bottom:

* `ARPGConfig`: the hyper-parameters, named as in the published ModelArgs so configs map 1:1.
* `SelfDecoderBlock` blocks (first half): causal self-attention over the content sequence
  `[class, t_order[0], t_order[1], ...]`, each token rotated by the 2-D RoPE of its own position.
  With captions (`model_type` "t2i") the caption rows take the class token's place, with zero
  RoPE as in LlamaGen's t2i, and no other row attends to a padded caption row.
* One shared K/V projected from the normalised self-decoder output (`shared_kv`).
* `CrossDecoderBlock` blocks (second half): content-free `target_queries` (the mask embedding, rotated
  by the position it must predict) attend causally to the shared K/V, so query k sees the class
  token and the first k content tokens of the order and predicts the token at `order[k]`.
* `ARPG`: the model, its teacher-forced `forward`, and the cached step-wise entry points
  (`new_cache`, `extend`, `predict`) that the step engines (`arpg.models.arpg_steps`) drive.

The module tree and parameter names equal the published implementation's, so its checkpoints load
with `strict=True` (see `arpg.checkpoint`). The shared math (RMSNorm, SwiGLU, RoPE, attention) is
in `arpg.models.layers`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from arpg.errors import SettingError, require
from arpg.models.arpg_steps import ARPGStepEngine
from arpg.models.base import GridGenerator, TransformerConfig
from arpg.orders import DecodeRules, random_order
from arpg.models.layers import (FeedForward, RMSNorm, Rotation, attention, merge_heads,
                                published_init_, raster_rope, rms_norm, rotate, rotation, split_heads, swiglu,
                                write_cache, write_cache_at)

CLS_ROPE_CHOICES = ("zeros", "identity")


@dataclass
class ARPGConfig(TransformerConfig):
    """Hyper-parameters of an ARPG model (field names follow the published `ModelArgs`; the
    shared ones are in `TransformerConfig`).

    `cls_rope` is the one addition: the rotation given to the class token. "zeros" (published,
    required by the released checkpoints) zeroes the class token's q and k, so every query scores
    it at exactly 0; "identity" (cos 1, sin 0) leaves them free, for faster class conditioning
    on small data (docs/differences.md).
    """

    cls_rope: str = "zeros"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.n_layer % 2 == 0,
                f"n_layer must be even (half self-decoder, half cross-decoder), got {self.n_layer}")
        require(self.cls_rope in CLS_ROPE_CHOICES, f"cls_rope must be one of {CLS_ROPE_CHOICES}, got {self.cls_rope!r}")

    # Embedding-table layout (published): [0, V) image tokens, V mask token (query input),
    # V + 1 + c class c, V + C + 1 null class (unconditional), V + C + 2 unused. With captions
    # (t2i) only the image tokens and the mask token; the caption rows are `cls_embedding`'s.
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
        return self.vocab_size + (self.num_classes + 3 if self.model_type == "c2i" else 1)


# ---------------------------------------------------------------------------------------------
# Blocks (the shared math is in arpg.models.layers; the names here are the published ones)
# ---------------------------------------------------------------------------------------------

class BlockWeights(NamedTuple):
    """One block's weights in the form its math uses. A training forward builds them from the
    parameters on every call (the concatenations are differentiable); a decode builds them once
    (`ARPG.fused_weights`), in the dtype it computes in."""

    attn_norm: Tensor  # (dim,)
    qkv: Tensor  # self blocks: [to_q; to_k; to_v] (3 dim, dim); cross blocks: to_q (dim, dim)
    proj: Tensor  # (dim, dim)
    ffn_norm: Tensor  # (dim,)
    w1: Tensor  # SwiGLU (hidden, dim)
    w3: Tensor  # (hidden, dim)
    w2: Tensor  # (dim, hidden)


class SelfAttention(nn.Module):
    """The attention parameters of a self-decoder block (published names; the math is `SelfDecoderBlock`'s)."""

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


class SelfDecoderBlock(_Block):
    """One block of the self-decoder half (published class name `SelfDecoder`; keys `layers.self_dec.i.*`)."""

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


class CrossDecoderBlock(_Block):
    """One block of the cross-decoder half (published class name `CrossDecoder`; keys `layers.cross_dec.i.*`)."""

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
        self.self_dec = nn.ModuleList(SelfDecoderBlock(config) for _ in range(config.n_layer // 2))
        self.cross_dec = nn.ModuleList(CrossDecoderBlock(config) for _ in range(config.n_layer // 2))
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


class FusedWeights(NamedTuple):
    """Every weight a cached decode step multiplies by, prepared once per decode
    (`ARPG.fused_weights`): fused projections, matrices in the dtype the decode computes in."""

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
    `FusedWeights` the steps multiply by (in the cache's dtype).

    Holds per self-decoder layer K/V and the one shared K/V, each (B, H, max_len, D) where
    max_len = condition rows + all image tokens; `length` is how many content positions are
    filled. `key_mask` (B, max_len) bool, when set, hides the positions other rows may not attend
    to (padded caption rows).
    """

    def __init__(self, config: ARPGConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str, weights: FusedWeights):
        shape = (config.n_layer // 2, batch, config.n_head, max_len, config.head_dim)
        self.self_k = torch.zeros(shape, dtype=dtype, device=device)
        self.self_v = torch.zeros(shape, dtype=dtype, device=device)
        self.shared_k = torch.zeros(shape[1:], dtype=dtype, device=device)
        self.shared_v = torch.zeros(shape[1:], dtype=dtype, device=device)
        self.weights = weights
        self.max_len = max_len
        self.length = 0
        self.key_mask: Optional[Tensor] = None

    def tensors(self) -> list[Tensor]:
        """Every tensor the decode steps read or write in place (for `torch._dynamo.mark_static_address`)."""
        return [self.self_k, self.self_v, self.shared_k, self.shared_v, *_leaves(self.weights)]

    @torch.no_grad()
    def refresh_weights(self, weights: FusedWeights) -> None:
        """Copy fresh decode weights into this cache's in place (their addresses stay, as CUDA
        graphs captured them); a weight that is the parameter itself (not cast) is left alone."""
        for kept, fresh in zip(_leaves(self.weights), _leaves(weights)):
            if kept.data_ptr() != fresh.data_ptr():
                kept.copy_(fresh)


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
    _no_split_modules = ["SelfDecoderBlock", "CrossDecoderBlock"]  # FSDP wraps these (accelerate reads this name)

    def __init__(self, config: ARPGConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.embedding_rows, config.dim)
        if config.model_type != "c2i":  # the class token is a row of `embeddings` (published)
            self.cls_embedding = self.condition.embedding(config.dim)
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
        """RoPE (batch, P, D/2, 2) of the P condition rows (the class token, or the caption rows):
        all zeros (published) or identity."""
        rope = torch.zeros(batch, self.condition.rows, self.config.head_dim // 2, 2, device=device)
        if self.config.cls_rope == "identity":
            rope[..., 0] = 1.0
        return rope

    def class_ids(self, labels: Tensor) -> Tensor:
        """Embedding ids (B,) of class labels; the null label (`ClassCondition.NULL`) is the unconditional class."""
        return self.condition.table_rows(labels, self.config.class_token_offset, self.config.null_class_id)

    def condition_inputs(self, conditions: Any) -> Tensor:
        """The content inputs of a batch of conditions: class-token ids (B, 1) (rows of the shared
        table, published), or the embedded caption rows (B, P, dim)."""
        if self.config.model_type == "c2i":
            return self.class_ids(conditions)[:, None]
        return self.cls_embedding(conditions)

    def embed(self, inputs: Tensor) -> Tensor:
        """Content inputs (B, n) ids, or (B, n, dim) already embedded (caption rows) -> (B, n, dim)."""
        return inputs if inputs.is_floating_point() else self.embeddings(inputs)

    def condition_masks(self, conditions: Any, targets: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The training masks when the condition hides some of its P rows (padded captions):
        content (B, 1, L, L) causal over the L = P + targets - 1 inputs, and targets (B, 1,
        targets, L), target k seeing inputs 0 .. P - 1 + k; no row sees a hidden condition row but
        the row itself. (None, None) otherwise: plain causal attention."""
        keys = self.condition.key_mask(conditions)  # (B, P) or None
        if keys is None:
            return None, None
        P = keys.shape[1]
        L = P + targets - 1
        visible = F.pad(keys, (0, targets - 1), value=True)[:, None, :]  # (B, 1, L)
        causal = torch.ones(L, L, dtype=torch.bool, device=keys.device).tril()
        content = causal & (visible | torch.eye(L, dtype=torch.bool, device=keys.device))
        return content[:, None], (causal[P - 1:] & visible)[:, None]

    # -- training forward -----------------------------------------------------------------------

    def forward(self, tokens: Tensor, labels: Any, order: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None, check: bool = True, drop_labels: bool = True,
                return_logits: bool = True) -> tuple[Optional[Tensor], Tensor]:
        """Teacher-forced pass over a random (or given) order.

        Args:
            tokens: (B, T) image tokens in raster order, values in [0, vocab_size).
            labels: (B,) class ids in [0, num_classes), or for a text model (model_type "t2i") a
                batch of B captions (`arpg.condition.Captions`).
            order: (B, T) per-sample permutations of raster positions, `order[b, k]` being the
                position predicted k-th; a fresh random permutation per sample when None.
            generator: RNG for the random order and class dropout (training only).
            check: validate the values of tokens, labels and order (`check_inputs`: host syncs on
                a GPU); shapes and dtypes are always checked. The training loop, which checks its
                batches on the CPU and makes its own orders, turns it off.
            drop_labels: in training mode, replace labels by the null class with the config's
                `class_dropout_prob`. The training loop draws the order and the dropout itself,
                outside the compiled forward (torch.compile cannot trace draws from a generator),
                and turns it off.
            return_logits: also return the raster-order logits; the training loop needs only the
                loss and turns it off (they are a float32 (B, T, vocab_size) copy: 2 GiB at batch
                128 with 16384 codes).
        Returns:
            logits (B, T, vocab_size) float32 in raster order (None without `return_logits`), and
            the mean cross-entropy.
        """
        B, T = self.check_inputs(tokens, labels, order, values=check)
        device = tokens.device
        if order is None:
            order = random_order(B, T, generator, device)
        if self.training and drop_labels:
            labels = self.condition.drop(labels, self.config.class_dropout_prob, generator)

        tokens_in_order = tokens.gather(1, order)  # (B, T)
        prefix = self.condition_inputs(labels)  # (B, P) class-token ids or (B, P, dim) caption rows
        fed = tokens_in_order[:, :-1]
        content = torch.cat([prefix, self.embeddings(fed) if prefix.is_floating_point() else fed], dim=1)
        order_rope = self.position_rope(order)  # (B, T, D/2, 2)
        content_rope = torch.cat([self.class_rope(B, device), order_rope[:, :-1]], dim=1)  # (B, P + T - 1, D/2, 2)

        content_mask, target_mask = self.condition_masks(labels, T)
        shared_k, shared_v = self.content_kv(content, content_rope, is_causal=content_mask is None,
                                             attn_mask=content_mask)
        logits_in_order = self.target_logits(shared_k, shared_v, order_rope, is_causal=target_mask is None,
                                             attn_mask=target_mask)

        loss = F.cross_entropy(logits_in_order.flatten(0, 1), tokens_in_order.flatten())
        if not return_logits:
            return None, loss
        logits = torch.empty_like(logits_in_order).scatter_(
            1, order[..., None].expand_as(logits_in_order), logits_in_order)
        return logits, loss

    def content_kv(self, content: Tensor, content_rope: Tensor | Rotation, is_causal: bool = True,
                   attn_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """The self half over a whole content sequence (B, L) of ids or (B, L, dim) of embedded
        inputs -> the shared K/V, (B, H, L, D) each."""
        rope = _as_rotation(content_rope)
        content = self.embed_drop(self.embed(content))
        for block in self.layers.self_dec:
            content = block(content, rope, is_causal=is_causal, attn_mask=attn_mask)
        return self.layers.shared_kv(content, rope)

    def target_logits(self, shared_k: Tensor, shared_v: Tensor, target_rope: Tensor | Rotation, is_causal: bool,
                      attn_mask: Optional[Tensor] = None, weights: Optional[FusedWeights] = None) -> Tensor:
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

    def check_inputs(self, tokens: Tensor, labels: Tensor, order: Optional[Tensor] = None,
                     values: bool = True) -> tuple[int, int]:
        """`GridGenerator.check_inputs`, and an `order` (B, T) of integers; with `values`, every
        order row must be a permutation."""
        B, T = super().check_inputs(tokens, labels, values=values)
        if order is not None:
            if order.shape != (B, T) or order.dtype.is_floating_point:  # formatted on failure only (see base)
                raise SettingError(f"order must be an integer tensor of shape ({B}, {T}), got {order.dtype} "
                                   f"{tuple(order.shape)}")
            if values:
                _check_permutations(order)
        return B, T

    # -- cached, step-wise inference (driven by ARPGStepEngine) ------------------------------------

    @torch.no_grad()
    def fused_weights(self, dtype: Optional[torch.dtype] = None) -> FusedWeights:
        """The weights of a cached decode, built from the parameters: q/k/v and k/v concatenated
        (one matmul each), matrices cast to `dtype` (default: the parameters'), so a
        step neither concatenates nor casts. The module tree and state dict are untouched."""
        def cast(block: BlockWeights) -> BlockWeights:
            return block._replace(qkv=block.qkv.to(dtype), proj=block.proj.to(dtype), w1=block.w1.to(dtype),
                                  w3=block.w3.to(dtype), w2=block.w2.to(dtype))

        dtype = dtype or self.head.weight.dtype
        norm_weight, kv_weight = self.layers.kv_weights()
        return FusedWeights(tuple(cast(b.weights()) for b in self.layers.self_dec),
                            tuple(cast(b.weights()) for b in self.layers.cross_dec),
                            (norm_weight, kv_weight.to(dtype)), self.norm.weight, self.head.weight.to(dtype))

    def new_cache(self, batch: int, max_len: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> KVCache:
        """Preallocate a KV cache for `batch` sequences of up to `max_len` content positions
        (default: class token + block_size), with the decode weights in its dtype."""
        param = self.head.weight
        max_len = self.config.cls_token_num + self.config.block_size if max_len is None else max_len
        dtype = dtype or param.dtype
        return KVCache(self.config, batch, max_len, dtype, param.device, self.fused_weights(dtype))

    def extend(self, ids: Tensor, rope: Tensor | Rotation, cache: KVCache, causal: bool = False, *,
               positions: Optional[Tensor] = None, visible: Optional[Tensor] = None) -> None:
        """Feed content ids (B, n) (or embedded inputs (B, n, dim), caption rows) with their RoPE
        (B|1, n, D/2, 2) (or its `Rotation`) through the self-decoder half, writing their
        per-layer K/V and shared K/V into `cache` in place.

        The new tokens see everything already cached (but positions `cache.key_mask` hides, except
        their own); among themselves they attend block-wise (both directions, as the published
        sampler and the paper's few-step results) unless `causal` keeps the training-time causal
        mask.

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
            if cache.key_mask is not None:  # (B, 1, n, end): hidden positions, but each token sees itself
                own = torch.arange(end, device=ids.device) == torch.arange(start, end, device=ids.device)[:, None]
                keys = cache.key_mask[:, None, None, :end] | own
                visible = keys if visible is None else keys & visible
            cache.length = end
        else:
            where = positions
        weights = cache.weights
        x = self.embed(ids)
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
            if cache.key_mask is not None:
                visible = cache.key_mask[:, None, None, :cache.length]
        else:
            k, v = cache.shared_k, cache.shared_v
        return self.target_logits(k, v, target_rope, is_causal=False, attn_mask=visible, weights=cache.weights)

    def step_engine(self, conditions: Any, order: Tensor, tokens_per_step: Sequence[int],
                grid: tuple[int, int], **runtime) -> ARPGStepEngine:
        """The step engine of one decode of whole grids along `order` (rows, T) (see `ARPGStepEngine`)."""
        return ARPGStepEngine(self, conditions, self.position_rope(order, grid_width=grid[1]), tokens_per_step,
                           **runtime)

    @staticmethod
    def fields_from_state_dict(state: Mapping[str, Tensor]) -> Optional[dict]:
        """The config fields an ARPG state dict's shapes determine (dim, n_layer, vocab_size, and
        num_classes, or for captions model_type, caption_dim and cls_token_num), or None when it
        is not this family's layout."""
        if "embeddings.weight" not in state or "head.weight" not in state:
            return None
        rows, dim = state["embeddings.weight"].shape
        vocab_size = state["head.weight"].shape[0]
        n_layer = 2 * sum(1 for k in state if k.startswith("layers.self_dec.") and k.endswith(".attn_norm.weight"))
        captions = state.get("cls_embedding.uncond_embedding")
        if captions is None:
            condition = {"num_classes": rows - vocab_size - 3}
        else:
            condition = {"model_type": "t2i", "cls_token_num": captions.shape[0], "caption_dim": captions.shape[1]}
        return {"dim": dim, "n_layer": n_layer, "vocab_size": vocab_size, **condition}


@torch.compiler.disable
def _check_permutations(order: Tensor) -> None:
    """Every row of `order` (B, T) holds a permutation of 0..T-1 (a host sync on a GPU, so a
    compiled forward leaves it out of its graph)."""
    B, T = order.shape
    expected = torch.arange(T, device=order.device).expand(B, T)
    require(torch.equal(order.sort(dim=1).values, expected),
            f"order must hold a permutation of 0..{T - 1} in every row")


def _as_rotation(rope: Tensor | Rotation) -> Rotation:
    return rope if isinstance(rope, Rotation) else rotation(rope)
