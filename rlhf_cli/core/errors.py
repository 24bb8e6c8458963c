"""Errors caused by the user's input: printed as one line, no traceback, non-zero exit.

The CLI's one guard (`guarded`) turns a UserError anywhere below it into that line and exit 2,
and an Interrupted (a signal, after its checkpoint) into its exit status; any other exception
is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

EXIT_USER_ERROR = 2


LIBRARY_LOG_ENV = "RLHF_LIBRARY_LOG"  # the level of library log records shown: error (default)


def first_line(err: BaseException, empty: str | None = None) -> str:
    """An exception's message as one line: its first non-empty line; `empty` (default: the
    exception's type name) when it has none."""
    text = str(err).strip()
    if not text:
        return type(err).__name__ if empty is None else empty
    return text.splitlines()[0]


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
    from rich.markup import escape

    from rlhf_cli.core.progress import console

    # The message is plain text: brackets in it are not markup, `:name:` is not an emoji.
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, emoji=False)
    sys.exit(code)


def guarded(call: Callable[[], Any]) -> Any:
    """Run a command: a UserError becomes one line and exit 2; Interrupted its message and
    exit status."""
    try:
        return call()
    except UserError as err:
        fail(str(err))
    except Interrupted as stop:
        from rlhf_cli.core.progress import console

        console.print(f"[yellow]{stop}[/]")
        sys.exit(stop.code)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, without a new checkpoint
        fail("interrupted (a second Ctrl-C): nothing saved since the last checkpoint", 130)


def route_library_logs() -> None:
    """Keep the libraries' log records (and Python warnings) out of the user's error channel.

    Libraries log through Python's logging; with no handler set up, Python's last-resort handler
    writes their warnings to stderr between the tool's own lines (e.g. kernels' "Skipping
    publisher trust check ... offline mode" on every command that loads bitsandbytes offline).
    One handler on the root logger takes them instead: errors still reach stderr, named by
    their logger; warnings and below are dropped, unless RLHF_LIBRARY_LOG=warning (or info,
    debug) asks for them. Python's warnings go the same way (as py.warnings warnings)."""
    name = os.environ.get(LIBRARY_LOG_ENV, "error").upper()
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        fail(f"{LIBRARY_LOG_ENV}={name.lower()}: choose one of debug, info, warning, error")
    root = logging.getLogger()
    if any(getattr(h, "rlhf_cli", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.rlhf_cli = True  # type: ignore[attr-defined]
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(min(level, logging.WARNING))
    logging.captureWarnings(True)
