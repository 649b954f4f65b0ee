"""Errors that mean "the user asked for something we cannot do": the CLI prints them
as one line and exits with code 2 (no traceback). Everything else is a bug and keeps
its traceback."""


class FastdenseError(ValueError):
    """Bad input: the message names the bad value and what is allowed."""


def one_line(err: BaseException) -> str:
    """An exception as one line of at most 300 characters (its type name when it has no message)."""
    text = " ".join(str(err).split())
    return text[:300] if text else type(err).__name__
