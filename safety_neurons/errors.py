"""User-facing errors: one line that names the problem and the fix; the CLI exits non-zero."""


class UserError(Exception):
    """Bad input or missing prerequisite. Printed as one line by the CLI, exit status 2."""
