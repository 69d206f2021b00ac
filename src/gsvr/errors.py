"""Errors a user can act on. The CLI prints them as one line (no traceback unless --debug)."""


class GsvrError(Exception):
    """Bad input or an unusable configuration; the message names the file and the problem."""
