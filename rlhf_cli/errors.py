"""Errors caused by the user's input: printed as one line, no traceback, non-zero exit.

The CLI's one guard (`guarded`) turns a UserError anywhere below it into that line and exit 2,
and an Interrupted (a signal, after its checkpoint) into its exit status; any other exception
is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn

EXIT_USER_ERROR = 2


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


def fail(message: str, code: int = EXIT_USER_ERROR) -> NoReturn:
    """Print `message` as one error line and exit with `code`."""
    from rlhf_cli.progress import console

    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    sys.exit(code)


def guarded(call: Callable[[], Any]) -> Any:
    """Run a command: a UserError becomes one line and exit 2; Interrupted its message and
    exit status."""
    try:
        return call()
    except UserError as err:
        fail(str(err))
    except Interrupted as stop:
        from rlhf_cli.progress import console

        console.print(f"[yellow]{stop}[/]")
        sys.exit(stop.code)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, without a new checkpoint
        fail("interrupted (a second Ctrl-C): nothing saved since the last checkpoint", 130)
