"""Entry-point glue shared by the Hydra scripts in `scripts/`.

Every script is a typed dataclass plus a library function. This module registers the dataclass
as the structured schema of `arpg/configs/<name>.yaml`, so an override with a typo, a wrong type or a
missing required key is an error that names the key, and hands the function a real dataclass
instance rather than a DictConfig.

Errors a user causes (a bad setting, a missing or damaged file: `ValueError`, which includes
`arpg.errors.SettingError`, and `FileNotFoundError`), storage that refuses a write (a full disk, a
quota, a read-only or forbidden folder: `arpg.errors.WriteError` and any OSError of
`arpg.errors.STORAGE_ERRNOS`), training that diverged (`arpg.errors.TrainingDiverged`) and, on the
other processes of a multi-process job, the failure of one of them (`ProcessFailed`, naming it and
its error) end a script with one line on stderr naming the setting or file, and exit status 1;
`ARPG_TRACEBACK=1` shows the full traceback instead.
Scripts write nothing of Hydra's (no `outputs/`, no `hydra/` folder, no log file; see
`arpg/configs/quiet_hydra.yaml`), and INFO logging shows on the console.

A section declared with `overlay_field(SomeDataclass)` (the sampling settings of scripts/sample.py
and scripts/sample_fid.py) takes the keys of that dataclass but arrives as a dict of only the keys
the composition set (a group file, a preset or the command line): they replace single fields of
something the script knows later (the model's recipe), the others stay unset.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import field
import sys
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from tqdm import tqdm

from arpg.errors import STORAGE_ERRNOS, ProcessFailed, SettingError, TrainingDiverged, require
from arpg.recipes import CONFIG_DIR

T = TypeVar("T")

TRACEBACK_ENV = "ARPG_TRACEBACK"
# Shown as one line: a user's error, and another process's failure (that process shows its own error).
USER_ERRORS = (ValueError, FileNotFoundError, TrainingDiverged, ProcessFailed)


def overlay_field(fields_of: type) -> Any:
    """A dataclass field holding the keys of the dataclass `fields_of` that a composition sets, as
    a dict (default: empty). From Python it may also hold a whole `fields_of` instance."""
    return field(default_factory=dict, metadata={"overlay_of": fields_of})


def register_schema(name: str, schema: type) -> str:
    """Register `schema` as `<name>_schema` in Hydra's ConfigStore and return that name. An
    `overlay_field` section gets every key of its dataclass, unset (MISSING), so that an override
    with a typo is refused and the keys left unset are known after composing."""
    schema_name = f"{name}_schema"
    node = OmegaConf.structured(schema)
    for key, fields_of in _overlays(schema).items():
        node[key] = {f.name: MISSING for f in dataclasses.fields(fields_of)}
    ConfigStore.instance().store(name=schema_name, node=node)
    return schema_name


def to_dataclass(cfg: DictConfig, schema: type[T]) -> T:
    """Turn a composed config into an instance of `schema` (validates and resolves it).

    Hydra's `+key=value` appends even to a structured config, and OmegaConf then sets the stray
    key as an attribute; such keys are an error naming them, so a typo never passes silently.
    A section's own check (e.g. `SamplingOptions`) failing is reported with the section's key,
    e.g. "sampling.steps must be ...". An `overlay_field` section becomes the dict of its set keys,
    checked by building its dataclass from them.
    """
    cfg = cfg.copy()
    for key, fields_of in _overlays(schema).items():
        given = {k: v for k, v in OmegaConf.to_container(cfg[key], resolve=True).items() if v != MISSING}
        try:
            fields_of(**given)
        except SettingError as err:
            raise SettingError(f"{key}.{err}") from None
        with open_dict(cfg):
            cfg[key] = given
    merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    try:
        config = OmegaConf.to_object(merged)
    except SettingError as err:
        raise SettingError(f"{_failing_section(merged)}{err}") from None
    unknown = _unknown_keys(config)
    require(not unknown, f"unknown config keys {unknown} (not fields of {schema.__module__}.{schema.__name__}; "
                         f"check the spelling)")
    return config


def compose_config(name: str, schema: type[T], overrides: Sequence[str] = ()) -> T:
    """Compose `arpg/configs/<name>.yaml` with command-line style `overrides` into a `schema` instance,
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
    """Compose `arpg/configs/<config_name>.yaml` (validated by `schema`) from the command line and call
    `fn`; a user's error ends the process with one line (see the module docstring)."""
    register_schema(config_name, schema)
    traceback = os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    if traceback:
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then re-raises instead of printing a trimmed trace

    @hydra.main(version_base=None, config_path=str(config_dir), config_name=config_name)
    def _run(cfg: DictConfig) -> None:
        try:
            fn(to_dataclass(cfg, schema))
        except (*USER_ERRORS, OSError) as err:
            if traceback or (isinstance(err, OSError) and not isinstance(err, FileNotFoundError)
                             and err.errno not in STORAGE_ERRNOS):
                raise
            message = " ".join(str(err).split())
            for bar in list(getattr(tqdm, "_instances", ())):  # end live progress bars: the line is the error's
                bar.close()
            print(f"error: {message} (set {TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr, flush=True)
            sys.exit(1)

    _run()


def _overlays(schema: type) -> dict[str, type]:
    """The `overlay_field` sections of `schema`: key -> the dataclass whose keys they take."""
    return {f.name: f.metadata["overlay_of"] for f in dataclasses.fields(schema) if "overlay_of" in f.metadata}


def _failing_section(config: DictConfig, prefix: str = "") -> str:
    """The dotted key ("sampling.") of the innermost dataclass section that fails to build."""
    for key in config:
        node = config[key]
        if isinstance(node, DictConfig) and OmegaConf.get_type(node) not in (None, dict):
            try:
                OmegaConf.to_object(node)
            except SettingError:
                return _failing_section(node, f"{prefix}{key}.")
    return prefix


def _unknown_keys(section: Any, prefix: str = "") -> list[str]:
    """Attributes of a config dataclass (and its sections) that are not fields."""
    fields = {f.name for f in dataclasses.fields(section)}
    unknown = [prefix + name for name in vars(section) if name not in fields]
    for name in fields:
        value = getattr(section, name)
        if dataclasses.is_dataclass(value):
            unknown += _unknown_keys(value, f"{prefix}{name}.")
    return unknown
