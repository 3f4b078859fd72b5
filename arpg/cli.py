"""Entry-point glue shared by the Hydra scripts in `scripts/`.

Every script is a typed dataclass plus a library function. This module registers the dataclass
as the structured schema of `configs/<name>.yaml`, so an override with a typo, a wrong type or a
missing required key is an error that names the key, and hands the function a real dataclass
instance rather than a DictConfig.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from arpg.errors import require

T = TypeVar("T")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def register_schema(name: str, schema: type) -> str:
    """Register `schema` as `<name>_schema` in Hydra's ConfigStore and return that name."""
    schema_name = f"{name}_schema"
    ConfigStore.instance().store(name=schema_name, node=schema)
    return schema_name


def to_dataclass(cfg: DictConfig, schema: type[T]) -> T:
    """Turn a composed config into an instance of `schema` (validates and resolves it).

    Hydra's `+key=value` appends even to a structured config, and OmegaConf then sets the stray
    key as an attribute; such keys are an error naming them, so a typo never passes silently.
    """
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))
    unknown = _unknown_keys(config)
    require(not unknown, f"unknown config keys {unknown} (not fields of {schema.__module__}.{schema.__name__}; "
                         f"check the spelling)")
    return config


def compose_config(name: str, schema: type[T], overrides: Sequence[str] = ()) -> T:
    """Compose `configs/<name>.yaml` with command-line style `overrides` into a `schema` instance,
    as the script would (inside a running Hydra script, in its context)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schema(name, schema)
    if GlobalHydra.instance().is_initialized():
        return to_dataclass(compose(name, overrides=list(overrides)), schema)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return to_dataclass(compose(name, overrides=list(overrides)), schema)


def hydra_main(fn: Callable[[T], Any], schema: type[T], config_name: str,
               config_dir: str | Path = CONFIG_DIR) -> None:
    """Compose `configs/<config_name>.yaml` (validated by `schema`) from the command line and call `fn`."""
    register_schema(config_name, schema)

    @hydra.main(version_base=None, config_path=str(config_dir), config_name=config_name)
    def _run(cfg: DictConfig) -> None:
        fn(to_dataclass(cfg, schema))

    _run()


def _unknown_keys(section: Any, prefix: str = "") -> list[str]:
    """Attributes of a config dataclass (and its sections) that are not fields."""
    fields = {f.name for f in dataclasses.fields(section)}
    unknown = [prefix + name for name in vars(section) if name not in fields]
    for name in fields:
        value = getattr(section, name)
        if dataclasses.is_dataclass(value):
            unknown += _unknown_keys(value, f"{prefix}{name}.")
    return unknown
