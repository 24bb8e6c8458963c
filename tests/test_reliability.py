"""No lost runs, no lost files: what `rlhf merge` may replace, and where a resumed run writes.
Every case runs through the `rlhf` CLI, as a user would."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import adapter, max_diff, read_metrics, rlhf, train_in_process
from test_cli_errors import assert_one_line_error

TRAIN = ("stage=sft", "data.eval_size=0", "data.max_samples=64", "train.micro_batch_size=4")


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with the hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    """A 4-step SFT run with checkpoints at steps 2 and 4, in the default layout runs/sft/<time>."""
    root = tmp_path_factory.mktemp("rel")
    run = root / "runs" / "sft" / "2026-01-01_00-00-00"
    train_in_process(run, *TRAIN, "train.max_steps=4", "train.save_every=2", "train.keep_last=5")
    return run


def test_merge_replaces_only_a_model_it_wrote(run_a, tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    before = snapshot(run_a)
    proc = rlhf("merge", str(run_a), "out=.", "force=true", cwd=tmp_path)
    assert_one_line_error(proc, "current directory")
    proc = rlhf("merge", str(run_a), f"out={run_a}", "force=true", cwd=tmp_path)
    assert_one_line_error(proc, "name a new directory")
    proc = rlhf("merge", str(run_a), f"out={run_a / 'final'}", "force=true", cwd=tmp_path)
    assert_one_line_error(proc, "name a new directory")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("x")
    proc = rlhf("merge", str(run_a), f"out={other}", "force=true", cwd=tmp_path)
    assert_one_line_error(proc, "not a model directory")
    assert keep.read_text() == "mine" and (other / "a.txt").read_text() == "x"
    assert snapshot(run_a) == before
    # A model written by merge before is replaced with force=true.
    assert rlhf("merge", str(run_a), "out=merged", cwd=tmp_path).returncode == 0
    proc = rlhf("merge", str(run_a), "out=merged", "force=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "merged" / "config.json").is_file()


def test_resume_from_another_runs_checkpoint_forks_and_leaves_it_unchanged(run_a, tmp_path):
    before = snapshot(run_a)
    fork = tmp_path / "fork"
    checkpoint = run_a / "checkpoints" / "step-000002"
    proc = rlhf("train", *TRAIN, "train.max_steps=4", f"resume={checkpoint}", f"run_dir={fork}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert snapshot(run_a) == before  # the source run is untouched
    assert "4 (2 this run)" in proc.stdout + proc.stderr  # only steps 3 and 4 ran
    steps = [r["step"] for r in read_metrics(fork)]
    assert steps == [1, 2, 3, 4]  # the history up to the checkpoint came along
    full, forked = read_metrics(run_a), read_metrics(fork)
    assert [r["loss"] for r in forked] == pytest.approx([r["loss"] for r in full], abs=1e-6)
    assert max_diff(adapter(fork), adapter(run_a)) < 1e-6


def test_resume_auto_with_a_named_run_dir_never_continues_another_run(run_a, tmp_path):
    before = snapshot(run_a)
    named = run_a.parent / "my-run"
    proc = rlhf("train", *TRAIN, "train.max_steps=2", "resume=auto", f"run_dir={named}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "starting fresh" in proc.stdout + proc.stderr
    assert [r["step"] for r in read_metrics(named)] == [1, 2]
    assert snapshot(run_a) == before


def test_resuming_another_stages_run_is_refused(run_a, tmp_path):
    before = snapshot(run_a)
    proc = rlhf("train", "stage=dpo", f"resume={run_a}", f"run_dir={tmp_path / 'dpo'}")
    assert_one_line_error(proc, "stage=sft run", f"model.adapter={run_a}")
    assert snapshot(run_a) == before
