"""User mistakes on the command line: one line on stderr naming the key, a non-zero exit, no
traceback, and nothing written; plus the help texts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import FAST, rlhf, train_in_process

from rlhf_cli.config import GROUP_SCHEMAS, SftConfig, config_dir
from rlhf_cli.core.errors import EXIT_USER_ERROR

GROUPS = ("stage", "model", "data", "peft", "quant", "optim")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def assert_one_line_error(proc, *needles: str) -> str:
    """The process failed as a user error should; returns its one error line."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("error:"), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


BAD_CONFIGS = [
    # typo'd keys
    (["stage.betaa=1"], ["stage.betaa"]),
    (["train.max_stepz=3"], ["train.max_stepz"]),
    # wrong type
    (["train.max_steps=abc"], ["train.max_steps", "abc"]),
    # impossible values
    (["optim.lr=0"], ["optim.lr"]),
    (["optim.lr=-1"], ["optim.lr", "-1"]),
    (["peft.r=0"], ["peft.r"]),
    (
        ["data.max_length=64", "data.max_prompt_length=128"],
        ["data.max_length", "max_prompt_length"],
    ),
    (["train.grad_accum=0"], ["train.grad_accum"]),
    (["optim.betas=[0.9]"], ["optim.betas"]),
    (["quant.mode=nf5"], ["quant.mode", "nf5", "nf4"]),
    # the 4-bit default cannot be fully fine-tuned
    (["peft=full"], ["peft=full", "quant=none"]),
]


@pytest.mark.parametrize(
    ("overrides", "needles"), BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS]
)
def test_bad_config_is_one_line_naming_the_key(tmp_path, overrides, needles):
    proc = rlhf("train", *overrides, cwd=tmp_path)
    assert_one_line_error(proc, *needles)
    assert proc.returncode == EXIT_USER_ERROR
    assert list(tmp_path.iterdir()) == []  # nothing started, no runs/


@pytest.mark.parametrize("group", ["stage", "model"])
def test_unknown_group_option_lists_the_options(tmp_path, group):
    proc = rlhf("train", f"{group}=nope", cwd=tmp_path)
    line = assert_one_line_error(proc, f"{group}=nope")
    available = options(group)
    assert available  # the check below must not pass on an empty list
    for option in available:
        assert option in line
    assert list(tmp_path.iterdir()) == []


def test_unknown_cli_option(tmp_path):
    proc = rlhf("train", "--foo", cwd=tmp_path)
    assert_one_line_error(proc, "--foo")
    assert list(tmp_path.iterdir()) == []


def test_unknown_command(tmp_path):
    proc = rlhf("frobnicate", cwd=tmp_path)
    assert_one_line_error(proc, "frobnicate", "train")
    assert list(tmp_path.iterdir()) == []


def test_multirun_with_one_bad_value_fails_before_any_job(tmp_path):
    proc = rlhf("train", "-m", "optim.lr=1e-3,-1", *FAST, cwd=tmp_path)
    assert_one_line_error(proc, "optim.lr", "-1")
    assert not (tmp_path / "runs").exists()
    assert list(tmp_path.iterdir()) == []


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# The smallest run that leaves a checkpoint behind.
TINY_RUN = (
    "train.max_steps=1",
    "train.micro_batch_size=2",
    "data.max_samples=8",
    "data.eval_size=0",
    "quant=none",
)


@pytest.mark.slow
def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    run_dir = tmp_path / "run"
    train_in_process(run_dir, *TINY_RUN)
    before = _snapshot(run_dir)
    assert any(k.startswith("checkpoints/step-") for k in before)
    dirs_before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))

    proc = rlhf("train", f"run_dir={run_dir}", *TINY_RUN, cwd=tmp_path)
    assert_one_line_error(proc, "resume=auto", str(run_dir))

    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == dirs_before
    after = _snapshot(run_dir)
    assert after.keys() == before.keys()
    changed = [k for k in before if before[k] != after[k]]
    assert changed == []
    assert not (tmp_path / "runs").exists()


def test_top_level_help(tmp_path):
    proc = rlhf("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout
    assert "rlhf train --help" in proc.stdout  # where the groups and keys are listed
    assert list(tmp_path.iterdir()) == []


def test_train_help_lists_groups_options_and_keys(tmp_path):
    proc = rlhf("train", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for group in GROUPS:
        row = next((ln for ln in lines if ln.split()[:1] == [group]), None)
        assert row is not None, f"group {group} not listed"
        for option in options(group):
            assert option in row, f"{group}={option} not listed"
    keys = {ln.split(" = ", 1)[0].strip() for ln in lines if " = " in ln}
    expected = {"device", "run_dir", "resume"}
    for group, cls in GROUP_SCHEMAS.items():
        for f in dataclasses.fields(cls):
            nested = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(nested):
                expected |= {f"{group}.{f.name}.{g.name}" for g in dataclasses.fields(nested)}
            else:
                expected.add(f"{group}.{f.name}")
    for f in dataclasses.fields(SftConfig):
        if f.name != "name":
            expected.add(f"stage.(sft) {f.name}")
    assert "optim.lr" in expected and "data.columns.prompt" in expected
    missing = sorted(expected - keys)
    assert missing == []
    # every key line carries its description
    for ln in lines:
        if " = " in ln:
            assert ln.split(": ", 1)[1:] and ln.split(": ", 1)[1].strip(), ln
    assert list(tmp_path.iterdir()) == []


LIBRARY_LOGS = """
import logging, warnings
from rlhf_cli import cli
cli.main(["--version"])
logging.getLogger("kernels._internals.hf_hub").warning(
    "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because "
    "Hugging Face Hub is in offline mode."
)
warnings.warn("a library's deprecation", UserWarning)
logging.getLogger("somelib").error("the library failed")
"""


def test_library_warnings_stay_out_of_the_error_channel(tmp_path):
    """What libraries log below ERROR (kernels' offline note, printed on every command that
    loads bitsandbytes on a CPU with AVX-512 bf16) and Python warnings never reach the user's
    stderr; a library's errors do, named; RLHF_LIBRARY_LOG=warning shows the rest."""
    import os
    import subprocess
    import sys

    def run(**env) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", LIBRARY_LOGS],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            cwd=tmp_path,
            timeout=120,
        )

    quiet = run()
    assert quiet.returncode == 0 and quiet.stdout.startswith("rlhf-cli ")
    assert quiet.stderr == "somelib: ERROR: the library failed\n"
    loud = run(RLHF_LIBRARY_LOG="warning").stderr
    assert "kernels._internals.hf_hub: WARNING: Skipping publisher trust check" in loud
    assert "py.warnings: WARNING:" in loud and "a library's deprecation" in loud
    assert_one_line_error(run(RLHF_LIBRARY_LOG="loud"), "RLHF_LIBRARY_LOG=loud", "warning")
