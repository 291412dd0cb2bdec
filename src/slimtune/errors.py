"""One error type for bad input: the run prints its message as a single line and exits 2."""


class SlimtuneError(ValueError):
    """Bad user input (config value, path, data). The message is one line naming the bad value and what is valid."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def choices(valid) -> str:
    return ", ".join(str(v) for v in valid)
