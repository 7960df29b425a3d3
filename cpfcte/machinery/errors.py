"""One exception type for every bad input: the message names the file and the fix."""


class CpfcteError(Exception):
    """A user-facing error. The message says what is wrong, where (a file or a parameter), and
    what to do about it. The CLI prints it without a traceback."""
