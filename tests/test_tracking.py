"""TensorBoard and W&B tracking, read back with their own readers: TensorBoard's
EventAccumulator, and the records of W&B's offline run files (its protobuf Records)."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import FAST, read_metrics, rlhf, stopped_copy, train_in_process

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

GRPO = (
    "stage=grpo",
    "reward.fn=rlhf_cli.rewards:char_fraction",
    "stage.rollout_batch_size=2",
    "stage.group_size=2",
    "stage.max_new_tokens=8",
    "train.micro_batch_size=4",
    "data.max_samples=16",
    "data.eval_size=4",
    "train.max_steps=4",
    "train.save_every=2",
    "train.eval_every=2",
    "log.tensorboard=true",
    "log.wandb=true",
    "log.wandb_mode=offline",
    "log.samples=3",
    "log.tags=[smoke]",
)


@pytest.fixture(autouse=True)
def quiet_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))


def tensorboard_events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def wandb_records(path: Path):
    """The protobuf Records of a W&B run file (.wandb: a LevelDB-style log of 32 KiB blocks,
    each record a 7-byte header -- crc32, length, type -- and its bytes, split across blocks
    as FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, pieces, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pieces = chunk
        else:
            pieces += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pieces)
            yield record


def wandb_run(run_file: Path) -> tuple[dict, list[dict]]:
    """(the run record as a dict of id/project/name/tags/config, the history rows)."""
    run, history = {}, []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            config = {u.key: json.loads(u.value_json) for u in r.config.update}
            run = {
                "id": r.run_id,
                "project": r.project,
                "name": r.display_name,
                "tags": list(r.tags),
                "config": config,
            }
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            history.append(row)
    return run, history


