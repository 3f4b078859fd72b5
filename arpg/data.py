"""Token data sets: on-disk shards, the bundled digits set, and image -> token extraction.

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

import hashlib
import json
import logging
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Optional
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import psutil
import torch
from einops import rearrange
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from arpg.condition import Captions, ClassCondition, Condition, TextCondition, condition_from_manifest
from arpg.errors import require
from arpg.files import FolderLock, atomic_write, check_free_space, remove_partial_writes
from arpg.processes import Processes, Step
from arpg.runtime import resolve_device, worker_count
from arpg.tokenizer import TOKENIZER_CHOICES, Tokenizer, VQTokenizer, load_tokenizer

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
_FORMAT = "arpg-token-shards"
_VERSION = 1
# The published ImageNet codes were made with VQ-16 loaded from this file (identity string as
# VQTokenizer.from_checkpoint("vq_ds16_c2i.pt").identity gives it).
PUBLISHED_VQ16_IDENTITY = "vq16[vq_ds16_c2i.pt]"


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
        return _identity(self)

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


class InMemoryTokenDataset(Dataset):
    """Token sequences held in memory, with the same interface as `TokenDataset`. Items are
    (tokens, class id); with `captions` (a `Captions` batch of `condition`), (tokens, caption) and
    `num_classes` is None (the labels stay for checks of what a model draws)."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor, grid_size: tuple[int, int],
                 codebook_size: int, num_classes: int, tokenizer: str = "unknown",
                 captions: Optional[Captions] = None, condition: Optional[TextCondition] = None):
        if tokens.shape != (labels.shape[0], grid_size[0] * grid_size[1]):
            raise ValueError(f"tokens must have shape ({labels.shape[0]}, {grid_size[0] * grid_size[1]}), "
                             f"got {tuple(tokens.shape)}")
        require((captions is None) == (condition is None), "captions and their condition come together")
        self.tokens = tokens.long()
        self.labels = labels.long()
        self.grid_size = tuple(grid_size)
        self.codebook_size = codebook_size
        self.captions = None if captions is None else condition.check(captions, batch=labels.shape[0])
        self.num_classes = num_classes if captions is None else None
        self.condition = condition or ClassCondition(num_classes)
        self.tokenizer = tokenizer  # the identity of the tokenizer that made the tokens
        self.tokenizer_file = None

    @property
    def identity(self) -> dict[str, Any]:
        """What this data set is (a training run records it, a resume compares it)."""
        return _identity(self)

    def set_epoch(self, epoch: int) -> None:
        """No augmentations to choose from; kept for interface parity with TokenDataset."""

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        if self.captions is not None:
            return self.tokens[index], self.condition.take(self.captions, index)
        return self.tokens[index], int(self.labels[index])


DIGITS_SPLITS = (None, "train", "test")
# Digits with captions ("a thin seven", "a bold two"): the digit's name, and its stroke, "thin"
# when the image has less ink than its class's median, else "bold"; encoded by a fixed word table.
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_STROKES = ("thin", "bold")
DIGITS_TEXT_ENCODER = "words:" + ",".join(("a", *DIGIT_STROKES, *DIGIT_NAMES))
DIGITS_CAPTION_DIM, DIGITS_CAPTION_TOKENS = 16, 4


def digit_prompt(label: int, stroke: str) -> str:
    """The caption of a digit: "a thin seven", "a bold two"."""
    require(stroke in DIGIT_STROKES, f"stroke must be one of {DIGIT_STROKES}, got {stroke!r}")
    return f"a {stroke} {DIGIT_NAMES[label]}"


