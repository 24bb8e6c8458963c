"""Data parallelism through torchrun on CPU (gloo): N ranks x batch b equal 1 rank x batch N*b."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, adapter, max_diff, read_metrics, stopped_copy, train_in_process

from rlhf_cli.cli import torchrun_command
from rlhf_cli.trainer import checkpoint as ckpt_lib

# A rank left waiting in a collective (a hang) fails within this many seconds, not 30 minutes.
TIMEOUT = "dist.timeout_s=180"


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = torchrun_command(nproc, [*args, TIMEOUT])
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def assert_ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


# quant=none: no 4-bit rounding, so the comparison can be tight; dropout 0: no per-rank RNG.
EXACT = (
    "quant=none",
    "peft.dropout=0",
    "data.max_samples=96",
    "train.max_steps=4",
    "optim.lr=2e-3",
    "data.eval_size=8",
)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_two_ranks_equal_one_rank_with_twice_the_batch(tmp_path, stage):
    res = torchrun(
        f"stage={stage}",
        *EXACT,
        "train.micro_batch_size=2",
        "train.grad_accum=2",
        f"run_dir={tmp_path / 'two'}",
    )
    assert_ok(res)
    train_in_process(
        tmp_path / "one", f"stage={stage}", *EXACT, "train.micro_batch_size=4", "train.grad_accum=2"
    )
    two, one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert len(two) == len(one) == 4
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    evals = read_metrics(tmp_path / "two", "eval"), read_metrics(tmp_path / "one", "eval")
    assert evals[0][-1]["loss"] == pytest.approx(evals[1][-1]["loss"], abs=1e-5)
    # Adam divides by sqrt(v): float summation-order noise grows to ~1e-5 in 4 steps; a
    # gradient that missed a rank's share would differ by ~1e-3.
    assert max_diff(adapter(tmp_path / "two"), adapter(tmp_path / "one")) < 1e-4
    # One run directory, one set of checkpoints, written by rank 0 alone.
    assert [p.name for p in ckpt_lib.list_checkpoints(tmp_path / "two")] == ["step-000004"]
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 5


def test_two_rank_grpo_matches_one_rank(tmp_path):
    common = (
        "stage=grpo",
        "reward.fn=rlhf_cli.rewards:char_fraction",
        "data.eval_size=0",
        "stage.rollout_batch_size=8",
        "stage.max_new_tokens=8",
        "train.max_steps=2",
    )
    assert_ok(torchrun(*common, f"run_dir={tmp_path / 'two'}", "log.tensorboard=true"))
    train_in_process(tmp_path / "one", *common)
    two, one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert set(two[0]) == set(one[0])
    # Only rank 0 writes TensorBoard events: one file, one point per step, metrics.jsonl's.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / "two" / "tensorboard").iterdir()
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/score")] == [
        (r["step"], pytest.approx(r["score"], rel=1e-6)) for r in two
    ]
    for run in (two, one):  # before any update the policy is the reference
        assert run[0]["kl"] == pytest.approx(0.0, abs=1e-6)
        assert run[0]["policy/ratio_first"] == pytest.approx(1.0, abs=1e-5)
    # Different random samples, the same policy: scores of untrained samples agree in mean.
    assert two[0]["score"] == pytest.approx(one[0]["score"], abs=0.05)
    assert two[0]["response_length"] == pytest.approx(one[0]["response_length"], rel=0.3)
    assert [p.name for p in ckpt_lib.list_checkpoints(tmp_path / "two")] == ["step-000002"]


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_two_rank_ppo_update_metrics_equal_one_rank(tmp_path, loss_agg):
    """Near-greedy sampling (temperature 1e-3) makes the rollouts the same however the prompts
    are split, so the update metrics must agree: each rank adds its token share of the global
    minibatch, and the shares are summed over ranks (averaging them halved the value loss).
    The loss and gradient norm agree in every stage.loss_agg: each rank divides by the weight
    of the global minibatch."""
    common = (
        "stage=ppo",
        f"stage.loss_agg={loss_agg}",
        "reward.fn=rlhf_cli.rewards:char_fraction",
        "quant=none",
        "data.eval_size=0",
        "stage.rollout_batch_size=8",
        "stage.max_new_tokens=8",
        "stage.temperature=1e-3",
        "stage.epochs=2",
        "train.max_steps=1",
    )
    assert_ok(torchrun(*common, f"run_dir={tmp_path / 'two'}"))
    train_in_process(tmp_path / "one", *common)
    two, one = read_metrics(tmp_path / "two")[0], read_metrics(tmp_path / "one")[0]
    assert two["score"] == pytest.approx(one["score"], abs=1e-6)  # the same rollouts
    assert one["value/loss"] > 1e-3
    # Log-probs at temperature 1e-3 magnify float summation-order noise (0.2% seen on the
    # approximate KL of the second epoch); a metric averaged instead of summed is off by 2x.
    for key in (
        "loss",
        "grad_norm",
        "value/loss",
        "policy/clipfrac",
        "policy/approx_kl",
        "value/clipfrac",
    ):
        assert two[key] == pytest.approx(one[key], rel=2e-2, abs=1e-7), key


def test_two_rank_kto_equals_one_rank_and_its_uneven_eval_finishes(tmp_path):
    """KTO's reference point comes from the whole global step: 2 ranks x 8 equal 1 rank x 16.
    17 eval examples in batches of 8 give rank 0 two batches and rank 1 one; the eval's z0 is
    estimated once, by every rank, before the batches (the loss holds no collective), so it
    finishes (it hung in an all-reduce only rank 0 reached) and equals the 1-rank eval."""
    common = ("stage=kto", *EXACT[:-1], "data.eval_size=17", "train.max_steps=3")
    assert_ok(torchrun(*common, "train.micro_batch_size=8", f"run_dir={tmp_path / 'two'}"))
    train_in_process(tmp_path / "one", *common, "train.micro_batch_size=16")
    for split in ("train", "eval"):
        two, one = read_metrics(tmp_path / "two", split), read_metrics(tmp_path / "one", split)
        assert len(two) == len(one) == (3 if split == "train" else 1)
        # (summation order: 1.8e-5 on a KL of 1.58 measured on an AVX-512 host; a share of
        # the step's reference point lost or counted twice is off by far more)
        for key in ("loss", "kl", "rewards/desirable", "rewards/undesirable"):
            assert [r[key] for r in two] == pytest.approx(
                [r[key] for r in one], rel=1e-4, abs=1e-5
            ), key
    assert read_metrics(tmp_path / "one")[-1]["kl"] > 0  # z0 at work by the last step


def test_two_rank_run_resumes_and_refuses_another_world_size(tmp_path):
    args = (
        "stage=sft",
        "data.max_samples=96",
        "data.eval_size=0",
        "train.max_steps=4",
        "train.save_every=2",
        "train.keep_last=3",
        "train.micro_batch_size=4",
        "optim.lr=2e-3",
    )
    assert_ok(torchrun(*args, f"run_dir={tmp_path / 'full'}"))
    stopped_copy(tmp_path / "full", tmp_path / "resumed", last_step=2)

    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_cli",
            "train",
            *args,
            f"run_dir={tmp_path / 'resumed'}",
            "resume=auto",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 2 and "saved by 2 process(es)" in one.stderr, one.stderr
    assert "Traceback" not in one.stderr

    assert_ok(torchrun(*args, f"run_dir={tmp_path / 'resumed'}", "resume=auto"))
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full], abs=1e-6)
    assert max_diff(adapter(tmp_path / "full"), adapter(tmp_path / "resumed")) < 1e-6


def test_launch_nproc_runs_torchrun(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_cli",
            "train",
            "launch.nproc=2",
            TIMEOUT,
            *EXACT,
            "train.micro_batch_size=2",
            "train.max_steps=2",
            f"run_dir={tmp_path / 'r'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "distributed: 2 ranks" in res.stderr
    assert (tmp_path / "r" / "final" / "adapter_model.safetensors").is_file()


# The same with the default 4-bit (NF4) base: FSDP shards its packed weights too.
QLORA = tuple(a for a in EXACT if a != "quant=none")


def test_fsdp_shards_a_4bit_base_matches_one_rank_and_resumes(tmp_path):
    """FSDP-QLoRA: the NF4 base's packed weights are sharded (bitsandbytes keeps each layer's
    quantization constants on the module and puts them back on the gathered weight), the LoRA
    weights, gradients and optimizer state too; each rank holds half of them (measured at its
    first update), and the run equals one rank with twice the batch."""
    args = (*QLORA, "train.save_every=2", "train.keep_last=3")
    assert_ok(
        torchrun(
            *args, "dist.strategy=fsdp", "train.micro_batch_size=4", f"run_dir={tmp_path / 'fsdp'}"
        )
    )
    train_in_process(tmp_path / "one", *args, "train.micro_batch_size=8")
    fsdp, one = read_metrics(tmp_path / "fsdp"), read_metrics(tmp_path / "one")
    assert [r["loss"] for r in fsdp] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    # LoRA matrices have even first dimensions: their shards are exact halves.
    for key in ("memory/grads_mib", "memory/optimizer_mib"):
        assert fsdp[0][key] == pytest.approx(one[0][key] / 2, rel=1e-9), key
    # The 4-bit constants (~3% here) stay whole on every rank: a little over half.
    ratio = fsdp[0]["memory/weights_mib"] / one[0]["memory/weights_mib"]
    assert 0.5 < ratio < 0.53, ratio

    # `rlhf plan ranks=2`: its per-rank rows against what rank 0 held at its first update.
    from conftest import compose

    from rlhf_cli.tools.plan import plan

    cfg = compose(*args, "dist.strategy=fsdp", "train.micro_batch_size=4")
    rows = {r.name: r.bytes / 2**20 for r in plan(cfg, "cpu", ranks=2).rows}
    assert rows["gradients"] == pytest.approx(fsdp[0]["memory/grads_mib"], rel=1e-6)
    assert rows["optimizer states"] == pytest.approx(fsdp[0]["memory/optimizer_mib"], rel=1e-6)
    weights = rows["base weights"] + rows["trainable parameters"]
    assert weights == pytest.approx(fsdp[0]["memory/weights_mib"], rel=0.02)
    whole = {r.name: r.bytes / 2**20 for r in plan(cfg, "cpu", ranks=1).rows}
    assert whole["optimizer states"] == pytest.approx(one[0]["memory/optimizer_mib"], rel=1e-6)
    assert rows["gathered by FSDP"] > 0 and "gathered by FSDP" not in whole
    # Gathered from the shards into the single-device format, key for key (summation-order
    # noise only, amplified by Adam as in the DDP test above).
    assert max_diff(adapter(tmp_path / "fsdp"), adapter(tmp_path / "one")) < 1e-4

    stopped_copy(tmp_path / "fsdp", tmp_path / "resumed", last_step=2)
    assert_ok(
        torchrun(
            *args,
            "dist.strategy=fsdp",
            "train.micro_batch_size=4",
            f"run_dir={tmp_path / 'resumed'}",
            "resume=auto",
        )
    )
    resumed = read_metrics(tmp_path / "resumed")
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in fsdp], abs=1e-6)
    assert max_diff(adapter(tmp_path / "fsdp"), adapter(tmp_path / "resumed")) < 1e-6


@pytest.mark.parametrize("stage", ["rm", "dpo", "kto"])
def test_fsdp_runs_every_offline_stage_on_a_4bit_base_as_one_rank_does(tmp_path, stage):
    """rm, dpo and kto under FSDP with an NF4 base equal one rank with twice the batch, and
    resume exactly. rm failed on its first backward: its shared-prompt forward runs the
    decoder twice and the responses' backward reaches the prompt pass through the KV cache,
    whose weights FSDP had freed (under FSDP the rows run whole); and AdamW's foreach kernels
    refused its reward head (a plain tensor) beside the sharded LoRA weights (its optimizer
    state is saved beside the sharded ones)."""
    args = (*QLORA, f"stage={stage}", "train.max_steps=3", "data.eval_size=0")
    fsdp_args = (*args, "dist.strategy=fsdp", "train.micro_batch_size=4", "train.save_every=1")
    assert_ok(torchrun(*fsdp_args, f"run_dir={tmp_path / 'fsdp'}"))
    train_in_process(tmp_path / "one", *args, "train.micro_batch_size=8")
    fsdp, one = read_metrics(tmp_path / "fsdp"), read_metrics(tmp_path / "one")
    assert [r["loss"] for r in fsdp] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    assert [r["grad_norm"] for r in fsdp] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4)
    assert max_diff(adapter(tmp_path / "fsdp"), adapter(tmp_path / "one")) < 1e-4
    stopped_copy(tmp_path / "fsdp", tmp_path / "resumed", last_step=2)
    assert_ok(torchrun(*fsdp_args, f"run_dir={tmp_path / 'resumed'}", "resume=auto"))
    resumed = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    # Steps 1-2 are the copied ones: the resumed process logs its memory at its first step, 3.
    assert "memory/optimizer_mib" in resumed[2] and "memory/optimizer_mib" not in fsdp[2]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in fsdp], abs=1e-6)
    names = ["adapter_model.safetensors"] + (["reward_head.safetensors"] if stage == "rm" else [])
    for name in names:
        runs = (adapter(tmp_path / d, name=name) for d in ("fsdp", "resumed"))
        assert max_diff(*runs) < 1e-6, name


def test_fsdp_ppo_on_a_4bit_base_equals_ddp_and_resumes(tmp_path):
    """The online stages under FSDP: rollouts (every rank takes a generation step per token
    until all are done: the ranks' replies end at different lengths), the adapter-off
    reference and the updates on the sharded NF4 base equal the same 2 ranks under ddp, where
    each rank holds the whole model (same prompts per rank, so the same numerics; near-greedy
    sampling). 17 eval prompts in batches of 8 give rank 1 a batch less: under FSDP it runs a
    stand-in in step with rank 0 (it would hang in rank 0's generation otherwise) and the
    eval equals ddp's. Resume is exact: step 2 again from the step-1 checkpoint."""
    common = (
        "stage=ppo",
        "reward.fn=rlhf_cli.rewards:char_fraction",
        "data.eval_size=17",
        "stage.rollout_batch_size=8",
        "stage.max_new_tokens=8",
        "stage.temperature=1e-3",
        "train.max_steps=2",
        "train.eval_every=1",
        "train.save_every=1",
    )
    fsdp_args = (*common, "dist.strategy=fsdp")
    assert_ok(torchrun(*fsdp_args, f"run_dir={tmp_path / 'fsdp'}"))
    assert_ok(torchrun(*common, f"run_dir={tmp_path / 'ddp'}"))
    fsdp, ddp = read_metrics(tmp_path / "fsdp"), read_metrics(tmp_path / "ddp")
    assert len(fsdp) == len(ddp) == 2
    for a, b in zip(fsdp, ddp):
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)  # the same rollouts
        # Log-probs at temperature 1e-3 magnify summation-order noise (0.3% on step 2's
        # gradient norm; 5% on its approx_kl, a number of 1e-4, on an AVX-512 host); a rank's
        # share lost or counted twice is off by 2x.
        for key in ("loss", "grad_norm", "value/loss"):
            assert a[key] == pytest.approx(b[key], rel=2e-2, abs=1e-7), key
        assert a["policy/approx_kl"] == pytest.approx(b["policy/approx_kl"], rel=0.2)
    evals = read_metrics(tmp_path / "fsdp", "eval"), read_metrics(tmp_path / "ddp", "eval")
    assert len(evals[0]) == 2  # after step 1, at the end
    assert [e["score"] for e in evals[0]] == pytest.approx([e["score"] for e in evals[1]], abs=1e-6)
    # Each rank holds half of the LoRA weights' optimizer state (the value head stays whole).
    assert fsdp[0]["memory/optimizer_mib"] < 0.6 * ddp[0]["memory/optimizer_mib"]

    stopped_copy(tmp_path / "fsdp", tmp_path / "resumed", last_step=1)
    assert_ok(torchrun(*fsdp_args, f"run_dir={tmp_path / 'resumed'}", "resume=auto"))
    resumed = read_metrics(tmp_path / "resumed")
    assert "memory/weights_mib" in resumed[1] and "memory/weights_mib" not in fsdp[1]
    for key in ("loss", "score", "value/loss"):
        assert resumed[1][key] == pytest.approx(fsdp[1][key], abs=1e-6), key


def test_fsdp_dynamic_sampling_keeps_a_full_rank_sampling_in_step(tmp_path):
    """stage.dynamic_sampling under FSDP: rank 0's groups all differ at the first try, rank 1's
    never do (tests/rewards_by_rank.py); rank 0 must go on sampling (and dropping) with rank 1
    through every try, or rank 1's generation waits for it in FSDP's gathers (a hang)."""
    args = (
        "stage=grpo",
        "reward.fn=tests.rewards_by_rank:rank_zero_length",
        "data.eval_size=0",
        "stage.rollout_batch_size=4",
        "stage.group_size=2",
        "stage.max_new_tokens=6",
        "stage.dynamic_sampling=true",
        "stage.dynamic_sampling_max_tries=3",
        "train.max_steps=1",
        "dist.strategy=fsdp",
        f"run_dir={tmp_path / 'fsdp'}",
    )
    assert_ok(torchrun(*args))
    (row,) = read_metrics(tmp_path / "fsdp")
    assert row["dynamic/tries"] == 3  # rank 1 never filled: every try ran, on both ranks
    assert row["dynamic/filled"] == pytest.approx(0.5)  # rank 1's 2 groups of 2, ranks averaged


def test_fsdp_rejection_sampling_runs_short_batches_in_step(tmp_path):
    """rs under FSDP: 9 prompts a round in generation batches of 4 leave the last batch one
    prompt, so rank 1 has none: it samples a stand-in in step with rank 0 and keeps nothing.
    The round's samples and scores, the training and the greedy eval equal ddp's."""
    from rlhf_cli.stages.rs import read_rows

    common = (
        "stage=rs",
        "reward.fn=rlhf_cli.rewards:char_fraction",
        "peft.dropout=0",
        "data.eval_size=5",
        "stage.prompts_per_round=9",
        "stage.n=2",
        "stage.rollout_batch_size=4",
        "stage.max_new_tokens=6",
        "stage.rounds=1",
        "train.micro_batch_size=2",
    )
    assert_ok(torchrun(*common, "dist.strategy=fsdp", f"run_dir={tmp_path / 'fsdp'}"))
    assert_ok(torchrun(*common, f"run_dir={tmp_path / 'ddp'}"))
    rounds = [read_rows(tmp_path / d / "rounds" / "round-1.jsonl") for d in ("fsdp", "ddp")]
    assert len(rounds[0]) == 9
    for key in ("ids", "score"):
        assert [[x[key] for x in r["samples"]] for r in rounds[0]] == [
            [x[key] for x in r["samples"]] for r in rounds[1]
        ]
    fsdp, ddp = read_metrics(tmp_path / "fsdp"), read_metrics(tmp_path / "ddp")
    assert [r["loss"] for r in fsdp] == pytest.approx([r["loss"] for r in ddp], abs=1e-5)
    e2, e1 = read_metrics(tmp_path / "fsdp", "eval")[-1], read_metrics(tmp_path / "ddp", "eval")[-1]
    assert e2["greedy_score"] == pytest.approx(e1["greedy_score"], abs=1e-6)


def test_two_nodes_run_as_one_fsdp_job(tmp_path):
    """Several machines: two torchrun launches (one per "node", --nnodes=2 --node_rank=0/1)
    meet at a c10d rendezvous on localhost, as on real machines with one run directory on
    shared storage; rank 0 (node 0) writes it. The run equals one rank with twice the batch
    (with gradient checkpointing, which recomputes each layer's forward under FSDP's gather in
    the backward)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = (
        *QLORA[:2],
        "train.max_steps=3",
        "data.eval_size=0",
        "train.gradient_checkpointing=true",
    )
    run_dir = tmp_path / "nodes"
    launches = []
    for node in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            f"--node_rank={node}",
            "--nproc_per_node=1",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}",
            "--rdzv_id=two-nodes",
            "-m",
            "rlhf_cli",
            "train",
            *args,
            "dist.strategy=fsdp",
            "train.micro_batch_size=4",
            f"run_dir={run_dir}",
            TIMEOUT,
        ]
        launches.append(
            subprocess.Popen(
                cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outs = [p.communicate(timeout=600) for p in launches]
    for p, (out, err) in zip(launches, outs):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
    assert "distributed: 2 ranks" in outs[0][1] + outs[0][0]
    train_in_process(tmp_path / "one", *args, "train.micro_batch_size=8")
    two, one = read_metrics(run_dir), read_metrics(tmp_path / "one")
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    assert max_diff(adapter(run_dir), adapter(tmp_path / "one")) < 1e-4
    assert [p.name for p in ckpt_lib.list_checkpoints(run_dir)] == ["step-000003"]


def test_packed_fsdp_dpo_equals_one_padded_rank(tmp_path):
    """train.packing under FSDP (packing_attention=varlen, the default: one forward a micro-batch
    on every rank) equals one rank with twice the batch, padded."""
    args = (*EXACT, "stage=dpo", "train.max_steps=3", "data.eval_size=0", "data.max_length=300")
    packed = (*args, "dist.strategy=fsdp", "train.micro_batch_size=4", "train.packing=true")
    assert_ok(torchrun(*packed, f"run_dir={tmp_path / 'fsdp'}"))
    train_in_process(tmp_path / "one", *args, "train.micro_batch_size=8")
    fsdp, one = read_metrics(tmp_path / "fsdp"), read_metrics(tmp_path / "one")
    assert [r["loss"] for r in fsdp] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    assert [r["grad_norm"] for r in fsdp] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4)
    assert max_diff(adapter(tmp_path / "fsdp"), adapter(tmp_path / "one")) < 1e-4
    assert all(a["padding"] < b["padding"] for a, b in zip(fsdp, one))


def tied_tiny_model(out: Path) -> Path:
    """The tiny model's config and tokenizer with tied input and output embeddings (as
    SmolLM2 and Qwen2.5-0.5B have), random weights."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_cli.model.tiny import tiny_model_dir

    src = tiny_model_dir()
    config = LlamaConfig.from_pretrained(src)
    config.tie_word_embeddings = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def test_fsdp_keeps_tied_embeddings_tied(tmp_path):
    """A tied embedding and LM head stay one parameter in one FSDP unit: 2 ranks equal 1 rank
    in loss and in the saved matrix, which is still one matrix (embedding == head). Sharding
    the decoder (which owns the embedding) apart from the root (which owns the head) made them
    two parameters: each got half of the tied gradient, Adam moved them apart (about 6e-3 in
    2 steps) and the step-2 loss differed by 1e-3."""
    model = tied_tiny_model(tmp_path / "tied")
    args = (
        *EXACT,
        f"model.name_or_path={model}",
        "peft=full",
        "optim.lr=1e-3",
        "train.max_steps=3",
        "data.eval_size=0",
    )
    assert_ok(
        torchrun(
            *args, "dist.strategy=fsdp", "train.micro_batch_size=4", f"run_dir={tmp_path / 'fsdp'}"
        )
    )
    train_in_process(tmp_path / "one", *args, "train.micro_batch_size=8")
    fsdp, one = read_metrics(tmp_path / "fsdp"), read_metrics(tmp_path / "one")
    assert [r["loss"] for r in fsdp] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    assert [r["grad_norm"] for r in fsdp] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4)
    fsdp_saved, one_saved = (
        adapter(tmp_path / d, name="model.safetensors") for d in ("fsdp", "one")
    )
    # One matrix for the tied pair, saved under one name as a single device saves it (two
    # different matrices before), equal to the single device's up to summation order.
    assert "lm_head.weight" in one_saved and "model.embed_tokens.weight" not in one_saved
    assert max_diff(fsdp_saved, one_saved) < 1e-4


