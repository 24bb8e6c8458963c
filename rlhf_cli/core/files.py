"""Files written whole: temporary directories beside their destination."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def temp_dir(parent: Path, name: str) -> Path:
    """A fresh `.tmp-<name>-*` directory in `parent` with the permissions the user's umask
    gives a new directory (mkdtemp makes it 0700: a checkpoint renamed from it would be
    unreadable to the user's group)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp
