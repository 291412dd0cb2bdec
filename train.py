"""python train.py [recipe=NAME] [key=value ...] — the Hydra entry of slimtune (see README.md).

Bad input (an unknown name, a bad value, a path that does not work) prints one `error: ...` line on stderr and exits 2,
before anything is written; most of it in about a second, before torch and Lightning load.
"""

import sys
from typing import NoReturn

import hydra
from omegaconf import DictConfig

from slimtune.config import check_config, compose_config, config_dir, register_configs
from slimtune.errors import EXIT_STATUS, SlimtuneError
from slimtune.run import run, set_offline_defaults

register_configs()


def _fail(err: SlimtuneError) -> NoReturn:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(EXIT_STATUS)


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except SlimtuneError as err:
        _fail(err)


def _plain_overrides(argv: list[str]) -> list[str] | None:
    """The key=value overrides, or None when Hydra's own flags (--help, --cfg, -m, ...) take the call over."""
    if any(arg.startswith("-") for arg in argv):
        return None
    return [arg for arg in argv if not arg.startswith("hydra.")]


if __name__ == "__main__":
    set_offline_defaults()
    overrides = _plain_overrides(sys.argv[1:])
    check = overrides if overrides is not None else [a for a in sys.argv[1:] if "=" in a and not a.startswith(("-", "hydra."))]
    multirun = any(arg in ("-m", "--multirun") for arg in sys.argv[1:])  # sweeps (a=1,2) compose only job by job
    try:
        if not multirun:
            cfg = compose_config(check)  # unknown recipe/group/key -> one line, before Hydra's multi-line report
            if overrides is not None:
                check_config(cfg)  # bad values, paths, data files, model source: one line before torch loads
    except SlimtuneError as err:
        _fail(err)
    main()