def digit_strokes(tokens: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """"thin" or "bold" for each digit (N, 64): its ink below or at least the median of the real
    digits of its class (sklearn's full set)."""
    medians = digits_ink_medians()
    ink = tokens.flatten(1).sum(1).double()
    return [DIGIT_STROKES[int(i >= medians[c])] for i, c in zip(ink.tolist(), labels.tolist())]


def digits_ink_medians() -> list[float]:
    """The median ink (sum of grey levels) of the real digits of each class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = digits.images.reshape(-1, 64).sum(1)
    return [float(np.median(ink[digits.target == c])) for c in range(len(DIGIT_NAMES))]


def digits_dataset(split: str | None = None, captions: bool = False) -> InMemoryTokenDataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes) as tokens; nothing is downloaded.

    Each pixel is one token: its grey level 0..16 exactly as sklearn stores it (the
    `PixelTokenizer.digits()` encoding), in raster order, so items are (64,) LongTensors.
    `split`: None for all images, "train" or "test" for a fixed 80/20 split (every fifth image is
    a test image, which keeps the classes balanced). `captions`: condition on captions ("a thin
    seven", see `digit_prompt`) instead of class ids.
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"split must be one of {DIGITS_SPLITS}, got {split!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    tokens = torch.from_numpy(digits.images.reshape(-1, 64).astype(np.int64))  # (1797, 64)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    if split is not None:
        is_test = torch.arange(len(labels)) % 5 == 4
        keep = is_test if split == "test" else ~is_test
        tokens, labels = tokens[keep], labels[keep]
    text = {}
    if captions:
        condition = TextCondition(DIGITS_CAPTION_DIM, DIGITS_CAPTION_TOKENS, DIGITS_TEXT_ENCODER)
        prompts = [digit_prompt(c, stroke) for c, stroke in zip(labels.tolist(), digit_strokes(tokens, labels))]
        text = dict(captions=condition.check(prompts), condition=condition)
    return InMemoryTokenDataset(tokens, labels, grid_size=(8, 8), codebook_size=17, num_classes=10, tokenizer="pixel17",
                                **text)


def _identity(dataset: TokenDataset | InMemoryTokenDataset) -> dict[str, Any]:
    return {"count": len(dataset), "grid_size": list(dataset.grid_size), "codebook_size": dataset.codebook_size,
            **dataset.condition.manifest_entry(), "tokenizer": dataset.tokenizer}


DATA_CHOICES = ("digits", "codes")
CONDITION_CHOICES = ("class", "text")


@dataclass
class DataSettings:
    """`digits`: scikit-learn's 8x8 digits as tokens (bundled). `codes`: a token-shard folder
    written by scripts/extract_codes.py (`path`)."""

    name: str = "digits"
    path: Optional[str] = None
    condition: str = "class"  # "class" ids | "text" captions (digits: "a thin seven"; codes: the shards')
    split: Optional[str] = None  # digits only: None (all 1797), "train" or "test"
    num_workers: Optional[int] = 0  # loader processes; None: one per core but one (at most 8)

    @property
    def label(self) -> str:
        """A short name for runs on this data: "digits" (or "digits_test"), or data.path's folder name."""
        if self.name == "digits":
            captions = "_captions" if self.condition == "text" else ""
            return "digits" + captions + (f"_{self.split}" if self.split else "")
        return Path(self.path).resolve().name

    def validate(self) -> None:
        """Raise `SettingError` naming the first bad key (prefixed `data.`)."""
        require(self.name in DATA_CHOICES, f"data.name must be one of {DATA_CHOICES}, got {self.name!r}")
        require(self.condition in CONDITION_CHOICES,
                f"data.condition must be one of {CONDITION_CHOICES}, got {self.condition!r}")
        if self.name == "codes":
            require(bool(self.path), "data.path must be set for data.name=codes (a folder made by "
                                     "scripts/extract_codes.py)")
            require(Path(self.path, MANIFEST_NAME).is_file(),
                    f"data.path {self.path!r} is not a token-shard folder (no {MANIFEST_NAME} there); make one "
                    f"with scripts/extract_codes.py or point data.path at it")
        else:
            require(self.split in DIGITS_SPLITS, f"data.split must be one of {DIGITS_SPLITS}, got {self.split!r}")
        require(self.num_workers is None or self.num_workers >= 0,
                f"data.num_workers must be >= 0 or null (one per core but one), got {self.num_workers}")


def build_dataset(data: DataSettings, seed: int = 0) -> TokenDataset | InMemoryTokenDataset:
    """The token data set a `DataSettings` names (items: ((T,) LongTensor, a condition of its `condition`))."""
    data.validate()
    if data.name == "digits":
        return digits_dataset(data.split, captions=data.condition == "text")
    dataset = TokenDataset(data.path, seed=seed)
    stored = "class" if isinstance(dataset.condition, ClassCondition) else "text"
    require(stored == data.condition, f"data.condition={data.condition!r}, but the shards in {data.path} hold "
                                      f"{stored} conditions; set data.condition={stored}")
    return dataset


# --------------------------------------------------------------------------------------------
# The published per-image .npy layout (ARPG / RandAR)


def list_npy_folder(src: str | Path) -> list[tuple[Path, int]]:
    """(file, label) for the published layout: `src/<class id>/<image>.npy`, sorted.

    Each file holds one image's codes as (1, augmentations, h*w) integers.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"token folder {src} not found")
    class_dirs = [d for d in src.iterdir() if d.is_dir()]
    not_ids = [d.name for d in class_dirs if not d.name.isdigit()]
    if not_ids:
        raise ValueError(f"{src}: class folders must be named by their integer class id, got {not_ids[:5]}")
    files = [(f, int(d.name)) for d in sorted(class_dirs, key=lambda d: int(d.name))
             for f in sorted(d.glob("*.npy"))]
    if not files:
        raise ValueError(f"{src} holds no <class id>/<image>.npy files")
    return files


_NPY_MAGIC = b"\x93NUMPY"


def read_npy_codes(path: str | Path, codebook_size: int | None = None) -> np.ndarray:
    """One image's codes from the published layout as (augmentations, h*w); every error names the
    file. Pickled (object) arrays are refused, never loaded."""
    with open(path, "rb") as f:
        magic = f.read(len(_NPY_MAGIC))
    if not magic:
        raise ValueError(f"{path}: the file is empty (zero bytes)")
    if magic != _NPY_MAGIC:
        raise ValueError(f"{path}: not a .npy file (no NumPy header)")
    try:
        codes = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "Object arrays" in str(err):
            raise ValueError(f"{path}: holds pickled Python objects, not an integer array; such files are "
                             f"refused (loading them would run their code)") from None
        raise ValueError(f"{path}: a damaged .npy file ({err})") from None
    except (EOFError, OSError) as err:
        raise ValueError(f"{path}: a truncated or damaged .npy file ({type(err).__name__})") from None
    if codes.ndim == 3 and codes.shape[0] == 1:
        codes = codes[0]
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{path}: expected integer codes of shape (1, augmentations, h*w), "
                         f"got {codes.dtype} {codes.shape}")
    if codebook_size is not None and codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"{path}: token ids must be in [0, {codebook_size - 1}], got values in "
                         f"[{codes.min()}, {codes.max()}]")
    return codes


def convert_npy_folder(src: str | Path, dst: str | Path, *, codebook_size: int = 16384,
                       grid_size: tuple[int, int] | None = None, num_classes: int | None = None,
                       tokenizer: str = PUBLISHED_VQ16_IDENTITY, shard_size: int = 10000) -> dict:
    """Convert the published per-image layout (`list_npy_folder`) into our shards at `dst`.

    `grid_size` defaults to the square grid of the stored length, `num_classes` to the largest
    class id + 1. Resumable like `extract_codes`. Returns the manifest.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    files = list_npy_folder(src)
    augmentations, length = read_npy_codes(files[0][0], codebook_size).shape
    if grid_size is None:
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(f"{files[0][0]} holds {length} tokens per image, not a square grid; pass grid_size")
        grid_size = (side, side)
    num_shards = math.ceil(len(files) / shard_size)
    with FolderLock(dst, "code conversion"), tqdm(total=len(files), desc="convert", unit="img") as progress:
        writer = ShardWriter(dst, grid_size=grid_size, codebook_size=codebook_size, tokenizer=tokenizer,
                             augmentations=augmentations,
                             num_classes=num_classes or max(label for _, label in files) + 1,
                             source={"npy_folder": str(Path(src).resolve()), "files": len(files),
                                     "shard_size": shard_size})
        for index in range(num_shards):
            chunk = files[index * shard_size:(index + 1) * shard_size]
            if writer.has_shard(index):
                progress.update(len(chunk))
                continue
            codes = []
            for path, _ in chunk:
                item = read_npy_codes(path, codebook_size)
                if item.shape != (augmentations, length):
                    raise ValueError(f"{path}: codes have shape {item.shape}, the first file has "
                                     f"{(augmentations, length)}")
                codes.append(item)
                progress.update(1)
            writer.write_shard(index, np.stack(codes), np.array([label for _, label in chunk]))
        manifest = writer.finish()
    print(f"converted {manifest['count']} images into {len(manifest['shards'])} shards at {dst}")
    return manifest


# --------------------------------------------------------------------------------------------
# Image folder -> tokens

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
AUGMENT_CHOICES = ("none", "flip", "ten_crop")


@dataclass
class ExtractConfig:
    """Tokenise an ImageFolder-style tree (`data_path/<class name>/<image>`) into shards.

    Class ids follow the sorted class-folder names. `augment`: "none" (1 view, the ADM centre
    crop), "flip" (2 views: the crop and its mirror; LlamaGen's default) or "ten_crop" (10 views:
    TenCrop(image_size) of an ADM centre crop of size image_size * crop_range, which already holds
    5 mirrored crops; LlamaGen's --ten-crop).
    """

    data_path: str = "???"
    output_dir: str = "???"
    tokenizer: str = "vq16"  # "vq16" (needs vq_ckpt) or "pixel" (grey levels; small data and tests)
    vq_ckpt: str = ""  # path to LlamaGen's vq_ds16_c2i.pt (or our VQ safetensors)
    pixel_levels: int = 256
    image_size: int = 256
    augment: str = "flip"
    crop_range: float = 1.1
    # Views per encode call (an image's views stay together); None: what half the free memory of the
    # device holds (`default_batch_size`), at most 256.
    batch_size: Optional[int] = None
    num_workers: Optional[int] = None  # image-decoding processes; None: one per core but one, at most 8
    shard_size: int = 10000  # images per shard: the unit of resumption
    device: str = "auto"  # "auto" = cuda when available, else cpu


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop: halve with BOX while the short side is >= 2*size, BICUBIC-resize the
    short side to `size`, then crop the centre size x size."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def _views(image: Image.Image, config: ExtractConfig) -> list[Image.Image]:
    if config.augment == "ten_crop":
        from torchvision.transforms.functional import ten_crop

        return list(ten_crop(center_crop(image, int(config.image_size * config.crop_range)), config.image_size))
    crop = center_crop(image, config.image_size)
    return [crop, crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)] if config.augment == "flip" else [crop]


