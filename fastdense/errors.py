"""Errors that mean "the user asked for something we cannot do": the CLI prints them
as one line and exits with code 2 (no traceback). Everything else is a bug and keeps
its traceback."""


class FastdenseError(ValueError):
    """Bad input: the message names the bad value and what is allowed."""
