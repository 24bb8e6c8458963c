"""A corpus of user mistakes, each run through the `rlhf` CLI as a user would: exit 2, one
error line naming what is wrong, no traceback, and nothing in the working directory changed
(no file written, moved or deleted; a run given to the command is left as it was)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import rlhf, train_in_process
from test_cli_errors import assert_one_line_error

RUN_ARGS = ("train.max_steps=2", "train.micro_batch_size=2", "data.max_samples=8")
RUN_ARGS += ("data.eval_size=0", "quant=none", "train.save_every=1")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A working directory: an SFT run (checkpoints 1 and 2), data files good and bad."""
    root = tmp_path_factory.mktemp("bad-inputs")
    train_in_process(root / "run", *RUN_ARGS)
    pc = [{"prompt": f"Say {i}.", "completion": f"{i}."} for i in range(8)]
    (root / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pc))
    (root / "latin1.jsonl").write_bytes(
        '{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1")
    )
    (root / "torn.jsonl").write_text(json.dumps(pc[0]) + "\n" + '{"prompt": "a", "compl\n')
    (root / "columns.jsonl").write_text('{"question": "a", "answer": "b"}\n' * 8)
    (root / "empty.jsonl").write_text("")
    (root / "notes.txt").write_text("prompt: a\n")
    same = [{"prompt": f"Q{i}?", "chosen": "Same.", "rejected": "Same."} for i in range(8)]
    (root / "same.jsonl").write_text("".join(json.dumps(r) + "\n" for r in same))
    (root / "bad.jinja").write_text("{% for m in messages %}{{ m.content }")
    (root / "scores.jsonl").write_text("{}\n")  # an output file that exists
    (root / "eval.json").write_text("{}\n")
    (root / "plotdir").mkdir()
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    } | {str(p.relative_to(root)) + "/": "" for p in root.rglob("*") if p.is_dir()}