@pytest.mark.slow
def test_tensorboard_and_wandb_read_back_equal_metrics_and_resume_once_per_step(tmp_path):
    full = tmp_path / "full"
    train_in_process(full, *GRPO)
    train = read_metrics(full)
    evals = read_metrics(full, "eval")
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]

    # TensorBoard: every train and eval metric, at its step, with metrics.jsonl's value.
    acc = tensorboard_events(full)
    tags = acc.Tags()["scalars"]
    for split, rows in (("train", train), ("eval", evals)):
        for key in ("score", "kl", "response_length"):
            events = acc.Scalars(f"{split}/{key}")
            assert [e.step for e in events] == [r["step"] for r in rows]
            assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6)
    assert {"train/loss", "train/lr", "train/entropy", "train/zero_std_groups"} <= set(tags)
    # The online samples as text: prompt, response, score rows (3 of them) at each step.
    texts = acc.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [1, 2, 3, 4]
    table = texts[-1].tensor_proto.string_val[0].decode()
    assert table.splitlines()[0] == "| prompt | response | score |"
    assert len(table.splitlines()) == 2 + 3
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "name: grpo" in config

    # W&B offline: one run with the stage and the given tags, the resolved config, and a
    # history row per logged step whose values are metrics.jsonl's.
    run_id = (full / "wandb-run-id").read_text().strip()
    (run_file,) = (full / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    run, history = wandb_run(run_file)
    assert run["id"] == run_id and run["project"] == "rlhf-cli" and run["name"] == str(full)
    assert run["tags"] == ["grpo", "smoke"]
    assert run["config"]["stage"]["name"] == "grpo" and run["config"]["train"]["max_steps"] == 4
    logged = [h for h in history if "train/score" in h]
    assert [h["step"] for h in logged] == [1, 2, 3, 4]
    assert [h["train/score"] for h in logged] == pytest.approx([r["score"] for r in train])
    eval_rows = [h for h in history if "eval/score" in h]
    assert [h["eval/score"] for h in eval_rows] == pytest.approx([r["score"] for r in evals])
    samples = [h for h in history if "samples/_type" in h]
    assert [h["step"] for h in samples] == [1, 2, 3, 4]
    assert {h["samples/_type"] for h in samples} == {"table-file"}
    tables = sorted(run_file.parent.glob("files/media/table/samples_*.table.json"))
    assert len(tables) == 4
    saved = json.loads(tables[-1].read_text())
    assert saved["columns"] == ["prompt", "response", "score"] and len(saved["data"]) == 3

    # Stopped after the step-2 checkpoint (steps 3-4 were logged), then resumed: TensorBoard
    # shows each step once (the stopped run's later events purged), with the resumed values;
    # W&B continues the same run id.
    stopped = stopped_copy(full, tmp_path / "stopped", last_step=2)
    rows = train_in_process(stopped, *GRPO, "resume=auto")
    assert rows["steps"] == "4 (2 this run)"
    acc = tensorboard_events(stopped)
    resumed = read_metrics(stopped)
    events = acc.Scalars("train/score")
    assert [e.step for e in events] == [1, 2, 3, 4]
    assert [e.value for e in events] == pytest.approx([r["score"] for r in resumed], rel=1e-6)
    assert [t.step for t in acc.Tensors("samples/text_summary")] == [1, 2, 3, 4]
    # The reader TensorBoard's own server uses (no purging of its own): the same.
    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.util import tensor_util

    plugin = plugin_event_accumulator.EventAccumulator(
        str(stopped / "tensorboard"), size_guidance={"tensors": 0}
    )
    plugin.Reload()
    points = [
        (e.step, tensor_util.make_ndarray(e.tensor_proto).item())
        for e in plugin.Tensors("train/score")
    ]
    assert [p[0] for p in points] == [1, 2, 3, 4]
    assert [p[1] for p in points] == pytest.approx([r["score"] for r in resumed], rel=1e-6)
    assert (stopped / "wandb-run-id").read_text().strip() == run_id
    files = sorted((stopped / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # the first run's and the resumed one's, under one W&B run id
    newest = max(files, key=lambda f: f.stat().st_mtime)
    run2, history2 = wandb_run(newest)
    assert run2["id"] == run_id
    assert [h["step"] for h in history2 if "train/score" in h] == [3, 4]


def test_sft_logs_to_tensorboard_only_when_asked(tmp_path):
    train_in_process(tmp_path / "plain", *FAST)
    assert not (tmp_path / "plain" / "tensorboard").exists()
    assert not (tmp_path / "plain" / "wandb").exists()
    train_in_process(tmp_path / "tb", *FAST, "log.tensorboard=true")
    acc = tensorboard_events(tmp_path / "tb")
    loss = [e.value for e in acc.Scalars("train/loss")]
    assert loss == pytest.approx([r["loss"] for r in read_metrics(tmp_path / "tb")], rel=1e-6)
    assert "samples/text_summary" not in acc.Tags()["tensors"]  # no samples in sft
    assert not (tmp_path / "tb" / "wandb").exists()


def test_switching_tracking_on_when_resuming_is_not_a_config_change(tmp_path):
    full = tmp_path / "full"
    train_in_process(full, *FAST, "train.save_every=2")
    stopped = stopped_copy(full, tmp_path / "stopped", last_step=2)
    rows = train_in_process(
        stopped, *FAST, "train.save_every=2", "log.tensorboard=true", "resume=auto"
    )
    assert rows["steps"] == "4 (2 this run)"
    assert [e.step for e in tensorboard_events(stopped).Scalars("train/loss")] == [3, 4]


def test_a_missing_tracking_package_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    import importlib.util

    from rlhf_cli.config import LogConfig
    from rlhf_cli.core.errors import UserError
    from rlhf_cli.trainer.tracking import check_available

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    check_available(LogConfig(tensorboard=True))
    with pytest.raises(UserError, match=r"log.wandb=true needs the wandb package: pip install"):
        check_available(LogConfig(wandb=True))


def test_a_bad_wandb_mode_is_one_line(tmp_path):
    out = rlhf("train", "log.wandb=true", "log.wandb_mode=cloud", f"run_dir={tmp_path / 'r'}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: config: log.wandb_mode='cloud' is not one of: online, offline, disabled"
    )
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_wandb_without_a_login_is_one_line_and_leaves_no_run(tmp_path):
    """Online mode with no API key (an empty W&B config directory): W&B refuses at once; the
    run stops with one line and the fresh run directory is removed again."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_CONFIG_DIR=str(tmp_path / "cfg"), WANDB_MODE="online", HF_HUB_OFFLINE="1")
    run = tmp_path / "run"
    out = rlhf(
        "train", *FAST, "log.wandb=true", f"run_dir={run}", env=env, stdin=subprocess.DEVNULL
    )
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: log.wandb=true: W&B did not start (") and "wandb login" in last
    assert "Traceback" not in out.stderr
    assert not run.exists()
