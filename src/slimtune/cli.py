"""`slimtune [recipe=NAME] [key=value ...]`: the Hydra entry of slimtune (the console script an install adds;
`python train.py` in a checkout calls the same `main`). See README.md.

Bad input (an unknown name, a bad value, a path that does not work) prints one `error: ...` line on stderr and exits 2,
before anything is written; most of it in about a second, before torch and Lightning load.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from slimtune.errors import EXIT_STATUS, SlimtuneError


def _fail(err: SlimtuneError) -> NoReturn:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(EXIT_STATUS)


def _plain_overrides(argv: list[str]) -> list[str] | None:
    """The key=value overrides, or None when Hydra's own flags (--help, --cfg, -m, ...) take the call over."""
    if any(arg.startswith("-") for arg in argv):
        return None
    return [arg for arg in argv if not arg.startswith("hydra.")]


def main(argv: list[str] | None = None) -> None:
    """Compose the config from `argv` (default: the command line), check it, and run it through Hydra."""
    import hydra
    from omegaconf import DictConfig

    from slimtune.config import check_config, compose_config, config_dir, expand_shorthands, register_configs
    from slimtune.run import run, set_offline_defaults

    args = expand_shorthands(sys.argv[1:] if argv is None else list(argv))
    sys.argv = [sys.argv[0], *args]  # Hydra reads the command line itself
    register_configs()
    set_offline_defaults()
    overrides = _plain_overrides(args)
    multirun = any(arg in ("-m", "--multirun") for arg in args)  # sweeps (a=1,2) compose only job by job
    try:
        if not multirun:
            check = overrides if overrides is not None else [a for a in args if "=" in a and not a.startswith(("-", "hydra."))]
            cfg = compose_config(check)  # unknown recipe/group/key -> one line, before Hydra's multi-line report
            if overrides is not None:
                check_config(cfg)  # bad values, paths, data files, model source: one line before torch loads
    except SlimtuneError as err:
        _fail(err)

    @hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
    def _run(cfg: DictConfig) -> None:
        try:
            run(cfg)
        except SlimtuneError as err:
            _fail(err)

    _run()


if __name__ == "__main__":
    main()
