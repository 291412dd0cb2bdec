"""Hydra configuration: the base config in `configs/`, recipes from `recipes/` (group `recipe`), callback presets from
`callbacks/` (group `callbacks`), and one-line errors for unknown recipes, groups and keys."""

from __future__ import annotations

import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from slimtune.errors import SlimtuneError, choices

ROOT_ENV = "SLIMTUNE_ROOT"


def project_root() -> Path:
    """Folder holding configs/, recipes/ and callbacks/: $SLIMTUNE_ROOT, else the checkout this package lives in."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).resolve()
    return Path(__file__).resolve().parents[2]


def recipe_names(root: Path | None = None) -> list[str]:
    return sorted(p.stem for p in ((root or project_root()) / "recipes").glob("*.yaml"))


def callback_preset_names(root: Path | None = None) -> list[str]:
    return sorted(p.stem for p in ((root or project_root()) / "callbacks").glob("*.yaml"))


def register_configs(root: Path | None = None) -> None:
    """Put recipes/*.yaml into Hydra's group `recipe` (package _global_) and callbacks/*.yaml into group `callbacks`.

    Hydra names a group after its folder; the recipes folder sits at the top level as `recipes/`, so its files are
    registered through the ConfigStore under the group name users type: `recipe=NAME`.
    """
    from hydra.core.config_store import ConfigStore

    root = root or project_root()
    store = ConfigStore.instance()
    for path in sorted((root / "recipes").glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_",
                    provider="slimtune")
    for path in sorted((root / "callbacks").glob("*.yaml")):
        store.store(group="callbacks", name=path.stem, node=OmegaConf.load(path), package="callbacks",
                    provider="slimtune")


def config_dir(root: Path | None = None) -> str:
    return str((root or project_root()) / "configs")


_MISSING = re.compile(r"Could not find '([^']+)'")
_OVERRIDE = re.compile(r"Could not override '([^']+)'")
_APPEND = re.compile(r"Could not append to config\. An item is already at '([^']+)'")
_NOT_IN_STRUCT = re.compile(r"Key '([^']+)' is not in struct")


def explain_compose_error(err: Exception, overrides: list[str], root: Path | None = None) -> str:
    """Turn Hydra's multi-line composition errors into one line naming the bad value and the valid ones."""
    text = str(err)
    missing = _MISSING.search(text)
    if missing:
        group, _, name = missing.group(1).rpartition("/")
        options = re.search(r"Available options in '[^']+':\n((?:\t.*\n?)*)", text)
        valid = [line.strip() for line in options.group(1).splitlines() if line.strip()] if options else []
        if group == "recipe":
            valid = recipe_names(root)
        return f"unknown {group or 'config'} {name!r}; valid: {choices(valid) if valid else '(none)'}"
    key = _OVERRIDE.search(text) or _NOT_IN_STRUCT.search(text)
    if key:
        full_key = key.group(1)
        parent, _, leaf = full_key.rpartition(".")
        valid = _valid_keys(parent, [o for o in overrides if not o.lstrip("+~").startswith(full_key)], root)
        where = f"under {parent!r}" if parent else "at the top level"
        return f"unknown config key {full_key!r}; valid keys {where}: {choices(valid)} (add a new key with +{full_key}=...)"
    if _APPEND.search(text):
        return f"{_APPEND.search(text).group(1)!r} already exists; override it without '+'"
    first = next((line for line in text.splitlines() if line.strip()), type(err).__name__)
    return first.strip()


def _valid_keys(parent: str, overrides: list[str], root: Path | None) -> list[str]:
    try:
        cfg = _compose(overrides, root)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return sorted(node.keys()) if isinstance(node, DictConfig) else []
    except Exception:  # noqa: BLE001 - only used to word an error message
        return []


def _compose(overrides: list[str], root: Path | None = None) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs(root)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(root), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def compose_config(overrides: list[str] | tuple[str, ...] = (), root: Path | None = None) -> DictConfig:
    """The composed config `python train.py OVERRIDES...` would run, or a one-line SlimtuneError."""
    try:
        return _compose(list(overrides), root)
    except SlimtuneError:
        raise
    except Exception as err:  # Hydra's ConfigCompositionException, MissingConfigException, OverrideParseException
        raise SlimtuneError(explain_compose_error(err, list(overrides), root)) from err
