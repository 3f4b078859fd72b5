"""Entry-point glue shared by the Hydra scripts in `scripts/`.

Every script is a typed dataclass plus a library function. This module registers the dataclass
as the structured schema of `configs/<name>.yaml`, so an override with a typo, a wrong type or a
missing required key is an error that names the key, and hands the function a real dataclass
instance rather than a DictConfig.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

T = TypeVar("T")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def register_schema(name: str, schema: type) -> str:
    """Register `schema` as `<name>_schema` in Hydra's ConfigStore and return that name."""
    schema_name = f"{name}_schema"
    ConfigStore.instance().store(name=schema_name, node=schema)
    return schema_name


def to_dataclass(cfg: DictConfig, schema: type[T]) -> T:
    """Turn a composed config into an instance of `schema` (validates and resolves it)."""
    merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    return OmegaConf.to_object(merged)


def hydra_main(fn: Callable[[T], Any], schema: type[T], config_name: str,
               config_dir: str | Path = CONFIG_DIR) -> None:
    """Compose `configs/<config_name>.yaml` (validated by `schema`) from the command line and call `fn`."""
    register_schema(config_name, schema)

    @hydra.main(version_base=None, config_path=str(config_dir), config_name=config_name)
    def _run(cfg: DictConfig) -> None:
        fn(to_dataclass(cfg, schema))

    _run()
