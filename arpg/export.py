"""Writing a model's weights with everything needed to use them again.

* `save(model, path)`: one safetensors file; the family, the config and the sampling recipe
  (`model.sampling`) are its JSON metadata. `arpg.checkpoint.load_model` reads it back.
* `save_pretrained(model, folder)`: a folder in the Hugging Face Hub layout, `config.json` (the
  family and the config fields), `model.safetensors` (as `save` writes it) and
  `generation_config.json` (the sampling recipe). `arpg.hub.from_pretrained(folder)` reads it back,
  and the folder can be pushed to the Hub as it is.

Every file is written atomically (`arpg.files.atomic_write`).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from arpg.files import atomic_write
from arpg.recipes import recipe_to_dict

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "generation_config.json"


def save(model: nn.Module, path: str | Path, weights: str = "model") -> Path:
    """Write `model`'s weights as safetensors with its family, config and sampling recipe
    (`model.sampling`) in the metadata (atomic).

    `weights` records what the tensors are ("model" or "ema") for whoever loads them later.
    """
    metadata = {"format": "arpg", "family": model.family, "config": json.dumps(model.config.to_dict()),
                "sampling": json.dumps(recipe_to_dict(model.sampling)), "weights": weights}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata), what="the model weights",
                        size=sum(t.nbytes for t in state.values()))


def save_pretrained(model: nn.Module, folder: str | Path) -> Path:
    """Write `folder`/config.json, model.safetensors and generation_config.json (see the module
    doc); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"family": model.family, **model.config.to_dict()}
    _write_json(folder / CONFIG_FILE, config)
    save(model, folder / WEIGHTS_FILE)
    _write_json(folder / RECIPE_FILE, recipe_to_dict(model.sampling))
    return folder


def _write_json(path: Path, value: dict) -> None:
    text = json.dumps(value, indent=1)
    atomic_write(path, lambda tmp: tmp.write_text(text))
