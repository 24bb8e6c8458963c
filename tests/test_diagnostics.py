"""Diagnostics: one-line notes on what a curve means. Each rule on hand-made histories (a case
that shows it and one just short of it), and on runs made to show it."""

from __future__ import annotations

import json
import random

import pytest
from conftest import train_in_process

from rlhf_cli.trainer.diagnostics import notes


def rows(**series) -> list[dict]:
    n = len(next(iter(series.values())))
    return [{k: v[i] for k, v in series.items()} for i in range(n)]


def test_dpo_rejected_only():
    # The recent window is steps 4-6: rejected mean -8, a fifth of its fall 1.6.
    falling = [0.0, -2, -4, -6, -8, -10]
    quiet = rows(**{"rewards/chosen": [0, 0.1, 0, 0.2, 0.1, 0.3], "rewards/rejected": falling})
    assert "dpo_rejected_only" in notes("dpo", quiet)
    rising = rows(**{"rewards/chosen": [0, 0.5, 1, 1.5, 1.7, 1.8], "rewards/rejected": falling})
    assert notes("dpo", rising) == {}  # 1.67 > 0.2 x 8
    short = quiet[:5]
    assert notes("dpo", short) == {}  # too few steps to say
    assert notes("sft", quiet) == {}


def test_online_runaways_collapse_and_flat_groups():
    steady = rows(
        kl=[0.5, 1, 1.5, 2, 2, 2],
        response_length=[10, 12, 11, 12, 13, 12],
        entropy=[2.0, 2.0, 1.9, 1.8, 1.8, 1.7],
        zero_std_groups=[0.2, 0.1, 0.3, 0.2, 0.95, 0.9],
    )
    assert notes("grpo", steady, max_new_tokens=32) == {}
    wild = rows(
        kl=[0.5, 1, 1.5, 8, 15, 30],  # recent mean 17.7 > 10 and > 4 x 1
        response_length=[10, 12, 11, 30, 32, 32],  # 31.3 >= 0.9 x 32 and > 1.5 x 11
        entropy=[2.0, 2.0, 2.0, 0.3, 0.1, 0.05],  # recent 0.15 < 0.1 x 2.0
        zero_std_groups=[0.2, 0.1, 0.3, 0.9, 1.0, 0.95],
    )
    found = notes("rloo", wild, max_new_tokens=32)
    assert set(found) == {"kl_runaway", "length_runaway", "entropy_collapse", "equal_rewards"}
    assert "17.7 nats" in found["kl_runaway"] and "95%" in found["equal_rewards"]
    assert "length_runaway" not in notes("ppo", wild, max_new_tokens=64)  # far from the cap


def test_most_groups_without_signal_for_three_steps_is_told_so():
    """reasoning-gym arithmetic on SmolLM2 with the defaults: 75-100% of the groups had zero
    reward spread at every step; three such steps are a note, one step under 3/4 is not."""
    sparse = rows(zero_std_groups=[0.5, 0.75, 1.0, 0.75])
    found = notes("grpo", sparse, max_new_tokens=32)
    assert set(found) == {"equal_rewards"} and "83%" in found["equal_rewards"]
    assert "group_size" in found["equal_rewards"]
    assert notes("grpo", rows(zero_std_groups=[0.75, 1.0, 0.74]), max_new_tokens=32) == {}
    assert notes("grpo", rows(zero_std_groups=[1.0, 1.0]), max_new_tokens=32) == {}  # too soon


def test_a_dpo_run_that_only_pushes_rejected_down_is_told_so(tmp_path):
    """Rejected answers all the same repeated text, chosen ones varied: DPO drives the rejected
    log-probability down by ~16 nats while the chosen ones hardly move."""
    rng = random.Random(0)
    words = "apple river stone cloud green seven table music light paper window garden".split()
    data = [
        {
            "prompt": f"Tell me about thing {i}.",
            "chosen": " ".join(rng.choice(words) for _ in range(8)) + ".",
            "rejected": "No no no no no no no no no no no no.",
        }
        for i in range(48)
    ]
    path = tmp_path / "avoid.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    summary = train_in_process(
        tmp_path / "r",
        "stage=dpo",
        f"data.path={path}",
        "optim.lr=5e-3",
        "train.max_steps=8",
        "train.micro_batch_size=4",
        "data.eval_size=0",
        "quant=none",
    )
    assert summary["notes"] == "dpo_rejected_only"


def test_an_online_run_with_a_reward_that_never_differs_is_told_so(tmp_path):
    summary = train_in_process(
        tmp_path / "r",
        "stage=grpo",
        "reward.fn=rlhf_cli.rewards:keyword",
        "+reward.kwargs.word=zzzzqqq",  # never written: every reward 0
        "data.eval_size=0",
        "stage.rollout_batch_size=2",
        "stage.max_new_tokens=8",
        "train.max_steps=3",
    )
    assert summary["notes"] == "equal_rewards"


ONLINE_RUN = (
    "stage=grpo",
    "quant=none",
    "stage.kl_coef=0",
    "optim.scheduler=constant",
    "stage.rollout_batch_size=8",
    "stage.group_size=4",
    "data.eval_size=0",
)


@pytest.mark.slow
def test_an_online_run_that_collapses_onto_its_reward_is_told_so(tmp_path):
    """A share of the letter e as the reward, no KL penalty, a learning rate far too high: the
    policy leaves the reference (KL 5 -> 28 nats in 12 steps) and its sampling turns nearly
    deterministic (entropy 6.4 -> 0.5 nats per token)."""
    summary = train_in_process(
        tmp_path / "r",
        *ONLINE_RUN,
        "reward.fn=rlhf_cli.rewards:char_fraction",
        "optim.lr=1e-1",
        "stage.max_new_tokens=8",
        "train.max_steps=30",
    )
    assert summary["notes"] == "kl_runaway, entropy_collapse"
    history = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").open()]
    assert history[0]["entropy"] > 6 and history[-1]["entropy"] < 0.3


@pytest.mark.slow
def test_an_online_run_whose_answers_stop_ending_is_told_so(tmp_path):
    """A policy that ends its answers (the tiny model fine-tuned on the shipped answers: 18
    tokens, all with EOS) rewarded for length: the answers grow to stage.max_new_tokens."""
    sft = train_in_process(
        tmp_path / "sft",
        "stage=sft",
        "peft=full",
        "quant=none",
        "optim.lr=2e-3",
        "train.max_steps=300",
        "data.eval_size=0",
    )
    summary = train_in_process(
        tmp_path / "r",
        *ONLINE_RUN,
        f"model.name_or_path={sft['model']}",
        "reward.fn=rlhf_cli.rewards:length_target",
        "+reward.kwargs.words=200",
        "optim.lr=5e-3",
        "stage.max_new_tokens=48",
        "train.max_steps=12",
    )
    assert summary["notes"] == "kl_runaway, length_runaway"
    history = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").open()]
    assert history[0]["eos_fraction"] == 1.0 and history[0]["response_length"] < 20
    assert history[-1]["response_length"] > 44
