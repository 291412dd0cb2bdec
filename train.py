"""python train.py [recipe=NAME] [key=value ...] — the Hydra entry of slimtune in a checkout (see README.md); an
install adds the same command as `slimtune` (`slimtune.cli.main`).

Bad input (an unknown name, a bad value, a path that does not work) prints one `error: ...` line on stderr and exits 2,
before anything is written; most of it in about a second, before torch and Lightning load.
"""

from slimtune.cli import main

if __name__ == "__main__":
    main()
