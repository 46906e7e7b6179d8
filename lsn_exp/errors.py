"""User-facing errors: reported as one line, never as a traceback."""

import sys


class UserError(Exception):
    """A mistake the user can fix; the message names the fix."""


def exit_with(message: str) -> None:
    """End the process with ``message`` as the one line ``lsn_exp: error: ...`` and exit status 2."""
    print(f"lsn_exp: error: {message}", file=sys.stderr)
    sys.exit(2)
