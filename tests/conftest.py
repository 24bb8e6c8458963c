"""Shared test setup: offline hub, a per-session cache for the tiny model, in-process runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# A missing hub file fails at once instead of after ~50 s of retries.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("RLHF_CLI_CACHE", tempfile.mkdtemp(prefix="rlhf-cli-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
RLHF = [sys.executable, "-m", "rlhf_cli"]


def compose(*overrides: str):
    """The validated Config for these overrides (exits like the CLI on a bad one)."""
    from rlhf_cli.cli import compose_checked

    return compose_checked(list(overrides))


def train_in_process(run_dir: Path, *overrides: str) -> dict:
    """Run `rlhf train` in this process (no Hydra output dir); returns the summary rows."""
    from omegaconf import OmegaConf

    from rlhf_cli.train import run

    cfg = compose(f"run_dir={run_dir}", *overrides)
    return run(cfg, OmegaConf.to_yaml(OmegaConf.structured(cfg)), Path(run_dir))


def rlhf(
    *args: str, cwd: Path | None = None, timeout: int = 300, **kw
) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, as a user runs it."""
    return subprocess.run(
        [*RLHF, *args], cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, **kw
    )


def read_metrics(run_dir: Path, split: str = "train") -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def stopped_copy(full: Path, dst: Path, last_step: int) -> Path:
    """A copy of a finished run as it was when it stopped after its last_step checkpoint: later
    checkpoints and final/ removed, so that resume=auto continues from last_step."""
    shutil.copytree(full, dst)
    for ckpt in (dst / "checkpoints").iterdir():
        if ckpt.name.startswith("step-") and int(ckpt.name.split("-")[1]) > last_step:
            shutil.rmtree(ckpt)
    shutil.rmtree(dst / "final")
    return dst


# Small, fast settings for runs in tests.
FAST = ("train.max_steps=4", "train.micro_batch_size=4", "data.max_samples=64", "data.eval_size=0")


@pytest.fixture
def fast():
    return FAST
