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

# Under pytest-xdist (make test runs 2 workers) the workers share the cores: one thread each,
# for their subprocesses too, instead of each running a pool as wide as the machine.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# A missing hub file fails at once instead of after ~50 s of retries.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
_USER_CACHE = Path(os.environ.get("RLHF_CLI_CACHE", Path.home() / ".cache" / "rlhf_cli"))
os.environ.setdefault("RLHF_CLI_CACHE", tempfile.mkdtemp(prefix="rlhf-cli-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent

# End to end: these modules train, sample, merge and resume whole runs, load the real model or
# vLLM, or launch torchrun. `make test` runs everything; `make test-fast` (-m "not slow") leaves
# them out, with the single tests elsewhere marked @pytest.mark.slow (those over ~3 s).
END_TO_END = {
    "test_bad_inputs",
    "test_demo",
    "test_distributed",
    "test_online",
    "test_packaging",
    "test_real_model",
    "test_reliability",
    "test_rs",
    "test_stages",
    "test_training",
    "test_vllm",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__ in END_TO_END:
            item.add_marker(pytest.mark.slow)


def _link_real_models() -> None:
    """The per-session cache builds the tiny model afresh; the real models' offline copies
    (`rlhf fetch-model`, run by `make install`) are linked in from the user's cache."""
    from rlhf_cli.model.real import OFFLINE

    cache = Path(os.environ["RLHF_CLI_CACHE"])
    for copy in OFFLINE.values():
        source, link = _USER_CACHE / copy.name, cache / copy.name
        if source.is_dir() and source != link and not link.exists():
            cache.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source)


_link_real_models()
RLHF = [sys.executable, "-m", "rlhf_cli"]


def compose(*overrides: str):
    """The validated Config for these overrides (exits like the CLI on a bad one)."""
    from rlhf_cli.compose import compose_checked

    return compose_checked(list(overrides))


def train_in_process(run_dir: Path, *overrides: str) -> dict:
    """Run `rlhf train` in this process (no Hydra output dir); returns the summary rows."""
    from omegaconf import OmegaConf

    from rlhf_cli.train import run

    cfg = compose(f"run_dir={run_dir}", *overrides)
    return run(cfg, OmegaConf.to_yaml(OmegaConf.structured(cfg)), Path(run_dir))


def rlhf(
    *args: str, cwd: Path | None = None, timeout: int = 300, script: bool = False, **kw
) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, as a user runs it (`script`: the installed `rlhf` console
    script instead of `python -m rlhf_cli`)."""
    command = [str(Path(sys.executable).parent / "rlhf")] if script else RLHF
    return subprocess.run(
        [*command, *args], cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, **kw
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


def adapter(run_dir: Path, sub: str = "final", name: str = "adapter_model.safetensors") -> dict:
    """The tensors of a run's saved adapter (or of another safetensors file beside it)."""
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / sub / name))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def assert_resume_equals(
    tmp_path: Path, args: tuple, last_step: int, keys=("loss",), files=()
) -> tuple[list[dict], list[dict]]:
    """Train `args` to the end; copy the run as it was after its last_step checkpoint and
    resume it: the resumed run's metrics (`keys`), adapter and extra saved `files` (e.g. a
    reward head) equal the uninterrupted run's. Returns both runs' metrics."""
    done = train_in_process(tmp_path / "full", *args)
    stopped_copy(tmp_path / "full", tmp_path / "resumed", last_step=last_step)
    rows = train_in_process(tmp_path / "resumed", *args, "resume=auto")
    # Only the steps after the checkpoint ran (a silent restart from step 0 would give the
    # same numbers: training is deterministic).
    total = int(done["steps"].split()[0])
    assert rows["steps"] == f"{total} ({total - last_step} this run)", rows["steps"]
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    for key in keys:
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in full], abs=1e-6), key
    for name in ("adapter_model.safetensors", *files):
        runs = (adapter(tmp_path / d, name=name) for d in ("full", "resumed"))
        assert max_diff(*runs) < 1e-6, name
    return full, resumed


# Small, fast settings for runs in tests.
FAST = ("train.max_steps=4", "train.micro_batch_size=4", "data.max_samples=64", "data.eval_size=0")


@pytest.fixture
def fast():
    return FAST
