"""Reading and writing model weights.

* `save(model, path)` writes safetensors with the `ARPGConfig` as JSON metadata, atomically.
* `load_model(path)` reads those files and the published ARPG `.pt` files (`arpg_300m.pt`,
  `arpg_700m.pt`, `arpg_1b.pt` and training checkpoints) with strict key and shape checks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from arpg.files import atomic_write, read_torch_file
from arpg.models import MODEL_SIZES
from arpg.models.arpg import ARPG, ARPGConfig

log = logging.getLogger(__name__)

WEIGHTS_CHOICES = ("default", "model", "ema")
# The published sampler's order of preference among the entries of a `.pt` checkpoint.
_PUBLISHED_WEIGHT_KEYS = ("model", "module", "state_dict")


def save(model: ARPG, path: str | Path, weights: str = "model") -> Path:
    """Write `model`'s weights as safetensors with its config in the metadata (atomic).

    `weights` records what the tensors are ("model" or "ema") for whoever loads them later.
    """
    metadata = {"format": "arpg", "arpg_config": json.dumps(model.config.to_dict()), "weights": weights}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def load_weights(path: str | Path, weights: str = "default") -> tuple[dict[str, Tensor], Optional[dict]]:
    """Read a state dict and, when the file records one, the config (as a dict).

    `weights`: "default" takes what the published sampler takes ("model", else "module", else
    "state_dict", else the dict itself); "model" is the same; "ema" takes the EMA copy when the file
    has one (falling back to "model" with a warning). Which entry was taken is logged.
    """
    if weights not in WEIGHTS_CHOICES:
        raise ValueError(f"weights must be one of {WEIGHTS_CHOICES}, got {weights!r}")
    path = _existing(path)
    if _is_safetensors(path):
        return _load_safetensors(path)

    obj = read_torch_file(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    config = _config_from_checkpoint(obj)
    if weights == "ema":
        if "ema" in obj:
            log.info("%s: using the 'ema' weights", path)
            return _as_state_dict(obj["ema"], path, "ema"), config
        log.warning("%s has no 'ema' weights; using the model weights instead", path)
    for key in _PUBLISHED_WEIGHT_KEYS:
        if key in obj:
            log.info("%s: using the %r weights", path, key)
            return _as_state_dict(obj[key], path, key), config
    log.info("%s: using the top-level dict as the state dict", path)
    return _as_state_dict(obj, path, "top-level dict"), config


def load_model(path: str | Path, weights: str = "default", model_name: Optional[str] = None,
               device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None,
               **overrides: Any) -> ARPG:
    """Load an ARPG model (in eval mode) from our safetensors or a published `.pt` checkpoint.

    The config comes from the file when it records one (ours do). Published files record none, so
    the size is recognised from the tensor shapes (ARPG-L/XL/XXL; pass `model_name` for others)
    and vocab_size / num_classes are read off the embedding and head shapes. `overrides` replace
    config fields (e.g. `block_size` for a model trained on another grid). Keys and shapes must
    match exactly; the first mismatch is reported with both shapes.
    """
    state, config_dict = load_weights(path, weights)
    if config_dict is None:
        config_dict = _infer_config(state, model_name, path)
    fields = ARPGConfig.__dataclass_fields__
    config = ARPGConfig(**{**{k: v for k, v in config_dict.items() if k in fields}, **overrides})
    with torch.device("meta"):
        model = ARPG(config)
    check_state_dict(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def check_state_dict(model: torch.nn.Module, state: Mapping[str, Tensor], source: str | Path = "state dict") -> None:
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


def _load_safetensors(path: Path) -> tuple[dict[str, Tensor], Optional[dict]]:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt): {err}") from None
    try:
        config = json.loads(metadata["arpg_config"]) if "arpg_config" in metadata else None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its 'arpg_config' metadata is not valid JSON ({err})") from None
    log.info("%s: safetensors (%s weights)", path, metadata.get("weights", "unrecorded"))
    return state, config


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


def _infer_config(state: Mapping[str, Tensor], model_name: Optional[str], path: Path) -> dict:
    """Recover the config of a published checkpoint from its tensor shapes."""
    for key in ("embeddings.weight", "head.weight"):
        if key not in state:
            raise ValueError(f"{path}: missing key {key!r}; this is not an ARPG checkpoint")
    rows, dim = state["embeddings.weight"].shape
    vocab_size = state["head.weight"].shape[0]
    n_layer = 2 * sum(1 for k in state if k.startswith("layers.self_dec.") and k.endswith(".attn_norm.weight"))
    if model_name is None:
        matches = [name for name, (family, size) in MODEL_SIZES.items()
                   if family == "arpg" and size["dim"] == dim and size["n_layer"] == n_layer]
        if not matches:
            raise ValueError(f"{path}: no registered size has dim={dim}, n_layer={n_layer}; "
                             f"pass model_name= one of {sorted(MODEL_SIZES)} (or a config)")
        model_name = matches[0]
    if model_name not in MODEL_SIZES:
        raise ValueError(f"model_name must be one of {sorted(MODEL_SIZES)}, got {model_name!r}")
    log.info("%s: recognised as %s", path, model_name)
    return {**MODEL_SIZES[model_name][1], "vocab_size": vocab_size, "num_classes": rows - vocab_size - 3}
