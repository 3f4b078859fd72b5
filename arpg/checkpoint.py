"""Reading and writing model weights, for every model family.

* `save(model, path)` (`arpg.export`) writes safetensors with the family, its config and its
  sampling recipe (`model.sampling`) as JSON metadata, atomically.
* `load_model(path)` reads those files and the published `.pt` files with strict key and shape
  checks: ARPG (`arpg_300m.pt`, `arpg_700m.pt`, `arpg_1b.pt`), LlamaGen's c2i GPT (`c2i_B_256.pt`
  ... `c2i_3B_384.pt`), PAR (`PAR-XL-4x.pt` ... `PAR-3B-16x.pt`) and training checkpoints. The
  family is recognised from the key names, the size from the shapes (`infer_config`). The model's
  recipe is the one the file records (our safetensors, training checkpoints), else that of the
  released file of that size (`arpg.recipes.published_recipe`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from arpg.errors import require
from arpg.files import read_torch_file
from arpg.export import save
from arpg.models import FAMILIES, MODEL_SIZES, Family
from arpg.recipes import published_recipe, recipe_from_dict

log = logging.getLogger(__name__)

WEIGHTS_CHOICES = ("default", "model", "ema")
# The published sampler's order of preference among the entries of a `.pt` checkpoint.
_PUBLISHED_WEIGHT_KEYS = ("model", "module", "state_dict")


def load_weights(path: str | Path, weights: str = "default") -> tuple[dict[str, Tensor], Optional[dict]]:
    """Read a state dict and, when the file records one, the config (as a dict).

    `weights`: "default" takes what the published sampler takes ("model", else "module", else
    "state_dict", else the dict itself); "model" is the same; "ema" takes the EMA copy when the file
    has one (falling back to "model" with a warning). Which entry was taken is logged.
    """
    checkpoint = _read_checkpoint(path, weights)
    return checkpoint.state, checkpoint.config


class _Checkpoint(NamedTuple):
    state: dict[str, Tensor]
    config: Optional[dict]  # the model config the file records
    family: Optional[str]  # the family the file records (our safetensors)
    sampling: Optional[dict]  # the sampling recipe the file records (ours)


def _read_checkpoint(path: str | Path, weights: str) -> _Checkpoint:
    """`load_weights` plus what else the file records (family, sampling recipe)."""
    if weights not in WEIGHTS_CHOICES:
        raise ValueError(f"weights must be one of {WEIGHTS_CHOICES}, got {weights!r}")
    path = _existing(path)
    if _is_safetensors(path):
        return _load_safetensors(path)

    # Mapped, not read: each of 8 processes would otherwise hold its own copy of the whole file
    # (optimizer states included) in host memory.
    obj = read_torch_file(path, mmap=True)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    config, sampling = _config_from_checkpoint(obj), _sampling_from_checkpoint(obj)
    if weights == "ema":
        if "ema" in obj:
            log.info("%s: using the 'ema' weights", path)
            return _Checkpoint(_as_state_dict(obj["ema"], path, "ema"), config, None, sampling)
        log.warning("%s has no 'ema' weights; using the model weights instead", path)
    for key in _PUBLISHED_WEIGHT_KEYS:
        if key in obj:
            log.info("%s: using the %r weights", path, key)
            return _Checkpoint(_as_state_dict(obj[key], path, key), config, None, sampling)
    log.info("%s: using the top-level dict as the state dict", path)
    return _Checkpoint(_as_state_dict(obj, path, "top-level dict"), config, None, sampling)


def load_model(path: str | Path, weights: str = "default", model_name: Optional[str] = None,
               device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None,
               **overrides: Any) -> nn.Module:
    """Load a model of any family (in eval mode) from our safetensors or a published `.pt` checkpoint.

    The config comes from the file when it records one (ours do). Published files record none: the
    family is recognised from the key names and the size from the shapes (dim and depth pick a
    registered size, e.g. ARPG-L or LlamaGen-XL; pass `model_name` for others), and vocab_size,
    num_classes and PAR's regions are read off the shapes. No file records its token grid: it is
    16x16 unless `overrides` say otherwise, e.g. `block_size=576` (24x24) for LlamaGen's 384px
    files and the released PAR models. `overrides` replace any config field. Keys and shapes must
    match exactly; the first mismatch is reported with both shapes.

    `model.sampling` (the recipe `generate` starts from) is what the file records, else, for a
    published file, the settings of the released file of that size (ARPG-L: 64 arccos steps,
    linear guidance 5.0; `arpg.recipes`).
    """
    state, config_dict, family_name, sampling_dict = _read_checkpoint(path, weights)
    published = None  # the released file's name for a file that records no config
    if config_dict is None:
        family, size, config_dict = _infer_size(state, model_name, path)
        regions = config_dict.get("regions", 1)
        published = f"{size}-{regions}x" if regions > 1 else size
    else:
        family = FAMILIES[family_name] if family_name else _recognise_family(state, path)[0]
    fields = family.config.__dataclass_fields__
    unknown = sorted(set(overrides) - set(fields))
    require(not unknown, f"unknown {family.config.__name__} fields {unknown}; allowed: {sorted(fields)}")
    config = family.config(**{**{k: v for k, v in config_dict.items() if k in fields}, **overrides})
    with torch.device("meta"):
        model = family.model(config)
    check_state_dict(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)
    if sampling_dict is not None:
        model.sampling = recipe_from_dict(sampling_dict, path)
    elif published is not None:
        model.sampling = published_recipe(published, model.system)
    return model.to(device=device, dtype=dtype).eval()


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor], source: str | Path = "state dict") -> None:
    """Raise ValueError naming the first key whose presence or shape differs from `model`'s."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in expected.items():
        if key not in state:
            raise ValueError(f"{source}: missing key {key!r} (expected shape {shape})")
        got = tuple(state[key].shape)
        if got != shape:
            raise ValueError(f"{source}: key {key!r} has shape {got}, the model expects {shape}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ValueError(f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)")


