"""What a model is conditioned on: one class per condition type, the one place that knows its inside.

A condition type validates what a user passes (`check`), handles batches of it (`batch_size`,
`join`, `take`, `to`), supplies the null condition for classifier-free guidance (`unconditional`)
and for condition dropout in training (`drop`), embeds it into the prefix rows the model reads
(`embedding`: a module with the published parameter names; `rows` prefix rows, each with an
all-zero RoPE row as published; `key_mask`: which of them the other rows may attend to), says
which model config fields describe it (`config_fields`, `from_config`), which conditions FID
images get (`fid_conditions`), and how it is stored in token shards (`manifest_entry`,
`shard_fields`, `shard_arrays`, `shard_item`; `condition_from_manifest` reads it back). Models,
the decode loop, editing, training, the data and FID sampling hold "a condition" and never look
inside it.

Types: `ClassCondition` (class ids, batches are (B,) int64 tensors) and `TextCondition` (caption
embeddings, batches are `Captions`). `condition_for(config)` picks the type of a model config's
`model_type` ("c2i" / "t2i", the published names). A new type is one class here and an entry in
`CONDITION_TYPES`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arpg.errors import SettingError, require

Device = torch.device | str | None


class Condition:
    """The interface every condition type implements (see the module docstring). A batch is a
    tensor or a NamedTuple of tensors whose first dimension is the batch, so the batch
    operations are written once here."""

    kind: str  # the config's `model_type` that selects this type
    rows: int  # prefix rows the condition occupies in the model's sequence

    @classmethod
    def from_config(cls, config: Any) -> Condition:
        """The condition a model config describes (its fields named as published)."""
        raise NotImplementedError

    def check(self, value: Any, batch: Optional[int] = None, device: Device = None) -> Any:
        """The condition batch of a user's `value` on `device`, after checking it (and, with
        `batch`, that it holds that many samples)."""
        raise NotImplementedError

    def unconditional(self, conditions: Any) -> Any:
        """The null condition for each of `conditions` (the guidance's unconditional rows)."""
        raise NotImplementedError

    def drop(self, conditions: Any, prob: float, generator: Optional[torch.Generator] = None) -> Any:
        """Replace each sample's condition by the null one with probability `prob` (guidance training)."""
        raise NotImplementedError

    def embedding(self, dim: int) -> nn.Module:
        """A fresh module mapping a batch to its prefix rows (B, rows, dim), named as published."""
        raise NotImplementedError

    def key_mask(self, conditions: Any) -> Optional[Tensor]:
        """(B, rows) bool, True on the prefix rows other rows may attend to; None when all may be."""
        return None

    # -- batches --------------------------------------------------------------------------------

    def batch_size(self, conditions: Any) -> int:
        return _first(conditions).shape[0]

    def join(self, first: Any, second: Any) -> Any:
        """One batch of `first`'s samples, then `second`'s."""
        return _map(lambda a, b: torch.cat([a, b]), first, second)

    def take(self, conditions: Any, index: int | Tensor) -> Any:
        """The samples at `index` (an (n,) index tensor), or the one sample at an int index."""
        return _map(lambda a: a[index], conditions)

    def to(self, conditions: Any, device: Device, non_blocking: bool = False) -> Any:
        return _map(lambda a: a.to(device, non_blocking=non_blocking), conditions)

    def config_fields(self) -> dict[str, Any]:
        """The model config fields of this condition (the inverse of `from_config`)."""
        raise NotImplementedError

    def fid_conditions(self, indices: Sequence[int], device: Device = None) -> Any:
        """The conditions of FID sample images `indices` (a fixed, balanced assignment)."""
        raise NotImplementedError

    # -- token shards ---------------------------------------------------------------------------

    shard_fields: tuple[str, ...]  # the arrays of a shard that store the conditions (file-name suffixes)

    def manifest_entry(self) -> dict:
        """The manifest fields that describe a shard folder's conditions (compared on resume)."""
        raise NotImplementedError

    def shard_arrays(self, conditions: Any) -> dict[str, np.ndarray]:
        """The arrays (n, ...) that store a batch in a shard, by file-name suffix."""
        raise NotImplementedError

    def shard_item(self, arrays: Mapping[str, np.ndarray], index: int) -> Any:
        """Sample `index` of a shard's arrays, as a data set item (batched by the default collate)."""
        raise NotImplementedError


def _first(batch: Any) -> Tensor:
    return batch if isinstance(batch, Tensor) else batch[0]


def _map(fn, *batches: Any) -> Any:
    if isinstance(batches[0], Tensor):
        return fn(*batches)
    return type(batches[0])(*(fn(*fields) for fields in zip(*batches)))


# ---------------------------------------------------------------------------------------------
# Class labels
# ---------------------------------------------------------------------------------------------

class ClassCondition(Condition):
    """One class id in [0, num_classes) per image; `NULL` (-1) marks the unconditional class.
    One prefix row: the class token."""

    kind = "c2i"
    rows = 1
    shard_fields = ("labels",)
    NULL = -1

    def __init__(self, num_classes: int):
        require(num_classes >= 1, f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, config: Any) -> ClassCondition:
        return cls(config.num_classes)

    def check(self, labels: Sequence[int] | Tensor, batch: Optional[int] = None, device: Device = None) -> Tensor:
        """Labels as an int64 (B,) tensor on `device`, after checking shape, dtype and range."""
        if not isinstance(labels, Tensor):
            require(not isinstance(labels, str) and all(isinstance(c, (int, np.integer)) for c in labels),
                    f"labels must be class ids (ints) for a class-conditional model, got {labels!r}")
            labels = torch.as_tensor(list(labels), dtype=torch.long)
        want = f"({batch},)" if batch is not None else "(B,) with B >= 1"
        require(labels.ndim == 1 and labels.numel() >= 1 and (batch is None or labels.shape[0] == batch)
                and not labels.dtype.is_floating_point and labels.dtype != torch.bool,
                f"labels must be integer class ids of shape {want}, got {labels.dtype} {tuple(labels.shape)}")
        require(bool(((labels >= 0) & (labels < self.num_classes)).all()),
                f"labels must be class ids in [0, {self.num_classes}) (num_classes), "
                f"got values in [{int(labels.min())}, {int(labels.max())}]")
        return labels.to(device=device, dtype=torch.long)

    def unconditional(self, labels: Tensor) -> Tensor:
        return torch.full_like(labels, self.NULL)

    def drop(self, labels: Tensor, prob: float, generator: Optional[torch.Generator] = None) -> Tensor:
        if prob <= 0:
            return labels
        dropped = torch.rand(labels.shape, device=labels.device, generator=generator) < prob
        return torch.where(dropped, self.NULL, labels)

    def table_rows(self, labels: Tensor, first_row: int = 0, null_row: Optional[int] = None) -> Tensor:
        """Embedding-table rows (B,) of labels: class c is row first_row + c, the null class
        `null_row` (default: the row after the classes)."""
        null_row = first_row + self.num_classes if null_row is None else null_row
        return torch.where(labels == self.NULL, null_row, labels + first_row)

    def embedding(self, dim: int) -> ClassEmbedding:
        return ClassEmbedding(self, dim)

    def config_fields(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def fid_conditions(self, indices: Sequence[int], device: Device = None) -> Tensor:
        """Image i has class i % num_classes (so 50,000 images of 1000 classes are 50 per class)."""
        return torch.tensor([i % self.num_classes for i in indices], dtype=torch.long, device=device)

    def manifest_entry(self) -> dict:
        return {"num_classes": self.num_classes}

    def shard_arrays(self, labels: Tensor | np.ndarray) -> dict[str, np.ndarray]:
        return {"labels": np.asarray(labels, dtype=np.int64)}

    def shard_item(self, arrays: Mapping[str, np.ndarray], index: int) -> int:
        return int(arrays["labels"][index])


class ClassEmbedding(nn.Module):
    """Class c is row c of `embedding_table`, the unconditional (null) class its last row
    (LlamaGen's `LabelEmbedder` names): labels (B,) -> (B, 1, dim)."""

    def __init__(self, condition: ClassCondition, dim: int):
        super().__init__()
        self.num_classes = condition.num_classes
        self.embedding_table = nn.Embedding(condition.num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        rows = torch.where(labels == ClassCondition.NULL, self.num_classes, labels)
        return self.embedding_table(rows)[:, None]


# ---------------------------------------------------------------------------------------------
# Text: caption embeddings of a text encoder
# ---------------------------------------------------------------------------------------------

class Captions(NamedTuple):
    """A batch of captions in the published layout: `embeddings` (B, L, C) text-encoder states,
    left-padded (the valid rows last) and zero on padded rows; `mask` (B, L) bool, True on the
    valid rows; `null` (B,) bool, True where the caption is replaced by the learned null caption
    (guidance, dropout), which keeps the sample's mask as the published decoder does."""

    embeddings: Tensor
    mask: Tensor
    null: Tensor


class TextCondition(Condition):
    """Captions as text-encoder embeddings (LlamaGen's t2i: flan-t5-xl, caption_dim 2048, at most
    `max_tokens` = 120 rows). `check` takes prompts (strings, encoded by `encoder`, by default the
    one `text_encoder` names, built on first use: `arpg.text.load_text_encoder`), `Captions`, or a
    pair (embeddings (B, L, C), mask (B, L)). The prefix is the `max_tokens` caption rows."""

    kind = "t2i"
    shard_fields = ("captions", "caption_lengths")

    def __init__(self, caption_dim: int, max_tokens: int = 120, text_encoder: str = "google/flan-t5-xl",
                 encoder: Any = None):
        require(caption_dim >= 1, f"caption_dim must be >= 1, got {caption_dim}")
        require(max_tokens >= 1, f"max_tokens (cls_token_num) must be >= 1, got {max_tokens}")
        self.caption_dim, self.rows, self.text_encoder = caption_dim, max_tokens, text_encoder
        self.encoder = encoder

    @classmethod
    def from_config(cls, config: Any) -> TextCondition:
        return cls(config.caption_dim, config.cls_token_num, config.text_encoder)

    def check(self, value: Any, batch: Optional[int] = None, device: Device = None) -> Captions:
        if isinstance(value, str) or (isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value)):
            value = self.encode([value] if isinstance(value, str) else list(value), device)
        require(isinstance(value, (Captions, tuple)) and len(value) in (2, 3),
                f"captions must be prompts (strings), Captions, or (embeddings (B, {self.rows}, {self.caption_dim}), "
                f"mask (B, {self.rows})) for a text-conditional model, got {type(value).__name__}")
        embeddings, mask = value[0], value[1]
        B = embeddings.shape[0] if isinstance(embeddings, Tensor) else -1
        want = (B if batch is None else batch, self.rows, self.caption_dim)
        require(isinstance(embeddings, Tensor) and embeddings.dtype.is_floating_point
                and tuple(embeddings.shape) == want and B >= 1, f"caption embeddings must be floats of shape (B, {self.rows}, {self.caption_dim}) "
                            f"(cls_token_num, caption_dim){'' if batch is None else f' with B = {batch}'}, got "
                            f"{getattr(embeddings, 'dtype', type(embeddings).__name__)} "
                            f"{tuple(getattr(embeddings, 'shape', ()))}")
        require(isinstance(mask, Tensor) and tuple(mask.shape) == (B, self.rows),
                f"caption mask must have shape ({B}, {self.rows}), got {tuple(getattr(mask, 'shape', ()))}")
        null = value[2] if len(value) == 3 else torch.zeros(B, dtype=torch.bool)
        return Captions(embeddings.to(device), mask.to(device=device, dtype=torch.bool),
                        null.to(device=device, dtype=torch.bool))

    def encode(self, prompts: list[str], device: Device = None) -> Captions:
        """Captions of `prompts` by the text encoder (built on `device` on first use when none is
        attached)."""
        if self.encoder is None:
            from arpg.text import load_text_encoder

            self.encoder = load_text_encoder(self.text_encoder, self.rows, self.caption_dim, device or "cpu")
        require(self.encoder.max_tokens == self.rows and self.encoder.caption_dim == self.caption_dim,
                f"encoder: the text encoder makes ({self.encoder.max_tokens}, {self.encoder.caption_dim}) captions, "
                f"the model reads ({self.rows}, {self.caption_dim}) (cls_token_num, caption_dim)")
        embeddings, mask = self.encoder(prompts)
        return Captions(embeddings, mask, torch.zeros(len(prompts), dtype=torch.bool, device=mask.device))

    def unconditional(self, captions: Captions) -> Captions:
        return captions._replace(null=torch.ones_like(captions.null))

    def drop(self, captions: Captions, prob: float, generator: Optional[torch.Generator] = None) -> Captions:
        if prob <= 0:
            return captions
        dropped = torch.rand(captions.null.shape, device=captions.null.device, generator=generator) < prob
        return captions._replace(null=captions.null | dropped)

    def key_mask(self, captions: Captions) -> Tensor:
        return captions.mask

    def embedding(self, dim: int) -> CaptionEmbedding:
        return CaptionEmbedding(self.caption_dim, dim, self.rows)

    def config_fields(self) -> dict[str, Any]:
        return {"model_type": self.kind, "caption_dim": self.caption_dim, "cls_token_num": self.rows,
                "text_encoder": self.text_encoder}

    def fid_conditions(self, indices: Sequence[int], device: Device = None) -> Captions:
        raise SettingError("model: FID sampling of a text-to-image model needs a prompt per image; sample_fid "
                           "assigns class labels only: sample prompts with generate(model, prompts) instead")

    def manifest_entry(self) -> dict:
        return {"condition": {"kind": self.kind, "caption_dim": self.caption_dim, "max_tokens": self.rows,
                              "text_encoder": self.text_encoder}}

    def no_captions(self) -> Captions:
        """An empty batch (0 captions): the conditions of a shard whose every image was skipped."""
        return Captions(torch.zeros(0, self.rows, self.caption_dim), torch.zeros(0, self.rows, dtype=torch.bool),
                        torch.zeros(0, dtype=torch.bool))

    def shard_arrays(self, captions: Captions) -> dict[str, np.ndarray]:
        """Float16 embeddings (n, L, C) and the valid-row counts (n,) (the captions are left-padded)."""
        return {"captions": captions.embeddings.detach().cpu().to(torch.float16).numpy(),
                "caption_lengths": captions.mask.sum(1).cpu().numpy().astype(np.int64)}

    def shard_item(self, arrays: Mapping[str, np.ndarray], index: int) -> Captions:
        length = int(arrays["caption_lengths"][index])
        mask = torch.arange(self.rows) >= self.rows - length
        return Captions(torch.from_numpy(arrays["captions"][index].astype(np.float32)), mask, torch.tensor(False))


class CaptionProjection(nn.Module):
    """Two bias-free linears with a tanh-approximated GELU between (LlamaGen's `MLP`)."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedding(nn.Module):
    """LlamaGen's `CaptionEmbedder`: every caption row projected by `cap_proj`; the null caption is
    `uncond_embedding` (rows, caption_dim), a buffer in the state dict (published):
    Captions -> (B, rows, dim)."""

    def __init__(self, caption_dim: int, dim: int, rows: int):
        super().__init__()
        self.cap_proj = CaptionProjection(caption_dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(rows, caption_dim) / caption_dim ** 0.5)

    def forward(self, captions: Captions) -> Tensor:
        dtype = self.cap_proj.fc1.weight.dtype
        text = torch.where(captions.null[:, None, None], self.uncond_embedding.to(dtype), captions.embeddings.to(dtype))
        return self.cap_proj(text)


CONDITION_TYPES: dict[str, type[Condition]] = {"c2i": ClassCondition, "t2i": TextCondition}


def condition_from_manifest(manifest: Mapping[str, Any]) -> Condition:
    """The condition of a token-shard folder's manifest (`manifest_entry`): its "condition"
    entry, or class labels (`num_classes`) when it has none."""
    entry = manifest.get("condition")
    if entry is None:
        return ClassCondition(manifest["num_classes"])
    require(entry.get("kind") == TextCondition.kind, f"manifest condition kind must be one of "
                                                     f"{[TextCondition.kind]}, got {entry.get('kind')!r}")
    return TextCondition(entry["caption_dim"], entry["max_tokens"], entry["text_encoder"])


def condition_for(config: Any) -> Condition:
    """The condition of a model config: its `model_type` ("c2i" class labels, "t2i" captions)."""
    require(config.model_type in CONDITION_TYPES,
            f"model_type must be one of {sorted(CONDITION_TYPES)}, got {config.model_type!r}")
    return CONDITION_TYPES[config.model_type].from_config(config)
