"""The one error type users see.

Anything wrong with what the user gave us (config, files, paths) raises `UsageError` with a one-line
message naming the culprit; the CLI prints it as `hpcprune: error: ...` and exits with status 2.
Everything else is a bug and keeps its traceback.
"""


class UsageError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""

    exit_code = 2
