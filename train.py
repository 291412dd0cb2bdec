"""python train.py [recipe=NAME] [key=value ...] — the Hydra entry of slimtune (see README.md)."""

import sys

import hydra
from omegaconf import DictConfig

from slimtune.config import compose_config, config_dir, register_configs
from slimtune.errors import SlimtuneError
from slimtune.run import run, set_offline_defaults

register_configs()


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except SlimtuneError as err:
        sys.exit(f"error: {err}")


def _plain_overrides(argv: list[str]) -> list[str] | None:
    """The key=value overrides, or None when Hydra's own flags (--help, --cfg, -m, ...) take the call over."""
    if any(arg.startswith("-") for arg in argv):
        return None
    return [arg for arg in argv if not arg.startswith("hydra.")]


if __name__ == "__main__":
    set_offline_defaults()
    overrides = _plain_overrides(sys.argv[1:])
    check = overrides if overrides is not None else [a for a in sys.argv[1:] if "=" in a and not a.startswith(("-", "hydra."))]
    try:
        compose_config(check)  # unknown recipe/group/key -> one line, before Hydra prints its multi-line report
    except SlimtuneError as err:
        sys.exit(f"error: {err}")
    main()