def _num_views(augment: str) -> int:
    return {"none": 1, "flip": 2, "ten_crop": 10}[augment]


class _ImageViews(Dataset):
    """(views (A, 3, S, S) uint8 or None if unreadable, label, path, error message or None)."""

    def __init__(self, files: list[tuple[Path, int]], config: ExtractConfig):
        self.files = files
        self.config = config

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path, label = self.files[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")  # forces the full decode, so damage shows up here
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            return None, label, str(path), f"{type(err).__name__}: {err}"
        # uint8 until it reaches the device: a quarter of the bytes through worker queues and PCIe.
        pixels = np.stack([np.asarray(v, dtype=np.uint8) for v in _views(image, self.config)])
        return rearrange(torch.from_numpy(pixels), "a h w c -> a c h w"), label, str(path), None


def _collate(items: list) -> list:
    return items  # variable content (None for unreadable files); batched by hand in extract_codes


def _list_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    if not root.is_dir():
        raise FileNotFoundError(f"data_path {root} not found (expected <data_path>/<class>/<image>)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"data_path {root} has no class subfolders (expected <data_path>/<class>/<image>)")
    files = [(f, label) for label, name in enumerate(classes) for f in sorted((root / name).rglob("*"))
             if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise ValueError(f"data_path {root} holds no images with extensions {IMAGE_EXTENSIONS}")
    return classes, files


def _validate(config: ExtractConfig) -> None:
    for name in ("data_path", "output_dir"):
        require(getattr(config, name) not in ("", "???"), f"{name} must be set, got {getattr(config, name)!r}")
    require(config.tokenizer in TOKENIZER_CHOICES,
            f"tokenizer must be one of {TOKENIZER_CHOICES}, got {config.tokenizer!r}")
    require(config.augment in AUGMENT_CHOICES, f"augment must be one of {AUGMENT_CHOICES}, got {config.augment!r}")
    for name in ("image_size", "shard_size"):
        require(getattr(config, name) >= 1, f"{name} must be >= 1, got {getattr(config, name)}")
    require(config.batch_size is None or config.batch_size >= 1,
            f"batch_size must be >= 1 or null (fit the free memory), got {config.batch_size}")
    require(config.num_workers is None or config.num_workers >= 0,
            f"num_workers must be >= 0 or null (one per core but one), got {config.num_workers}")
    require(config.augment != "ten_crop" or config.crop_range >= 1, f"crop_range must be >= 1, got {config.crop_range}")
    require(Path(config.data_path).is_dir(),
            f"data_path {config.data_path} not found (expected <data_path>/<class>/<image>)")


# A VQ encoder holds about this many float32 feature maps of its first width at full resolution
# per view at its peak (measured: 20 views of 256x256 through VQ-16 took 4.4 GB on a CPU).
_FEATURE_MAPS_PER_VIEW = 8


def default_batch_size(tokenizer: Tokenizer, image_size: int, device: torch.device) -> int:
    """Views per encode call that fit in half the device's free memory (CUDA: free GPU memory;
    CPU: available RAM), at most 256. Pixel tokenizers need next to nothing: 256."""
    if not isinstance(tokenizer, VQTokenizer):
        return 256
    per_view = _FEATURE_MAPS_PER_VIEW * image_size ** 2 * tokenizer.config.ch * 4
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    return max(1, min(256, int(0.5 * free / per_view)))


def extract_codes(config: ExtractConfig, tokenizer: Tokenizer | None = None) -> dict:
    """Tokenise `config.data_path` into shards at `config.output_dir`; return the manifest.

    `tokenizer` overrides the one `config` names (useful from Python and in tests). Unreadable
    images are logged by path and skipped. Interrupted runs resume: shards already written are
    kept, the rest are redone, so no image is stored twice.

    Runs as one process or on every process of a torchrun / `accelerate launch` job, on one node or
    several (`data_path` and `output_dir` on file systems that all of them see). Shards are fixed
    slices of the sorted image list, each encoded in the same batches by whichever process takes
    it, so the shards are the same byte for byte on any number of processes (for one `batch_size`
    and kind of device; its default is the smallest over the processes), and a run may be resumed
    on another number of processes. Process r encodes the missing shards r, r + world, ... and
    writes their files; process 0 holds the folder's lock, lists each shard in the manifest as it
    is finished, shows the progress of all and marks the data set complete once every one is
    there. The processes work in lock step (`arpg.processes`): one that fails stops the others
    with its error.
    """
    with Processes.join() as processes:
        return _extract_codes(config, tokenizer, processes)


@dataclass
class _Encoder:
    """What each process of an extraction sets up for itself."""

    tokenizer: Tokenizer  # on `device`, in eval mode
    tokenizer_file: Optional[str]  # its weights file, recorded in the manifest
    device: torch.device
    classes: list[str]
    files: list[tuple[Path, int]]  # (image, class id), sorted
    batch_size: int  # views per encode call
    workers: int  # image-decoding processes


def _set_up(config: ExtractConfig, tokenizer: Tokenizer | None, local_rank: int) -> _Encoder:
    _validate(config)
    device = resolve_device(config.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # pinned memory and the free-memory probe use the current GPU
    tokenizer_file = config.vq_ckpt if tokenizer is None and config.tokenizer == "vq16" else None
    tokenizer = tokenizer or load_tokenizer(config.tokenizer, config.vq_ckpt, config.pixel_levels)
    require(config.image_size % tokenizer.downsample == 0,
            f"image_size must be a multiple of the tokenizer's downsample {tokenizer.downsample}, "
            f"got {config.image_size}")
    classes, files = _list_image_folder(Path(config.data_path))
    batch_size = config.batch_size or default_batch_size(tokenizer, config.image_size, device)
    return _Encoder(tokenizer.to(device).eval(), tokenizer_file, device, classes, files, batch_size,
                    worker_count(config.num_workers))


def _listing_digest(files: list[tuple[Path, int]], root: str) -> str:
    """What a process's image list is, wherever the folder is mounted."""
    listing = "\n".join(f"{path.relative_to(root)}\t{label}" for path, label in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def _shard_files(files: list[tuple[Path, int]], index: int, shard_size: int) -> list[tuple[Path, int]]:
    return files[index * shard_size:(index + 1) * shard_size]


def _extract_codes(config: ExtractConfig, tokenizer: Tokenizer | None, processes: Processes) -> dict:
    # Every process checks the settings, loads the tokenizer and lists the images itself.
    encoder = processes.everywhere(lambda: _set_up(config, tokenizer, processes.local_rank))
    files = encoder.files
    listings = processes.gather((len(files), _listing_digest(files, config.data_path), encoder.batch_size))
    require(len({(count, digest) for count, digest, _ in listings}) == 1,
            f"the processes see different images in data_path {config.data_path} (images per process: "
            f"{[count for count, _, _ in listings]}); every node must see the same folder")
    batch_size = config.batch_size or min(size for _, _, size in listings)
    first = processes.rank == 0
    if first:
        log.info("encoding %d views per call (batch_size) with %d loader worker(s) per process on %d process(es) "
                 "(%s on process 0)", batch_size, encoder.workers, processes.world, encoder.device)
    side = config.image_size // encoder.tokenizer.downsample
    views = _num_views(config.augment)
    num_shards = math.ceil(len(files) / config.shard_size)
    with ExitStack() as books:
        def open_folder() -> ShardWriter:  # on process 0, which keeps the folder's books
            books.enter_context(FolderLock(config.output_dir, "code extraction"))
            return ShardWriter(
                config.output_dir, grid_size=(side, side), codebook_size=encoder.tokenizer.codebook_size,
                tokenizer=encoder.tokenizer.identity, augmentations=views, num_classes=len(encoder.classes),
                class_names=encoder.classes,
                # Shards are fixed slices of the sorted file list; these make a resumed run slice the same way.
                source={"data_path": str(Path(config.data_path).resolve()), "files": len(files),
                        "shard_size": config.shard_size, "image_size": config.image_size,
                        "augment": config.augment, "crop_range": config.crop_range},
                tokenizer_file=encoder.tokenizer_file)

        writer = processes.on_first(open_folder)  # the others save shards with a copy of it
        missing = [index for index in range(num_shards) if not writer.has_shard(index)]
        new = sum(len(_shard_files(files, index, config.shard_size)) for index in missing)
        # uint16 tokens of every view and an int64 label per image
        processes.on_first(lambda: check_free_space({config.output_dir: new * (views * side * side * 2 + 8)},
                                                    f"the codes of {new} images"))
        progress = tqdm(total=len(files), initial=len(files) - new, unit="img", disable=not first,
                        desc=f"extract ({processes.world} processes)" if processes.world > 1 else "extract")

        def receive(step: Step) -> None:
            progress.update(step.count)
            if first:
                for entry in step.news:
                    writer.add_shard(entry)

        started = time.perf_counter()
        with progress:
            mine = missing[processes.rank::processes.world]
            processes.steps(_encode_shards(mine, config, encoder, batch_size, writer), receive)
        seconds = time.perf_counter() - started
        manifest = processes.on_first(writer.finish)
    if first:
        skipped = sum(len(s["skipped"]) for s in manifest["shards"])
        rate = f"{new / seconds:.3g} images/s on {processes.world} process(es)" if new else "nothing left to do"
        print(f"extracted {manifest['count']} images ({views} views each) into {len(manifest['shards'])} shards "
              f"at {config.output_dir}; skipped {skipped} unreadable; {new} read now ({rate}), "
              f"{len(files) - new} kept from an earlier run")
    return manifest


def _encode_shards(shards: list[int], config: ExtractConfig, encoder: _Encoder, batch_size: int,
                   writer: ShardWriter) -> Iterator[tuple[int, Optional[dict]]]:
    """Encode and save `shards` (indices) in turn: yields (images read, None) after each batch and
    (0, the shard's manifest entry) once a shard's files are written."""
    images_per_batch = max(1, batch_size // _num_views(config.augment))
    side = config.image_size // encoder.tokenizer.downsample
    for index in shards:
        loader = DataLoader(_ImageViews(_shard_files(encoder.files, index, config.shard_size), config),
                            batch_size=images_per_batch, num_workers=encoder.workers, collate_fn=_collate,
                            pin_memory=encoder.device.type == "cuda")
        tokens, labels, skipped = [], [], []
        for batch in loader:
            good = [item for item in batch if item[0] is not None]
            for _, _, path, error in batch:
                if error is not None:
                    log.warning("skipping unreadable image %s (%s)", path, error)
                    skipped.append(path)
            if good:
                views = torch.stack([item[0] for item in good]).to(encoder.device, non_blocking=True)  # uint8
                codes = encoder.tokenizer.encode(rearrange(views, "b a c h w -> (b a) c h w").float() / 127.5 - 1)
                tokens.append(rearrange(codes, "(b a) h w -> b a (h w)", b=len(good)).cpu().numpy())
                labels.extend(item[1] for item in good)
            yield len(batch), None
        stacked = np.concatenate(tokens) if tokens else np.zeros((0, _num_views(config.augment), side * side))
        yield 0, writer.save_shard(index, stacked, np.array(labels, dtype=np.int64), skipped)
