"""User-facing errors: reported as one line, never as a traceback."""


class UserError(Exception):
    """A mistake the user can fix; the message names the fix."""
