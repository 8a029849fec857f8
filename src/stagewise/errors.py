"""The one exception type for bad user input (plan, data file, checkpoint, CLI argument).

The CLI prints `str(error)` as a single line and exits 2; everything else is a bug and keeps its
traceback.
"""


class UserError(ValueError):
    """Bad input named by where it is: `file: key.path: what is wrong`."""

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)


class RunStopped(Exception):
    """The run stopped on purpose or could not go on (a signal, a full disk); the message says what
    was saved and how to continue. The CLI prints it as one line and exits with `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        self.code = code
        super().__init__(message)