# ---------------------------------------------------------------------------------------------

def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then the JSON header
    return len(head) == 9 and head[8:9] == b"{"


def _load_safetensors(path: Path) -> _Checkpoint:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt): {err}") from None
    # Files written before there were several families record an ARPG config as "arpg_config".
    config_key = "config" if "config" in metadata else "arpg_config"
    try:
        config = json.loads(metadata[config_key]) if config_key in metadata else None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its {config_key!r} metadata is not valid JSON ({err})") from None
    family = metadata.get("family", "arpg") if config is not None else None
    require(family is None or family in FAMILIES, f"{path} records the model family {family!r}, not one of "
                                                  f"{sorted(FAMILIES)}")
    log.info("%s: safetensors (%s weights) of the %s family", path, metadata.get("weights", "unrecorded"),
             family or "unrecorded")
    try:
        sampling = json.loads(metadata["sampling"]) if "sampling" in metadata else None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its 'sampling' metadata is not valid JSON ({err})") from None
    return _Checkpoint(state, config, family, sampling)


def _sampling_from_checkpoint(obj: Mapping) -> Optional[dict]:
    """The sampling settings a training checkpoint's run used (its recipe), else None."""
    config = obj.get("config")
    train = config.get("train") if isinstance(config, Mapping) else None
    sampling = train.get("sampling") if isinstance(train, Mapping) else None
    return dict(sampling) if isinstance(sampling, Mapping) else None


def _config_from_checkpoint(obj: Mapping) -> Optional[dict]:
    config = obj.get("config")
    if isinstance(config, Mapping):
        # Our training states store the resolved training config; the model part sits under "model".
        return dict(config.get("model", config))
    return None


def _as_state_dict(obj: Any, path: Path, what: str) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: the {what} entry is not a state dict of tensors")
    return dict(obj)


def _recognise_family(state: Mapping[str, Tensor], path: str | Path) -> tuple[Family, dict]:
    """The family whose key layout `state` has, and the config fields its shapes determine."""
    for family in FAMILIES.values():
        fields = family.model.fields_from_state_dict(state)
        if fields is not None:
            return family, fields
    raise ValueError(f"{path}: not a checkpoint of a known model family ({sorted(FAMILIES)}): it has neither "
                     f"ARPG's 'embeddings.weight' + 'head.weight' nor LlamaGen's 'tok_embeddings.weight' + "
                     f"'cls_embedding.embedding_table.weight'")


def infer_config(state: Mapping[str, Tensor], model_name: Optional[str] = None,
                 source: str | Path = "state dict") -> tuple[Family, dict]:
    """The family and config fields of a state dict that records no config (a published file).

    The family comes from the key names; the size is the registered size of that family with the
    same dim and depth (or `model_name`); the fields the shapes determine (vocab_size, num_classes,
    regions, ...) are read off them. The token grid is not in a state dict (block_size stays the
    size's default, 16x16).
    """
    family, _, fields = _infer_size(state, model_name, source)
    return family, fields


def _infer_size(state: Mapping[str, Tensor], model_name: Optional[str], source: str | Path
                ) -> tuple[Family, str, dict]:
    """`infer_config` plus the registered size's name (a PAR file gets a PAR-* name)."""
    family, fields = _recognise_family(state, source)
    sizes = {name: size for name, (family_name, size) in MODEL_SIZES.items() if family_name == family.name}
    if model_name is None:
        matches = [name for name, size in sizes.items()
                   if (size["dim"], size["n_layer"]) == (fields["dim"], fields["n_layer"])]
        if not matches:
            raise ValueError(f"{source}: no registered {family.name} size has dim={fields['dim']}, "
                             f"n_layer={fields['n_layer']}; pass model_name= one of {sorted(sizes)} (or a config)")
        # LlamaGen and PAR share their sizes: the name follows whether the file has regions
        parallel = fields.get("regions", 1) > 1
        model_name = sorted(matches, key=lambda name: (sizes[name].get("regions", 1) > 1) != parallel)[0]
    if model_name not in sizes:
        raise ValueError(f"model_name must be a {family.name} size, one of {sorted(sizes)}, got {model_name!r}")
    log.info("%s: %s layout, size %s, with %s from the shapes", source, family.name, model_name, fields)
    return family, model_name, {**sizes[model_name], **fields}
