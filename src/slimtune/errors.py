"""One error type for bad input: `python train.py` prints its message as one `error: ...` line on stderr and exits 2."""

EXIT_STATUS = 2  # bad input (as argparse and most Unix tools); 1 stays for crashes, 0 for a finished run


class SlimtuneError(ValueError):
    """Bad user input (config value, path, data). The message is one line naming the bad value and what is valid."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def choices(valid) -> str:
    return ", ".join(str(v) for v in valid)
