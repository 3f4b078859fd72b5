"""Model families and the registry of their sizes.

`create_model("ARPG-L")` builds a registered size; `MODEL_SIZES` maps every registered name to its
family's config fields. A family is a module here with a config dataclass and an `nn.Module`
whose parameter names are the published ones (`arpg.models.arpg`, `arpg.models.llamagen`); the
layers they share are in `arpg.models.layers`. To add a family: its module, its entries in
`FAMILIES` and `MODEL_SIZES`, its `step_engine` (the step engine the sampler drives, see
`arpg.sample.decode`) and its `fields_from_state_dict` (checkpoint recognition).

Families: ARPG (`ARPG-*`), and LlamaGen's GPT with PAR on it (`LlamaGen-*` decode in raster order,
`PAR-*` in 4 regions; `regions=16` for PAR's 16x models, e.g. `create_model("PAR-3B", regions=16)`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from arpg.errors import require
from arpg.models.arpg import ARPG, ARPGConfig
from arpg.models.llamagen import LlamaGen, LlamaGenConfig


@dataclass(frozen=True)
class Family:
    """A model family: its config dataclass and model class. `fixed_order` families train and
    decode along their own sequence only (no training order, steps or schedule to choose)."""

    name: str
    config: type
    model: type[nn.Module]
    fixed_order: bool = False


FAMILIES: dict[str, Family] = {
    "arpg": Family("arpg", ARPGConfig, ARPG),
    "llamagen": Family("llamagen", LlamaGenConfig, LlamaGen, fixed_order=True),
}

# LlamaGen's GPT sizes (GPT-3B has head_dim 100); "tiny" is ours, for the CPU.
_LLAMAGEN_SIZES = {
    "tiny": dict(n_layer=4, n_head=4, dim=128),
    "B": dict(n_layer=12, n_head=12, dim=768),
    "L": dict(n_layer=24, n_head=16, dim=1024),
    "XL": dict(n_layer=36, n_head=20, dim=1280),
    "XXL": dict(n_layer=48, n_head=24, dim=1536),
    "XXXL": dict(n_layer=48, n_head=40, dim=2560),
    "3B": dict(n_layer=24, n_head=32, dim=3200),
}

# name -> (family, config fields of that size)
MODEL_SIZES: dict[str, tuple[str, dict[str, Any]]] = {
    "ARPG-tiny": ("arpg", dict(n_layer=4, n_head=4, dim=128)),
    "ARPG-S": ("arpg", dict(n_layer=12, n_head=6, dim=384)),
    "ARPG-B": ("arpg", dict(n_layer=12, n_head=12, dim=768)),
    "ARPG-L": ("arpg", dict(n_layer=24, n_head=16, dim=1024)),
    "ARPG-XL": ("arpg", dict(n_layer=36, n_head=20, dim=1280)),
    "ARPG-XXL": ("arpg", dict(n_layer=48, n_head=24, dim=1536)),
    **{f"LlamaGen-{size}": ("llamagen", dict(fields, regions=1)) for size, fields in _LLAMAGEN_SIZES.items()},
    **{f"PAR-{size}": ("llamagen", dict(fields, regions=4)) for size, fields in _LLAMAGEN_SIZES.items()},
}


def family_of(model_or_config: Any) -> Family:
    """The `Family` of a model or config instance."""
    for family in FAMILIES.values():
        if isinstance(model_or_config, (family.model, family.config)):
            return family
    raise TypeError(f"{type(model_or_config).__name__} is not a model or config of a registered family "
                    f"({sorted(FAMILIES)})")


def model_config(name: str, **overrides: Any):
    """The config of a registered size with `overrides` applied (fields of its family's config)."""
    require(name in MODEL_SIZES, f"model name must be one of {sorted(MODEL_SIZES)}, got {name!r}")
    family_name, size = MODEL_SIZES[name]
    config_type = FAMILIES[family_name].config
    fields = set(config_type.__dataclass_fields__)
    unknown = set(overrides) - fields
    require(not unknown, f"unknown {config_type.__name__} fields {sorted(unknown)}; allowed: {sorted(fields)}")
    return replace(config_type(**size), **overrides)


def build_model(config: Any) -> nn.Module:
    """The model of a family config instance (random initialisation)."""
    return family_of(config).model(config)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model size, e.g. `create_model("ARPG-L")` or
    `create_model("ARPG-tiny", vocab_size=17, block_size=64, num_classes=10)`."""
    return build_model(model_config(name, **overrides))


__all__ = ["ARPG", "ARPGConfig", "FAMILIES", "Family", "LlamaGen", "LlamaGenConfig", "MODEL_SIZES", "build_model",
           "create_model", "family_of", "model_config"]
