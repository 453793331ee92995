"""User-facing errors.

A :class:`FerryError` is bad input the user can fix: the command line prints its message on
one line (no traceback unless ``--debug``) and exits with code 2. Its message names the
problem and the fix.
"""


class FerryError(Exception):
    """Bad input or an unusable environment; the message says what to change."""

    exit_code = 2
