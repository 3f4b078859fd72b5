"""Token shards on disk: `ShardWriter` writes them (resumably), `TokenDataset` reads them.

On-disk format (one folder, written by `ShardWriter`):

* `shard_00000_tokens.npy`: uint16 (n, augmentations, h*w), token grids in raster order,
* `shard_00000_labels.npy`: int64 (n,), class ids (the condition's arrays, `Condition.shard_arrays`:
  for captions `shard_00000_captions.npy` float16 (n, L, C) and `shard_00000_caption_lengths.npy`),
* `manifest.json`: grid size, codebook size, tokenizer identity (and the tokenizer's weights file,
  when known, so training can decode its sample grids with it), augmentations, the condition
  (class count, or a "condition" entry: `Condition.manifest_entry`),
  total count and the list of shards with their counts. It is (re)written after every shard,
  with `"complete": true` only once the whole data set is there.

Every file is put in place by an atomic rename, so an interrupted extraction leaves only whole
shards behind; rerunning it skips them and writes the rest. One job at a time writes a folder
(`arpg.files.FolderLock`); in a job of several processes every process writes the shards it
encodes and process 0 holds the lock and writes the manifest. `TokenDataset` memory-maps the
shards and draws one augmentation per sample per epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from arpg.condition import ClassCondition, Condition, condition_from_manifest
from arpg.errors import require
from arpg.files import atomic_write, remove_partial_writes

MANIFEST_NAME = "manifest.json"
_FORMAT = "arpg-token-shards"
_VERSION = 1


def _shard_name(index: int, field: str) -> str:
    return f"shard_{index:05d}_{field}.npy"


def _save_npy(path: Path, array: np.ndarray) -> None:
    # np.save would append ".npy" to the temporary name, so hand it an open file instead.
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write, what="the token shard", size=array.nbytes + 128)  # + the .npy header


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {root} is not a token data set "
                                f"(make one with scripts/extract_codes.py or convert_npy_folder)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != _FORMAT:
        raise ValueError(f"{path} is not an {_FORMAT} manifest (format={manifest.get('format')!r})")
    return manifest


class ShardWriter:
    """Writes token shards and the manifest into `root`, resuming an interrupted run (hold the
    folder's `FolderLock` while it exists: it removes partial writes of killed runs).

    Shards are addressed by index so a rerun can skip finished ones (`has_shard`) and rewrite
    only the rest. The header (grid size, codebook size, tokenizer, augmentations, classes and
    whatever identifies the source, `source`) must equal the one already on disk, otherwise
    mixing two data sets in one folder is refused.
    """

    def __init__(self, root: str | Path, *, grid_size: tuple[int, int], codebook_size: int,
                 tokenizer: str, augmentations: int, num_classes: Optional[int] = None,
                 class_names: Sequence[str] | None = None, source: dict[str, Any] | None = None,
                 tokenizer_file: str | Path | None = None, condition: Optional[Condition] = None):
        if not 1 <= codebook_size <= 65536:
            raise ValueError(f"codebook_size must be in [1, 65536] to fit uint16 shards, got {codebook_size}")
        if augmentations < 1:
            raise ValueError(f"augmentations must be >= 1, got {augmentations}")
        require((num_classes is None) != (condition is None),
                "ShardWriter takes num_classes (class labels) or a condition, exactly one of them")
        self.condition = condition if condition is not None else ClassCondition(int(num_classes))
        self.root = Path(root)
        self.header = {
            "format": _FORMAT, "version": _VERSION,
            "grid_size": [int(grid_size[0]), int(grid_size[1])], "codebook_size": int(codebook_size),
            "tokenizer": tokenizer, "augmentations": int(augmentations), **self.condition.manifest_entry(),
            "class_names": list(class_names) if class_names is not None else None,
            "source": source or {},
        }
        # Where the tokenizer's weights are: not part of what the data is (the file may move).
        self.tokenizer_file = str(Path(tokenizer_file).resolve()) if tokenizer_file else None
        self.shards: dict[int, dict] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        remove_partial_writes(self.root)  # the caller holds the folder's lock
        if (self.root / MANIFEST_NAME).is_file():
            self._resume(_read_manifest(self.root))

    def _resume(self, manifest: dict) -> None:
        for key, value in self.header.items():
            if manifest.get(key) != value:
                raise ValueError(f"{self.root} already holds a data set with {key}={manifest.get(key)!r}, "
                                 f"this run has {key}={value!r}; use another output folder or delete it")
        # A shard is listed only after both its files were renamed into place, so it is whole.
        self.shards = {s["index"]: s for s in manifest["shards"]
                       if all((self.root / s[k]).is_file() for k in ("tokens", *self.condition.shard_fields))}

    def has_shard(self, index: int) -> bool:
        return index in self.shards

    @property
    def count(self) -> int:
        return sum(s["count"] for s in self.shards.values())

    def write_shard(self, index: int, tokens: np.ndarray, conditions: Any, skipped: Sequence[str] = ()) -> None:
        """Write shard `index` and list it in the manifest (`save_shard`, then `add_shard`)."""
        self.add_shard(self.save_shard(index, tokens, conditions, skipped))

    def save_shard(self, index: int, tokens: np.ndarray, conditions: Any, skipped: Sequence[str] = ()) -> dict:
        """Write shard `index`'s files: tokens (n, augmentations, h*w) ints and their n conditions
        (class ids (n,), or `Captions`), stored as the condition says (`Condition.shard_arrays`);
        return its manifest entry, for `add_shard`.

        `skipped` lists inputs of this shard that could not be read; they are recorded so the
        final summary counts them even across restarts. In a job of several processes the others
        save shards with a copy of the writer of the one holding the folder's lock, which adds them.
        """
        h, w = self.header["grid_size"]
        expected = (self.header["augmentations"], h * w)
        if tokens.ndim != 3 or tokens.shape[1:] != expected:
            raise ValueError(f"tokens must have shape (n, {expected[0]}, {expected[1]}), got {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.header["codebook_size"]):
            raise ValueError(f"token ids must be in [0, {self.header['codebook_size'] - 1}], "
                             f"got [{tokens.min()}, {tokens.max()}]")
        if isinstance(conditions, np.ndarray):
            conditions = torch.from_numpy(conditions)
        if tokens.shape[0]:
            conditions = self.condition.check(conditions, batch=tokens.shape[0], device="cpu")
        arrays = self.condition.shard_arrays(conditions)
        require(all(array.shape[0] == tokens.shape[0] for array in arrays.values()),
                f"conditions must hold {tokens.shape[0]} samples (one per token row)")
        names = {field: _shard_name(index, field) for field in ("tokens", *arrays)}
        _save_npy(self.root / names["tokens"], tokens.astype(np.uint16))
        for field, array in arrays.items():
            _save_npy(self.root / names[field], array)
        return {"index": index, **names, "count": int(tokens.shape[0]), "skipped": list(skipped)}

    def add_shard(self, entry: dict) -> None:
        """List a shard that `save_shard` wrote (its entry) in the manifest."""
        self.shards[entry["index"]] = entry
        self._write_manifest(complete=False)

    def finish(self) -> dict:
        """Mark the data set complete (shards must be 0..k-1 with none missing); return the manifest."""
        missing = sorted(set(range(len(self.shards))) ^ set(self.shards))
        if missing:
            raise ValueError(f"cannot finish {self.root}: shard indices must be 0..{len(self.shards) - 1}, "
                             f"these are missing or extra: {missing[:10]}")
        return self._write_manifest(complete=True)

    def _write_manifest(self, complete: bool) -> dict:
        shards = [self.shards[i] for i in sorted(self.shards)]
        manifest = {**self.header, "tokenizer_file": self.tokenizer_file, "complete": complete,
                    "count": sum(s["count"] for s in shards), "shards": shards}
        text = json.dumps(manifest, indent=1)
        atomic_write(self.root / MANIFEST_NAME, lambda tmp: tmp.write_text(text))
        return manifest


class TokenDataset(Dataset):
    """Pre-tokenised images from a shard folder: item i -> (tokens LongTensor (h*w,), its condition:
    a class id int, or `Captions` of one sample; `condition` says which).

    Each sample stores several augmentations (crops / flips); one is picked per sample per epoch,
    deterministically from (seed, epoch). Call `set_epoch(epoch)` before building each epoch's
    DataLoader iterator (workers copy the dataset when the iterator starts, so persistent workers
    would keep the previous epoch's choice).
    """

    def __init__(self, root: str | Path, seed: int = 0):
        self.root = Path(root)
        self.manifest = _read_manifest(self.root)
        if not self.manifest["complete"]:
            raise ValueError(f"{self.root} is incomplete ({self.manifest['count']} samples so far): the "
                             f"extraction was interrupted; rerun it with the same output folder to finish")
        self.shards = self.manifest["shards"]
        self.condition = condition_from_manifest(self.manifest)
        for shard in self.shards:
            for key in ("tokens", *self.condition.shard_fields):
                if not (self.root / shard[key]).is_file():
                    raise FileNotFoundError(f"{self.root / shard[key]} listed in the manifest is missing")
        self._ends = np.cumsum([s["count"] for s in self.shards])  # exclusive end index of each shard
        self.seed = seed
        self._arrays: list[tuple[np.ndarray, dict[str, np.ndarray]]] | None = None
        self.set_epoch(0)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.manifest["grid_size"])

    @property
    def codebook_size(self) -> int:
        return self.manifest["codebook_size"]

    @property
    def num_classes(self) -> Optional[int]:
        """The class count of class-labelled data (None for other conditions)."""
        return self.manifest.get("num_classes")

    @property
    def augmentations(self) -> int:
        return self.manifest["augmentations"]

    @property
    def tokenizer(self) -> str:
        return self.manifest["tokenizer"]

    @property
    def tokenizer_file(self) -> Optional[str]:
        """The tokenizer weights the codes were extracted with, when the extraction recorded them."""
        return self.manifest.get("tokenizer_file")

    @property
    def identity(self) -> dict[str, Any]:
        """What this data set is, wherever it lives (a training run records it, a resume compares it)."""
        return dataset_identity(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        self._choice = rng.integers(0, self.augmentations, size=len(self), dtype=np.int32)

    def __len__(self) -> int:
        return self.manifest["count"]

    def _open(self) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        # Opened lazily so that DataLoader workers map the files themselves instead of
        # receiving pickled copies of them.
        if self._arrays is None:
            fields = self.condition.shard_fields
            self._arrays = [(np.load(self.root / s["tokens"], mmap_mode="r"),
                             {field: np.load(self.root / s[field], mmap_mode="r") for field in fields})
                            for s in self.shards]
        return self._arrays

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index must be in [0, {len(self) - 1}], got {index}")
        shard = int(np.searchsorted(self._ends, index, side="right"))
        offset = index - (int(self._ends[shard - 1]) if shard else 0)
        tokens, conditions = self._open()[shard]
        row = tokens[offset, self._choice[index]].astype(np.int64)
        return torch.from_numpy(row), self.condition.shard_item(conditions, offset)



def dataset_identity(dataset: Any) -> dict[str, Any]:
    """What a token data set is, wherever it lives (count, grid, codebook, condition, tokenizer):
    a training run records it, a resume compares it."""
    return {"count": len(dataset), "grid_size": list(dataset.grid_size), "codebook_size": dataset.codebook_size,
            **dataset.condition.manifest_entry(), "tokenizer": dataset.tokenizer}
