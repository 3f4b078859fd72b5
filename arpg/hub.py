"""Published weights by name, Hub-style folders, and the files evaluation needs, fetched on first use.

    model = arpg.from_pretrained("ARPG-L", device="cuda")      # arpg_300m.pt from hp-l33/ARPG
    vq = arpg.tokenizer_for(model)                              # VQ-16, from FoundationVision/LlamaGen
    images = generate(model, [207, 360], tokenizer=vq)          # ARPG-L's published FID settings
    model.save_pretrained("my_model")                           # config.json, model.safetensors, generation_config.json
    model = arpg.from_pretrained("my_model")                    # the same weights, config and recipe

`PUBLISHED` names every released file (ARPG, LlamaGen c2i/t2i, PAR, the VQ tokenizers) with its
Hub repository. Files come through `huggingface_hub.hf_hub_download`: into the Hub cache (HF_HOME,
HF_HUB_CACHE), with progress, resumable, and from the cache alone under HF_HUB_OFFLINE=1. A model
loaded by name samples with that file's published settings (`model.sampling`, `arpg.recipes`).

Files that are not on the Hub (the FID Inception weights, ADM's reference batch) are fetched by
URL into ~/.cache/arpg (`fetch_url`) and checked: the Inception weights against the SHA-256 prefix
in their name, as torch.hub, pytorch-fid and torch-fidelity check them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError
from torch import nn

from arpg.checkpoint import load_model
from arpg.errors import require
from arpg.export import CONFIG_FILE, RECIPE_FILE, WEIGHTS_FILE
from arpg.files import atomic_write
from arpg.recipes import published_recipe, recipe_from_dict
from arpg.tokenizer import PixelTokenizer, Tokenizer, VQTokenizer

OFFLINE_ENV = "HF_HUB_OFFLINE"
URL_CACHE = Path("~/.cache/arpg")


@dataclass(frozen=True)
class PublishedFile:
    """A released weights file: its Hub repository and file name, what it is, and for a model
    its token grid side and the name of its tokenizer in `PUBLISHED`."""

    repo_id: str
    filename: str
    kind: str = "model"  # "model" | "tokenizer"
    tokens: int = 16
    tokenizer: Optional[str] = "VQ-16"


def _llamagen(filename: str, tokens: int) -> PublishedFile:
    return PublishedFile("FoundationVision/LlamaGen", filename, tokens=tokens)


def _par(filename: str) -> PublishedFile:
    return PublishedFile("Epiphqny/PAR", filename, tokens=24)


def _t2i(filename: str, tokens: int) -> PublishedFile:
    return PublishedFile("peizesun/llamagen_t2i", filename, tokens=tokens, tokenizer="VQ-16-t2i")


# Where the authors' READMEs link their weights (hp-l33/ARPG, FoundationVision/LlamaGen, Epiphqny/PAR).
PUBLISHED: dict[str, PublishedFile] = {
    "ARPG-L": PublishedFile("hp-l33/ARPG", "arpg_300m.pt"),
    "ARPG-XL": PublishedFile("hp-l33/ARPG", "arpg_700m.pt"),
    "ARPG-XXL": PublishedFile("hp-l33/ARPG", "arpg_1b.pt"),
    "VQ-16": PublishedFile("FoundationVision/LlamaGen", "vq_ds16_c2i.pt", kind="tokenizer", tokenizer=None),
    "VQ-8": PublishedFile("FoundationVision/LlamaGen", "vq_ds8_c2i.pt", kind="tokenizer", tokenizer=None),
    "LlamaGen-B@256": _llamagen("c2i_B_256.pt", 16),
    "LlamaGen-B@384": _llamagen("c2i_B_384.pt", 24),
    "LlamaGen-L@256": _llamagen("c2i_L_256.pt", 16),
    "LlamaGen-L@384": _llamagen("c2i_L_384.pt", 24),
    "LlamaGen-XL@384": _llamagen("c2i_XL_384.pt", 24),
    "LlamaGen-XXL@384": _llamagen("c2i_XXL_384.pt", 24),
    "LlamaGen-3B@384": _llamagen("c2i_3B_384.pt", 24),
    "PAR-XL-4x": _par("PAR-XL-4x.pt"),
    "PAR-XXL-4x": _par("PAR-XXL-4x.pt"),
    "PAR-3B-4x": _par("PAR-3B-4x.pt"),
    "PAR-3B-16x": _par("PAR-3B-16x.pt"),
    "VQ-16-t2i": PublishedFile("peizesun/llamagen_t2i", "vq_ds16_t2i.pt", kind="tokenizer", tokenizer=None),
    "LlamaGen-XL-t2i@256": _t2i("t2i_XL_stage1_256.pt", 16),
    "LlamaGen-XL-t2i@512": _t2i("t2i_XL_stage2_512.pt", 32),
}


def download(name: str) -> Path:
    """The local path of the published file `name` (see `PUBLISHED`), downloaded into the Hugging
    Face cache on first use. Offline (HF_HUB_OFFLINE=1) or without a network and not cached: a
    FileNotFoundError in one line naming the file and how to get it."""
    require(name in PUBLISHED, f"name must be one of {sorted(PUBLISHED)}, got {name!r}")
    entry = PUBLISHED[name]
    try:
        return Path(hf_hub_download(entry.repo_id, entry.filename))
    except LocalEntryNotFoundError:
        why = f"{OFFLINE_ENV} is set" if _offline() else "it could not be downloaded"
        raise FileNotFoundError(
            f"{entry.filename} ({name}) is not in the Hugging Face cache and {why}: fetch it once with "
            f"`huggingface-cli download {entry.repo_id} {entry.filename}` (online, HF_HUB_OFFLINE unset), "
            f"or download https://huggingface.co/{entry.repo_id}/blob/main/{entry.filename} and pass its path"
        ) from None


def from_pretrained(name_or_path: str | Path, *, weights: str = "default", device: torch.device | str = "cpu",
                    dtype: Optional[torch.dtype] = None, **overrides: Any) -> nn.Module | Tokenizer:
    """A model (eval mode) or tokenizer from a published name, a folder of `save_pretrained` or a
    weights file.

    * a name of `PUBLISHED` ("ARPG-L", "PAR-3B-16x", "LlamaGen-XL@384", "VQ-16", ...): the file is
      fetched (`download`); a model gets its token grid and its published sampling settings as
      `model.sampling`; a tokenizer name gives the tokenizer;
    * a folder: config.json, model.safetensors and generation_config.json, read back exactly;
    * a file: `arpg.checkpoint.load_model` (our safetensors, training checkpoints, published .pt).

    `weights`, `device`, `dtype` and `overrides` (config fields) are `load_model`'s.
    """
    name = str(name_or_path)
    if name in PUBLISHED:
        entry, path = PUBLISHED[name], download(name)
        if entry.kind == "tokenizer":
            return VQTokenizer.from_checkpoint(path).to(device)
        model = load_model(path, weights=weights, device=device, dtype=dtype,
                           **{"block_size": entry.tokens ** 2, **overrides})
        model.sampling = published_recipe(name, model.system)
        return model
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _from_folder(path, weights, device, dtype, overrides)
    require(path.is_file(), f"name_or_path must be a published name ({', '.join(PUBLISHED)}), a folder written by "
                            f"save_pretrained or a weights file; {path} does not exist")
    return load_model(path, weights=weights, device=device, dtype=dtype, **overrides)


def tokenizer_for(model: nn.Module, device: torch.device | str | None = None) -> Tokenizer:
    """The tokenizer a model's tokens are meant for: the 8x8 digits' grey levels for a
    17-code model, the published VQ-16 (`from_pretrained("VQ-16")`) for a 16384-code one; on the
    model's device unless `device` says otherwise. Other vocabularies imply no tokenizer: an
    error says to pass one (`arpg.tokenizer.load_tokenizer`)."""
    vocab = model.config.vocab_size
    device = device if device is not None else next(model.parameters()).device
    if vocab == PixelTokenizer.digits().codebook_size:
        return PixelTokenizer.digits().to(device)
    require(vocab == VQTokenizer.vq16().codebook_size,
            f"model: no tokenizer is implied for vocab_size {vocab} (17: the digits' grey levels, 16384: VQ-16); "
            f"load yours with arpg.tokenizer.load_tokenizer")
    return from_pretrained("VQ-16", device=device)


def fetch_url(url: str, filename: str, hash_prefix: Optional[str] = None,
              check: Optional[Callable[[Path], None]] = None) -> Path:
    """`~/.cache/arpg/<filename>`, downloaded from `url` on first use (with progress). The SHA-256
    of the download must start with `hash_prefix` when given, and `check(path)` (e.g. a content
    check) must pass, before the file takes its name. Offline (HF_HUB_OFFLINE=1) and not cached:
    a FileNotFoundError in one line naming the file, its URL and where to put it."""
    path = URL_CACHE.expanduser() / filename
    if path.is_file():
        return path
    if _offline():
        raise FileNotFoundError(f"{path} does not exist and {OFFLINE_ENV} is set: download {url} to it "
                                f"(or pass the file's path)")

    def fetch(tmp: Path) -> None:
        torch.hub.download_url_to_file(url, str(tmp), progress=True)
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        require(hash_prefix is None or digest.startswith(hash_prefix),
                f"{url}: the download's SHA-256 {digest[:16]}... does not start with {hash_prefix} (damaged or "
                f"replaced); nothing was kept")
        if check is not None:
            check(tmp)

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return atomic_write(path, fetch)
    except OSError as err:
        raise FileNotFoundError(f"{filename} could not be downloaded from {url} ({err}): download it into "
                                f"{path.parent} (or pass the file's path)") from None


def _from_folder(folder: Path, weights: str, device: torch.device | str, dtype: Optional[torch.dtype],
                 overrides: dict[str, Any]) -> nn.Module:
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        require((folder / file).is_file(), f"{folder} is not a save_pretrained folder: it has no {file}")
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.pop("family", None)  # the safetensors metadata records it too
    model = load_model(folder / WEIGHTS_FILE, weights=weights, device=device, dtype=dtype, **{**config, **overrides})
    if (folder / RECIPE_FILE).is_file():
        model.sampling = recipe_from_dict(json.loads((folder / RECIPE_FILE).read_text()), folder / RECIPE_FILE)
    return model


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")