def test_fsdp_config_is_validated(tmp_path):
    from conftest import rlhf

    res = rlhf("train", "quant=int8", "dist.strategy=fsdp", cwd=tmp_path)
    assert res.returncode == 2 and "use quant=nf4, or dist.strategy=ddp" in res.stderr
    res = rlhf("train", "optim=adamw8bit", "dist.strategy=fsdp", cwd=tmp_path)
    assert res.returncode == 2 and "use optim=adamw with dist.strategy=fsdp" in res.stderr
    res = rlhf(
        "train",
        "stage=grpo",
        "stage.tools=[rlhf_cli.multiturn:calculator]",
        "reward.fn=rlhf_cli.rewards:char_fraction",
        "dist.strategy=fsdp",
        cwd=tmp_path,
    )
    assert res.returncode == 2 and "run stage.multi_turn with dist.strategy=ddp" in res.stderr
    res = rlhf(
        "train",
        "quant=none",
        "dist.strategy=fsdp",
        "train.packing=true",
        "train.packing_attention=slices",
        cwd=tmp_path,
    )
    assert res.returncode == 2 and "use train.packing_attention=varlen or mask" in res.stderr


def test_two_rank_rejection_sampling_shares_the_rounds(tmp_path):
    """Each rank samples its half of every generation batch; rank 0 writes each round's file
    with every prompt of the round, in the order a single process gives them."""
    from rlhf_cli.stages.rs import read_rows

    common = (
        "stage=rs",
        "reward.fn=rlhf_cli.rewards:char_fraction",
        "data.eval_size=8",
        "stage.prompts_per_round=12",
        "stage.n=3",
        "stage.rollout_batch_size=4",
        "stage.max_new_tokens=8",
        "stage.rounds=2",
        "train.micro_batch_size=2",
        "train.grad_accum=2",
    )
    assert_ok(torchrun(*common, f"run_dir={tmp_path / 'two'}"))
    train_in_process(tmp_path / "one", *common, "train.micro_batch_size=4")
    for r in (1, 2):
        two = read_rows(tmp_path / "two" / "rounds" / f"round-{r}.jsonl")
        one = read_rows(tmp_path / "one" / "rounds" / f"round-{r}.jsonl")
        assert [row["prompt_index"] for row in two] == [row["prompt_index"] for row in one]
        for row in two:
            scores = [x["score"] for x in row["samples"]]
            kept = [x["score"] for x in row["samples"] if x["kept"]]
            assert len(scores) == 3 and kept == [max(scores)]
    # 12 kept a round, 8 a step (2 x 2 x 2 ranks): one step a round, as for one rank x 8.
    two, one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert [r["round"] for r in two] == [r["round"] for r in one] == [1, 2]
    assert "greedy_score" in read_metrics(tmp_path / "two", "eval")[-1]
    assert [p.name for p in ckpt_lib.list_checkpoints(tmp_path / "two")] == ["step-000002"]
