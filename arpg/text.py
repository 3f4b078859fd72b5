"""Prompts -> caption embeddings in the layout LlamaGen's text-to-image GPT reads.

    encoder = TextEncoder.from_pretrained()  # google/flan-t5-xl through `transformers` (pip install arpg[text])
    embeddings, mask = encoder(["a red fox in snow"])  # (1, 120, 2048), (1, 120)

The layout is the published sampler's: the prompt is tokenized to at most `max_tokens` (120)
tokens (T5's end-of-sequence token included), the encoder runs on the right-padded batch with its
attention mask, and the last hidden states of the valid tokens are moved to the END of the 120 rows
(left padding) with zeros on the padded rows; `mask` is True on the valid rows. Each prompt's rows
are cached, so a prompt is encoded once however often it is sampled.

A model reads these through `arpg.condition.TextCondition`, which builds the encoder its config
names (`text_encoder`: a Hub name, or "words:<w1>,<w2>,..." for a `WordTableEncoder`) on first
use, or takes one (`model.condition.encoder = TextEncoder(tokenizer, t5_encoder)`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from arpg.errors import MissingPrerequisites, require

DEFAULT_TEXT_ENCODER = "google/flan-t5-xl"  # LlamaGen's t2i models were trained on its captions
WORD_TABLE_PREFIX = "words:"


def load_text_encoder(name: str, max_tokens: int, caption_dim: int, device: torch.device | str = "cpu") -> Any:
    """The text encoder `name` names: "words:<w1>,<w2>,..." a `WordTableEncoder` over those words
    (no download), anything else a Hub model or folder for `TextEncoder.from_pretrained`."""
    if name.startswith(WORD_TABLE_PREFIX):
        return WordTableEncoder(name[len(WORD_TABLE_PREFIX):].split(","), caption_dim, max_tokens)
    return TextEncoder.from_pretrained(name, max_tokens, device)


class WordTableEncoder:
    """A deterministic encoder for a closed vocabulary (small demonstrations and tests): word w is
    a fixed random unit vector of `caption_dim` (seeded by the vocabulary), a prompt its words'
    vectors, left-padded to `max_tokens` rows with zeros, as `TextEncoder` lays them out. Nothing
    is learned or downloaded; a word outside the vocabulary is an error naming the vocabulary."""

    def __init__(self, words: Sequence[str], caption_dim: int, max_tokens: int, seed: int = 0):
        require(len(words) >= 1 and len(set(words)) == len(words) and all(w and " " not in w for w in words),
                f"words must be distinct single words, got {list(words)}")
        self.words, self.caption_dim, self.max_tokens = list(words), caption_dim, max_tokens
        table = torch.randn(len(words), caption_dim, generator=torch.Generator().manual_seed(seed))
        self.table = table / table.norm(dim=1, keepdim=True)  # (W, C)
        self.index = {w: i for i, w in enumerate(self.words)}

    @property
    def name(self) -> str:
        """The `text_encoder` setting that rebuilds this encoder."""
        return WORD_TABLE_PREFIX + ",".join(self.words)

    def __call__(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        require(len(prompts) >= 1 and all(isinstance(p, str) for p in prompts),
                f"prompts must be a non-empty list of strings, got {prompts!r}")
        L = self.max_tokens
        embeddings = torch.zeros(len(prompts), L, self.caption_dim)
        mask = torch.zeros(len(prompts), L, dtype=torch.bool)
        for b, prompt in enumerate(prompts):
            words = prompt.lower().split()
            unknown = [w for w in words if w not in self.index]
            require(not unknown and 1 <= len(words) <= L,
                    f"prompt {prompt!r} must be 1 to {L} words of {self.words}" + (f"; unknown: {unknown}" if unknown else ""))
            embeddings[b, L - len(words):] = self.table[[self.index[w] for w in words]]
            mask[b, L - len(words):] = True
        return embeddings, mask


class TextEncoder:
    """A tokenizer and a text encoder (e.g. T5's encoder): prompts -> (embeddings (B, L, C) float32,
    mask (B, L) bool), left-padded to L = `max_tokens`, zero on padded rows.

    Args:
        tokenizer: a `transformers` tokenizer (called with padding="max_length", truncation).
        encoder: a module whose forward(input_ids, attention_mask) returns `.last_hidden_state`
            (B, L, C), e.g. `transformers.T5EncoderModel`; its `config.d_model` is C.
        max_tokens: L, the rows of a caption (120 for LlamaGen's t2i models).
        cache_size: prompts whose rows are kept (the least recently used are dropped first).
    """

    def __init__(self, tokenizer: Any, encoder: nn.Module, max_tokens: int = 120, cache_size: int = 4096):
        require(max_tokens >= 1, f"max_tokens must be >= 1, got {max_tokens}")
        require(cache_size >= 0, f"cache_size must be >= 0, got {cache_size}")
        self.tokenizer, self.encoder = tokenizer, encoder.eval()
        self.max_tokens, self.cache_size = max_tokens, cache_size
        self.caption_dim = encoder.config.d_model
        self._cache: OrderedDict[str, Tensor] = OrderedDict()  # prompt -> its valid rows (n, C), float32 CPU

    @classmethod
    def from_pretrained(cls, name: str = DEFAULT_TEXT_ENCODER, max_tokens: int = 120,
                        device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None,
                        **kwargs: Any) -> TextEncoder:
        """The encoder of a Hub model or local folder `name` (downloaded by `transformers` on first
        use), in `dtype` (default: bf16 on CUDA, as the published sampler, float32 elsewhere)."""
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError:
            raise MissingPrerequisites("text prompts need the `transformers` package: pip install 'arpg[text]' "
                                       "(or pass caption embeddings, arpg.condition.Captions)") from None
        device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(name)
        encoder = T5EncoderModel.from_pretrained(name, dtype=dtype).to(device)
        return cls(tokenizer, encoder, max_tokens, **kwargs)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        require(len(prompts) >= 1 and all(isinstance(p, str) for p in prompts),
                f"prompts must be a non-empty list of strings, got {prompts!r}")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        rows = dict(zip(missing, self._encode(missing))) if missing else {}
        for prompt in prompts:
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
                rows[prompt] = self._cache[prompt]
        for prompt in missing:
            self._cache[prompt] = rows[prompt]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        L = self.max_tokens
        embeddings = torch.zeros(len(prompts), L, self.caption_dim)
        mask = torch.zeros(len(prompts), L, dtype=torch.bool)
        for b, prompt in enumerate(prompts):
            valid = rows[prompt]  # (n, C): the last n rows are the prompt's
            embeddings[b, L - valid.shape[0]:] = valid
            mask[b, L - valid.shape[0]:] = True
        return embeddings, mask

    def _encode(self, prompts: list[str]) -> list[Tensor]:
        """The valid rows (n_i, C) of each prompt, float32 on the CPU."""
        device = next(self.encoder.parameters()).device
        batch = self.tokenizer(prompts, max_length=self.max_tokens, padding="max_length", truncation=True,
                               add_special_tokens=True, return_tensors="pt")
        ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        states = self.encoder(input_ids=ids, attention_mask=attention).last_hidden_state.float().cpu()  # (B, L, C)
        lengths = attention.sum(1).tolist()  # right-padded: the valid tokens come first
        return [state[:n].clone() for state, n in zip(states, lengths)]
