"""Sampling recipes: the `SamplingOptions` a model is sampled with when nothing else is said.

A model carries its recipe as `model.sampling` (`arpg.models.base.GridGenerator`): what its weights
file recorded (a training run records its `sampling` settings), else the published settings of a
released file, else its family's published defaults. The published numbers live once, in the
Hydra sampling group `arpg/configs/sampling/<name>.yaml`, which the FID presets (`arpg/configs/preset/`)
select and this module reads:

    family defaults   arpg (64 arccos steps, linear guidance 4.0: the published `generate`),
                      llamagen (raster, constant guidance 4.0, top-k 2000), par (constant 1.5)
    released files    arpg_l, arpg_xl, arpg_xxl, par_xl_4x, par_xxl_4x, par_3b_4x, par_3b_16x
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from arpg.errors import require
from arpg.sample.options import SamplingOptions

# The package's Hydra configs (the scripts compose them; the recipes below are read from them).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SAMPLING_DIR = CONFIG_DIR / "sampling"

# model.system -> the family's published defaults
FAMILY_RECIPES = {"ARPG": "arpg", "LlamaGen": "llamagen", "PAR": "par"}
# a released weights file (its name in `arpg.hub.PUBLISHED`) -> the settings its published FID run uses
PUBLISHED_RECIPES = {"ARPG-L": "arpg_l", "ARPG-XL": "arpg_xl", "ARPG-XXL": "arpg_xxl", "PAR-XL-4x": "par_xl_4x",
                     "PAR-XXL-4x": "par_xxl_4x", "PAR-3B-4x": "par_3b_4x", "PAR-3B-16x": "par_3b_16x"}


def recipe(name: str) -> SamplingOptions:
    """The `SamplingOptions` of `arpg/configs/sampling/<name>.yaml` (its `defaults` entries first, as
    Hydra composes it), on top of the `SamplingOptions` defaults."""
    return SamplingOptions(**_recipe_fields(name))


def family_recipe(system: str) -> SamplingOptions:
    """The published defaults of the family whose `model.system` is `system` ("ARPG", "LlamaGen", "PAR")."""
    require(system in FAMILY_RECIPES, f"system must be one of {sorted(FAMILY_RECIPES)}, got {system!r}")
    return recipe(FAMILY_RECIPES[system])


def published_recipe(name: str, system: str) -> SamplingOptions:
    """The recipe of the released file `name` (e.g. "ARPG-L", "PAR-3B-16x"): the settings of its
    published FID run where there is one, else its family's defaults."""
    return recipe(PUBLISHED_RECIPES[name]) if name in PUBLISHED_RECIPES else family_recipe(system)


def recipe_to_dict(options: SamplingOptions) -> dict[str, Any]:
    """`options` as JSON-ready fields (what a weights file records). A permutation tensor as the
    order cannot be recorded: name an order instead."""
    fields = dataclasses.asdict(options)
    require(isinstance(fields["order"], (str, type(None))),
            "sampling.order: a recipe records an order by name (e.g. 'random'), not a permutation tensor")
    if isinstance(fields["schedule"], tuple):
        fields["schedule"] = list(fields["schedule"])
    return fields


def recipe_from_dict(fields: dict[str, Any], source: str | Path = "file") -> SamplingOptions:
    """The `SamplingOptions` a file recorded (fields it does not know are refused, naming them)."""
    known = {f.name for f in dataclasses.fields(SamplingOptions)}
    unknown = sorted(set(fields) - known)
    require(not unknown, f"{source}: its sampling recipe has unknown fields {unknown}; allowed: {sorted(known)}")
    return SamplingOptions(**fields)


@lru_cache(maxsize=None)
def _recipe_file_fields(name: str) -> tuple[tuple[str, Any], ...]:
    path = SAMPLING_DIR / f"{name}.yaml"
    require(path.is_file(), f"recipe must be one of {sorted(p.stem for p in SAMPLING_DIR.glob('*.yaml'))}, got {name!r}")
    node = OmegaConf.to_container(OmegaConf.load(path)) or {}
    fields: dict[str, Any] = {}
    for base in node.pop("defaults", []):
        if base != "_self_":
            fields.update(_recipe_fields(base))
    fields.update(node)
    return tuple(fields.items())


def _recipe_fields(name: str) -> dict[str, Any]:
    return dict(_recipe_file_fields(name))

