"""The one exception type users see: its message is a single line naming the problem.

Everything that can go wrong because of what the user gave us (a file, a flag, a prompt) raises
`NumbaAprError`; the CLI prints `error: <message>` and exits non-zero, with no traceback.
"""


class NumbaAprError(Exception):
    """A user-facing error: bad file, unsupported model or tensor type, bad argument."""


class UnsupportedError(NumbaAprError):
    """The file is a valid GGUF, but uses an architecture or tensor type we do not implement."""
