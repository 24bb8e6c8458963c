"""Keeping libraries quiet: their log levels and warnings, and native stderr."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings


def quiet_libraries() -> None:
    """Keep the libraries' progress bars and known-harmless warnings out of the run's output."""
    # bitsandbytes looks for an optional hub-hosted CPU kernel and warns when it is absent; its
    # own CPU kernels are used instead.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@contextlib.contextmanager
def native_stderr_silenced():
    """File descriptor 2 to /dev/null for the block (what C++ libraries print there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
