"""What the model families share besides their layers: the common hyper-parameters with their
checks (`TransformerConfig`), and the common surface of a class-conditional token-grid generator
(`GridGenerator`: its condition, grid, parameter count and input check). The condition type is
`model_type`'s (`arpg.condition.condition_for`); the models only pass conditions through it.

Each family's config extends `TransformerConfig` with its own fields (ARPG: `cls_rope`; LlamaGen:
`regions`, ...) and its model extends `GridGenerator`; the field names are the published ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from arpg.condition import condition_for
from arpg.errors import SettingError, require
from arpg.models.layers import swiglu_hidden_dim

DROPOUT_FIELDS = ("token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p", "class_dropout_prob")


@dataclass
class TransformerConfig:
    """Hyper-parameters every family has (named as in the published `ModelArgs`)."""

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
    model_type: str = "c2i"  # the condition: "c2i" class labels, "t2i" caption embeddings (arpg.condition)
    caption_dim: int = 2048  # t2i: the text encoder's width (flan-t5-xl); cls_token_num caption rows
    text_encoder: str = "google/flan-t5-xl"  # t2i: what encodes prompts (arpg.text.load_text_encoder)

    def __post_init__(self) -> None:
        for name in ("dim", "n_layer", "n_head", "vocab_size", "block_size", "num_classes", "multiple_of"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.dim % self.n_head == 0, f"dim must be divisible by n_head, got dim={self.dim}, n_head={self.n_head}")
        require(self.head_dim % 4 == 0, f"dim // n_head must be a multiple of 4 for 2-D RoPE, got {self.head_dim}")
        require(math.isqrt(self.block_size) ** 2 == self.block_size,
                f"block_size must be a perfect square (a square token grid), got {self.block_size}")
        require(self.model_type in ("c2i", "t2i"), f"model_type must be 'c2i' or 't2i', got {self.model_type!r}")
        require(self.cls_token_num == 1 or self.model_type == "t2i",
                f"cls_token_num must be 1 for class labels (model_type 'c2i', as published), got {self.cls_token_num}")
        require(self.cls_token_num >= 1 and self.caption_dim >= 1,
                f"cls_token_num (caption rows) and caption_dim must be >= 1, got {self.cls_token_num}, {self.caption_dim}")
        for name in DROPOUT_FIELDS:
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

    def to_dict(self) -> dict:
        return asdict(self)


class GridGenerator(nn.Module):
    """A conditional generator of square token grids (the base of every family's model)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.condition = condition_for(config)
        self._sampling = None

    @property
    def sampling(self) -> Any:
        """The model's sampling recipe, an `arpg.sample.SamplingOptions`: what `generate`, editing
        and the scripts use when no options are given. `arpg.checkpoint.load_model` sets what the
        file recorded (or a released file's published settings); unset, the family's published
        defaults (`arpg.recipes`). Every save records it again."""
        if self._sampling is None:
            from arpg.recipes import family_recipe  # lazy: arpg.recipes reads the sampling options, whose package imports the models

            self._sampling = family_recipe(self.system)
        return self._sampling

    @sampling.setter
    def sampling(self, options: Any) -> None:
        from arpg.sample.options import SamplingOptions

        require(isinstance(options, SamplingOptions),
                f"sampling must be an arpg.sample.SamplingOptions, got {type(options).__name__}")
        self._sampling = options

    @property
    def grid(self) -> tuple[int, int]:
        """The token grid (h, w) the model was trained on."""
        return self.config.grid_size, self.config.grid_size

    @property
    def system(self) -> str:
        """The name messages use for this model's system (e.g. "ARPG", "LlamaGen", "PAR")."""
        return type(self).__name__

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `folder`/config.json, model.safetensors and generation_config.json (the sampling
        recipe), the Hub layout `arpg.from_pretrained(folder)` reads back (`arpg.export`)."""
        from arpg.export import save_pretrained  # lazy: arpg.export reads the sampling options, whose package imports the models

        return save_pretrained(self, folder)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_inputs(self, tokens: Tensor, conditions: Any, values: bool = True) -> tuple[int, int]:
        """(B, T) after checking training inputs: tokens (B, block_size) integers, a batch of B
        conditions. `values` also checks the token range [0, vocab_size) and the conditions; that
        reads values back (a host sync on a GPU), so the training loop checks them on the CPU side
        instead. The shape checks trace under torch.compile (their messages are formatted only on
        failure: a formatted size would specialise the graph to it); the value checks stay out of
        the graph."""
        cfg = self.config
        if not (tokens.ndim == 2 and tokens.shape[1] == cfg.block_size and not tokens.dtype.is_floating_point):
            raise SettingError(f"tokens must be integers of shape (B, {cfg.block_size}), got {tokens.dtype} "
                               f"{tuple(tokens.shape)}")
        B, T = tokens.shape
        if not values:
            size = self.condition.batch_size(conditions)
            if size != B:
                raise SettingError(f"conditions must hold {B} samples (one per token row), got {size}")
            return B, T
        self._check_input_values(tokens, conditions)
        return B, T

    @torch.compiler.disable
    def _check_input_values(self, tokens: Tensor, conditions: Any) -> None:
        require(bool(tokens.min() >= 0) and bool(tokens.max() < self.config.vocab_size),
                f"tokens must be integers in [0, {self.config.vocab_size}) (vocab_size)")
        self.condition.check(conditions, batch=tokens.shape[0])
