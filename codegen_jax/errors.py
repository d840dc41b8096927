"""User-facing error type: the CLI turns it into one stderr line and exit code 2."""


class UserError(Exception):
    """Bad input from the user (config, path, file contents). Never a bug in our code."""
