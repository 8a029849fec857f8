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
