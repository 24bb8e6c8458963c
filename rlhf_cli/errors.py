"""Errors caused by the user's input: printed as one line, no traceback, non-zero exit."""


class UserError(Exception):
    """A bad config, data file, checkpoint or environment; the message says how to fix it."""


class DataError(UserError):
    """The data cannot be read or has the wrong shape."""


class CheckpointError(UserError):
    """A checkpoint or run directory that cannot be resumed or would be overwritten."""


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss stayed non-finite)."""


class RewardError(UserError):
    """A reward function raised, or returned the wrong number of scores."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. `code` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
