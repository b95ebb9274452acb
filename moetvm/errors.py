"""The project's one error root. Every mistake a user can make (bad input, bad artifact, bad
option, unreachable board) raises a subclass of `MoetvmError` with a one-line message naming the
problem; the CLI turns any of them into that line and exit code 1 in one place, so a new error
class cannot escape as a traceback. Standard library only: it ships to boards."""


class MoetvmError(Exception):
    """A problem the user can fix; the message says what and where, in one line."""


class UsageError(MoetvmError, ValueError):
    """An option or argument that cannot work (checked before any work starts)."""


def one_line(text) -> str:
    """`text` with every run of whitespace, newlines included, made one space: how an error
    travels (a CLI line, an RPC reply)."""
    return " ".join(str(text).split())