T = ("train", "data.max_samples=8", "data.eval_size=0", "train.max_steps=1", "run_dir=new")
CASES: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    # config
    ("unknown stage", ("train", "stage=dpoo"), ("dpoo", "dpo")),
    ("negative lr", (*T, "optim.lr=-1"), ("optim.lr",)),
    ("zero batch", (*T, "train.micro_batch_size=0"), ("train.micro_batch_size",)),
    ("beta not a number", (*T, "stage=dpo", "stage.beta=high"), ("stage.beta", "high")),
    ("online stage, no reward", (*T, "stage=grpo"), ("stage=grpo needs a reward",)),
    ("reward fn not module:fn", (*T, "stage=grpo", "reward.fns=[concise]"), ("module:function",)),
    (
        "reward weights miscounted",
        (*T, "stage=grpo", "reward.fn=rlhf_cli.rewards:concise", "reward.weights=[1,2]"),
        ("reward.weights has 2 values for 1",),
    ),
    ("reward module missing", (*T, "stage=grpo", "reward.fn=nomod:f"), ("cannot import 'nomod'",)),
    (
        "reward kwarg nobody takes",
        (*T, "stage=grpo", "reward.fn=rlhf_cli.rewards:concise", "+reward.kwargs.chars=a"),
        ("reward.kwargs.chars",),
    ),
    (
        "dynamic sampling without groups",
        (*T, "stage=ppo", "reward.fn=rlhf_cli.rewards:concise", "stage.dynamic_sampling=true"),
        ("group_size >= 2",),
    ),
    ("clip-higher below clip", (*T, "stage=grpo", "stage.clip_eps_high=0.1"), ("clip_eps_high",)),
    (
        "environment module missing",
        (*T, "stage=grpo", "stage.env=nomod:Env", "stage.max_turns=2"),
        ("stage.env=nomod:Env", "cannot import 'nomod'"),
    ),
    (
        "tool without a docstring",
        (
            *T,
            "stage=grpo",
            "stage.tools=[rlhf_cli.rewards:keyword]",
            "reward.fn=rlhf_cli.rewards:concise",
        ),
        ("stage.tools: rlhf_cli.rewards:keyword cannot be described",),
    ),
    (
        "tool time limit not positive",
        (
            *T,
            "stage=grpo",
            "stage.tools=[rlhf_cli.multiturn:calculator]",
            "reward.fn=rlhf_cli.rewards:concise",
            "stage.tool_timeout_s=0",
        ),
        ("stage.tool_timeout_s must be > 0",),
    ),
    (
        "reward needs a column the data lacks",
        (*T, "stage=grpo", "reward.fn=rlhf_cli.rewards:math_answer"),
        ("math_answer needs answer",),
    ),
    (
        "vllm engine for a stage that does not sample",
        (*T, "stage=dpo", "rollout.engine=vllm"),
        ("rollout.engine=vllm: stage=dpo does not sample",),
    ),
    (
        "vllm engine under fsdp",
        (
            *T,
            "stage=grpo",
            "reward.fn=rlhf_cli.rewards:concise",
            "rollout.engine=vllm",
            "dist.strategy=fsdp",
        ),
        ("rollout.engine=vllm", "dist.strategy=ddp"),
    ),
    ("unknown engine", (*T, "stage=grpo", "rollout.engine=sglang"), ("rollout.engine", "vllm")),
    (
        "tis cap below 1",
        (*T, "stage=grpo", "rollout.tis_cap=0.5"),
        ("rollout.tis_cap must be >= 1",),
    ),
    ("top_k negative", (*T, "stage=grpo", "stage.top_k=-1"), ("stage.top_k must be >= 0",)),
    (
        "grpo with k1 in its loss",
        (*T, "stage=grpo", "reward.fn=rlhf_cli.rewards:concise", "stage.kl_estimator=k1"),
        ("stage.kl_estimator=k1", "zero expected gradient", "k3"),
    ),
    (
        "kto with one example a step",
        (*T, "stage=kto", "train.micro_batch_size=1", "train.grad_accum=1"),
        ("stage=kto", "train.micro_batch_size", ">= 2"),
    ),
    ("full fine-tune of 4-bit", (*T, "peft=full"), ("quant=none",)),
    ("chat template missing", (*T, "model.chat_template=nope.jinja"), ("no such file",)),
    ("chat template broken", (*T, "model.chat_template=bad.jinja"), ("not a valid Jinja",)),
    # data
    ("data file missing", (*T, "data.path=missing.jsonl"), ("missing.jsonl", "no such file")),
    # no run_dir: Hydra makes runs/dpo/<time>, and the mistake must take runs/ away again
    (
        "data file missing, default run_dir",
        ("train", "stage=dpo", "data.path=missing.jsonl"),
        ("missing.jsonl", "no such file"),
    ),
    ("data not UTF-8", (*T, "data.path=latin1.jsonl"), ("not UTF-8 (byte 0xe9 on line 1)",)),
    (
        "malformed line, on_bad_row=error",
        (*T, "data.path=torn.jsonl", "data.on_bad_row=error"),
        ("line 2 is not valid JSON",),
    ),
    ("columns not found", (*T, "data.path=columns.jsonl"), ("question", "data.columns")),
    ("empty data file", (*T, "data.path=empty.jsonl"), ("empty.jsonl",)),
    ("unsupported file type", (*T, "data.path=notes.txt"), ("unsupported file type .txt",)),
    ("unknown builtin", (*T, "data.path=builtin:nope"), ("builtin:nope", "builtin:sft")),
    ("pairs all identical", (*T, "stage=dpo", "data.path=same.jsonl"), ("same.jsonl",)),
    # run directories and checkpoints
    ("train into an existing run", ("train", "run_dir=run", "train.max_steps=1"), ("resume=auto",)),
    ("resume from nothing", (*T, "resume=nowhere"), ("resume=nowhere", "no complete checkpoint")),
    (
        "resume another stage's run",
        (*T[:-1], "stage=dpo", "resume=run", "run_dir=dpo-run"),
        ("stage=sft run", "model.adapter=run"),
    ),
    (
        "resume with another lr",
        ("train", *RUN_ARGS, "train.max_steps=3", "run_dir=run", "resume=auto", "optim.lr=1e-3"),
        ("optim.lr", "resume_force=true"),
    ),
    # the other commands
    ("sample a missing run", ("sample", "nowhere", "prompt=Hi"), ("nowhere", "neither a run")),
    ("sample without prompts", ("sample", "run"), ("prompt",)),
    ("sample bad temperature", ("sample", "run", "prompt=Hi", "temperature=-1"), ("temperature",)),
    ("sample unknown option", ("sample", "run", "prompt=Hi", "temp=1"), ("unknown option temp",)),
    ("eval with nothing to do", ("eval", "run"), ("nothing to evaluate",)),
    (
        "eval kwargs without a function",
        ("eval", "run", "prompts=good.jsonl", "reward.kwargs.x=1"),
        ("name the function",),
    ),
    ("merge into the working dir", ("merge", "run", "out=.", "force=true"), ("current directory",)),
    ("merge without out", ("merge", "run"), ("out=DIR",)),
    ("merge into the run", ("merge", "run", "out=run/final", "force=true"), ("new directory",)),
    ("score with a policy run", ("score", "run", "good.jsonl"), ("not a reward model",)),
    ("score over a file", ("score", "run", "good.jsonl", "out=scores.jsonl"), ("exists",)),
    ("plot a folder without metrics", ("plot", "plotdir", "out=p.png"), ("no metrics.jsonl",)),
    ("plot runs and evals", ("plot", "run", "eval.json", "out=p.png"), ("not both",)),
    ("unknown command", ("trian",), ("unknown command 'trian'",)),
]


@pytest.mark.parametrize(("argv", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_and_changes_nothing(work, argv, needles):
    before = snapshot(work)
    proc = rlhf(*argv, cwd=work)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert_one_line_error(proc, *needles)
    assert snapshot(work) == before


def test_the_corpus_is_large():
    assert len(CASES) >= 30


def test_a_locked_run_dir_is_one_line_and_changes_nothing(work):
    from rlhf_cli.trainer.checkpoint import RunLock

    before = snapshot(work)
    with RunLock(work / "run"):
        after_lock = snapshot(work)
        proc = rlhf("train", *RUN_ARGS, "train.max_steps=3", "run_dir=run", "resume=auto", cwd=work)
    assert_one_line_error(proc, "being written by another rlhf process")
    assert snapshot(work) == after_lock and set(after_lock) - set(before) <= {"run/.lock"}
