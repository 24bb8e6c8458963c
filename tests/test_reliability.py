"""No lost runs, no lost files: what `rlhf merge` may replace, and where a resumed run writes.
Every case runs through the `rlhf` CLI, as a user would."""

from __future__ import annotations

import hashlib
import shutil
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


def assert_stops_with(proc, *needles: str) -> str:
    """Exit 2, no traceback, one error line (after the progress lines of what loaded)."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-2000:]
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def test_resuming_with_a_changed_config_is_refused_unless_forced(run_a, tmp_path):
    """optim.lr changed: refused (nothing written); with resume_force=true the new lr is
    used from the checkpoint on (half the lr: half the logged lr at steps 3 and 4)."""
    run = copy_run(run_a, tmp_path / "run")
    (run / "final").rename(tmp_path / "final-of-run")
    shutil.rmtree(run / "checkpoints" / "step-000004")  # resume=auto: from step 2
    before = snapshot(run)
    args = (*TRAIN, "train.max_steps=4", f"run_dir={run}", "resume=auto")
    proc = rlhf("train", *args, "optim.lr=1e-4")
    assert_one_line_error(proc, "optim.lr: 0.0002 -> 0.0001", "resume_force=true")
    assert snapshot(run) == before
    proc = rlhf("train", *args, "optim.lr=1e-4", "resume_force=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4 (2 this run)" in proc.stdout + proc.stderr
    full, forced = read_metrics(run_a), read_metrics(run)
    assert [r["lr"] for r in forced[:2]] == [r["lr"] for r in full[:2]]
    assert [r["lr"] for r in forced[2:]] == pytest.approx([r["lr"] / 2 for r in full[2:]])


def test_resuming_on_other_data_or_another_model_is_refused(tmp_path):
    """The checkpoint's fingerprint: the same number of rows with other contents, or a model
    at the same path whose weights changed, are refused; resume_force=true goes on."""
    import json

    from safetensors.torch import load_file, save_file

    from rlhf_cli.model.tiny import tiny_model_dir

    model = shutil.copytree(tiny_model_dir(), tmp_path / "model")
    rows = [{"prompt": f"Say {i}.", "completion": f"{i} {i}."} for i in range(16)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    args = (
        "stage=sft",
        f"model.name_or_path={model}",
        f"data.path={data}",
        "data.eval_size=0",
        "train.micro_batch_size=4",
        "train.max_steps=2",
        "train.save_every=1",
        f"run_dir={run}",
    )
    assert rlhf("train", *args).returncode == 0
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step-000002")
    rows[3]["completion"] = "three"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = snapshot(run)
    proc = rlhf("train", *args, "resume=auto")
    assert_stops_with(proc, "the training data differ (16 -> 16 examples, same count")
    assert snapshot(run) == before
    rows[3]["completion"] = "3 3."
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    weights = next(model.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(k for k in tensors if "layers.0.self_attn.q_proj" in k)
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights, metadata={"format": "pt"})
    proc = rlhf("train", *args, "resume=auto")
    assert_stops_with(proc, "the model's weights differ")
    assert snapshot(run) == before
    proc = rlhf("train", *args, "resume=auto", "resume_force=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 (1 this run)" in proc.stdout + proc.stderr


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(run_a, tmp_path):
    """step-4's adapter cut short: resume=auto says so and resumes from step 2 (steps 3-6
    run); leftover temporary directories of a killed save are removed."""
    import shutil

    run = copy_run(run_a, tmp_path / "run")
    shutil.rmtree(run / "final")
    weights = run / "checkpoints" / "step-000004" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    leftover = run / "checkpoints" / ".tmp-step-000006-x1y2"
    leftover.mkdir()
    (leftover / "trainer_state.pt").write_bytes(b"half")
    proc = rlhf("train", *TRAIN, "train.max_steps=6", f"run_dir={run}", "resume=auto")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    assert "step-000004 is damaged (adapter_model.safetensors is incomplete)" in out
    assert "6 (4 this run)" in out
    assert not leftover.exists() and "left by an interrupted save" in out
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    # Resuming from the damaged checkpoint by name is one line.
    state = run / "checkpoints" / "step-000006" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    proc = rlhf(
        "train", *TRAIN, "train.max_steps=8", f"run_dir={tmp_path / 'b'}", f"resume={state.parent}"
    )
    assert_one_line_error(proc, "the checkpoint is damaged")


def test_a_second_process_on_the_same_run_dir_is_refused(tmp_path):
    from rlhf_cli.trainer.checkpoint import RunLock

    run = tmp_path / "run"
    with RunLock(run):
        proc = rlhf("train", *TRAIN, "train.max_steps=1", f"run_dir={run}")
    assert_one_line_error(proc, f"{run} is being written by another rlhf process")
    assert not (run / "checkpoints").exists()
    assert rlhf("train", *TRAIN, "train.max_steps=1", f"run_dir={run}").returncode == 0


def test_outputs_follow_the_users_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o002)
    try:
        run = tmp_path / "run"
        assert rlhf("train", *TRAIN, "train.max_steps=1", f"run_dir={run}").returncode == 0
        assert rlhf("merge", str(run), f"out={tmp_path / 'merged'}").returncode == 0
    finally:
        os.umask(old)
    for d in (run / "final", run / "checkpoints" / "step-000001", tmp_path / "merged"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o775, d


def test_an_exception_during_a_checkpoint_write_leaves_the_previous_ones_whole(
    tmp_path, monkeypatch
):
    """torch.save raises while step 2 is written: step 1 stays whole and loadable, no
    temporary directory is left, and resume=auto continues from step 1."""
    import torch

    from rlhf_cli.trainer import checkpoint

    real_save, calls = torch.save, []

    def flaky(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", flaky)
    run = tmp_path / "run"
    with pytest.raises(checkpoint.CheckpointError, match="step-000002: disk full"):
        train_in_process(run, *TRAIN, "train.max_steps=3", "train.save_every=1")
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step-000001"]
    assert checkpoint.damage(run / "checkpoints" / "step-000001") is None
    assert not list((run / "checkpoints").glob(".tmp-*"))
    rows = train_in_process(run, *TRAIN, "train.max_steps=3", "train.save_every=1", "resume=auto")
    assert rows["steps"] == "3 (2 this run)"


def test_a_failed_checkpoint_write_is_one_line_and_the_run_resumes(tmp_path):
    """A file-size limit (ulimit -f, as a full disk) makes the step-4 checkpoint fail to write
    (its adapter file, 266 KB, is over 100 KB): one line naming the checkpoint and the cause,
    exit 2, no traceback, no half-written checkpoint; step 2 is whole and resume=auto, without
    the limit, runs steps 3-4 only and ends where an uninterrupted run ends."""
    import resource
    import subprocess

    from conftest import REPO, RLHF, stopped_copy

    args = (*TRAIN, "train.max_steps=4", "train.save_every=2")
    train_in_process(tmp_path / "full", *args)
    run = stopped_copy(tmp_path / "full", tmp_path / "run", last_step=2)
    before = snapshot(run / "checkpoints")

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    proc = subprocess.run(
        [*RLHF, "train", *args, f"run_dir={run}", "resume=auto"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not write the checkpoint {run}/checkpoints/step-000004: ")
    assert "File too large" in last and "files limited to 100,000 bytes" in last
    assert sum("error" in line for line in proc.stderr.splitlines()) == 1
    assert snapshot(run / "checkpoints") == before  # step 2 as it was, nothing beside it
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]
    rows = train_in_process(run, *args, "resume=auto")
    assert rows["steps"] == "4 (2 this run)"
    assert max_diff(adapter(run), adapter(tmp_path / "full")) < 1e-6


def test_saved_configs_never_turn_on_remote_code(run_a, tmp_path):
    """A run's config.yaml that says trust_remote_code: true is read as false; only the
    command line allows it."""
    from rlhf_cli.config import allow_remote_code, load_saved_config

    path = tmp_path / "config.yaml"
    text = (run_a / "config.yaml").read_text()
    assert "trust_remote_code: false" in text
    path.write_text(text.replace("trust_remote_code: false", "trust_remote_code: true"))
    assert load_saved_config(path).model.trust_remote_code is False
    allow_remote_code(True)
    try:
        assert load_saved_config(path).model.trust_remote_code is True
    finally:
        allow_remote_code(False)


def test_a_run_config_with_an_unknown_key_is_one_line(run_a, tmp_path):
    run = copy_run(run_a, tmp_path / "run")
    config = run / "final" / "config.yaml"
    config.write_text(config.read_text() + "\nsurprise: 1\n")
    proc = rlhf("sample", str(run), "prompt=Hi", "max_new_tokens=2")
    assert_one_line_error(proc, "not a config this version of rlhf-cli can read", "surprise")


# --------------------------------------------------------------------------- signals


@pytest.fixture
def stopper(tmp_path, monkeypatch):
    """A reward function (stopper:score) that sends this process SIGINT on its Nth call."""
    import sys

    from test_rs import STOPPER

    (tmp_path / "stopper.py").write_text(STOPPER)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("stopper", None)

    def args(log: str, stop_at: int) -> tuple:
        return (
            "stage=grpo",
            "reward.fn=stopper:score",
            f"+reward.kwargs.log={tmp_path / log}",
            f"+reward.kwargs.stop_at={stop_at}",
            "stage.rollout_batch_size=2",
            "stage.max_new_tokens=8",
            "train.max_steps=3",
            "train.save_every=0",
            "quant=none",
        )

    return args


def calls(log: Path) -> int:
    return len(log.read_text().splitlines())


def test_a_signal_during_the_rollouts_saves_the_step_start(tmp_path, stopper, monkeypatch, capfd):
    """SIGINT while step 2 scores its rollouts: a checkpoint at step 1 (the state before step
    2's sampling), saved although a second Ctrl-C arrives during the save; the resume samples
    steps 2 and 3 once each and ends where an uninterrupted run ends."""
    import os
    import signal

    from rlhf_cli.core.errors import Interrupted
    from rlhf_cli.trainer import checkpoint

    train_in_process(tmp_path / "full", *stopper("full.log", 0), "data.eval_size=0")
    real_save = checkpoint.save_checkpoint

    def save_with_a_second_ctrl_c(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(*a, **k)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_with_a_second_ctrl_c)
    with pytest.raises(Interrupted, match="SIGINT: stopped at step 1/3"):
        train_in_process(tmp_path / "run", *stopper("run.log", 2), "data.eval_size=0")
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert "Ctrl-C: finishing the checkpoint first" in capfd.readouterr().err
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "run")] == ["step-000001"]
    assert checkpoint.damage(tmp_path / "run" / "checkpoints" / "step-000001") is None
    assert calls(tmp_path / "run.log") == 2
    train_in_process(tmp_path / "run", *stopper("run.log", 2), "data.eval_size=0", "resume=auto")
    assert calls(tmp_path / "run.log") == 4  # steps 2 and 3
    full, run = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "run")
    assert [r["step"] for r in run] == [1, 2, 3]
    assert [r["loss"] for r in run] == pytest.approx([r["loss"] for r in full], abs=1e-6)
    assert max_diff(adapter(tmp_path / "full"), adapter(tmp_path / "run")) < 1e-6


def test_a_signal_during_an_evaluation_stops_it_and_saves(tmp_path, stopper):
    """4 held-out prompts, 2 a batch: SIGINT during the step-1 evaluation's first batch; the
    second batch is not sampled, no eval row is written, the checkpoint is at step 1."""
    from rlhf_cli.core.errors import Interrupted
    from rlhf_cli.trainer import checkpoint

    args = (*stopper("run.log", 2), "data.eval_size=4", "train.eval_every=1")
    with pytest.raises(Interrupted, match="SIGINT: stopped at step 1/3"):
        train_in_process(tmp_path / "run", *args)
    assert calls(tmp_path / "run.log") == 2  # step 1, then the eval's first batch only
    assert read_metrics(tmp_path / "run", "eval") == []
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "run")] == ["step-000001"]


def test_a_signal_during_the_reference_precompute_stops_before_training(tmp_path, monkeypatch):
    import os
    import signal

    from rlhf_cli.core.errors import Interrupted
    from rlhf_cli.stages.dpo import DPOStage

    real = DPOStage.reference_logps

    def first_batch_then_ctrl_c(self, batch):
        os.kill(os.getpid(), signal.SIGINT)
        return real(self, batch)

    monkeypatch.setattr(DPOStage, "reference_logps", first_batch_then_ctrl_c)
    run = tmp_path / "run"
    with pytest.raises(Interrupted, match="stopped before the first step") as stop:
        train_in_process(
            run,
            "stage=dpo",
            "ref.precompute=true",
            "data.eval_size=0",
            "data.max_samples=32",
            "train.micro_batch_size=4",
            "train.max_steps=2",
        )
    assert stop.value.code == 128 + signal.SIGINT
    assert not (run / "checkpoints").exists() and not (run / "ref_logps.pt").exists()


def test_max_nonfinite_counts_steps_not_updates():
    """Two updates a step (as an online stage makes): a step with a non-finite update counts
    once; a clean step resets the streak; max_nonfinite=2 bad steps in a row stop the run."""
    import torch
    from conftest import compose

    from rlhf_cli.core.errors import TrainingError
    from rlhf_cli.trainer.loop import Updater
    from rlhf_cli.trainer.state import Position

    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = compose("train.max_nonfinite=2", "optim.max_grad_norm=0")
    pos = Position()
    up = Updater([p], opt, sched, cfg, pos)

    def step(*losses: float) -> None:
        for loss in losses:
            p.grad = torch.ones(2)
            up.apply(torch.tensor(loss))
        pos.step += 1
        up.end_step()

    step(1.0, float("nan"))
    assert (pos.skipped, pos.streak, up.skipped_last) == (1, 1, True)
    step(1.0, 1.0)
    assert (pos.skipped, pos.streak, up.skipped_last) == (1, 0, False)
    step(float("nan"), float("nan"))
    assert (pos.skipped, pos.streak) == (2, 1)
    with pytest.raises(TrainingError, match="non-finite for 2 steps in a row"):
        step(float("inf"), 1.0)
    assert p.tolist() == pytest.approx([1 - 0.1 * 4] * 2)  # the 4 finite updates applied
