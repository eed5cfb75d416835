"""User errors of the command line: reported as one line and a non-zero exit, never a traceback."""


class CliError(Exception):
    """A user error a command reports in one line (bad path, unreachable server, empty folder)."""
