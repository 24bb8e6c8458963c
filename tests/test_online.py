"""The online stages (ppo, grpo, rloo) on the tiny model: first-step identities, learning on a
toy verifiable reward, reward models on a shared base, resume."""

from __future__ import annotations

import pytest
from conftest import assert_resume_equals, read_metrics, rlhf, train_in_process

from rlhf_cli import rewards
from rlhf_cli.errors import UserError

CHAR = "reward.fn=rlhf_cli.rewards:char_fraction"
SHORT = ("data.eval_size=0", "stage.max_new_tokens=16", "stage.rollout_batch_size=8")


def test_reward_functions_by_hand():
    assert rewards.char_fraction([""] * 3, ["eee", "abcd", ""], chars="e") == [1.0, 0.0, 0.0]
    assert rewards.char_fraction(["p"], ["sea"], chars="ae") == [pytest.approx(2 / 3)]
    prompts = ["What is 12 + 30?", "Compute 7 x 6.", "5 - 9 = ?", "no task here"]
    answers = ["It is 42.", "42", "The answer is -4", "42"]
    assert rewards.arithmetic_exact_match(prompts, answers) == [1.0, 1.0, 1.0, 0.0]
    assert rewards.arithmetic_exact_match(["1 + 1"], ["3"]) == [0.0]
    assert rewards.keyword(["p", "p"], ["Please do", "no"], word="please") == [1.0, 0.0]
    assert rewards.length_target(["p"], ["a b c d"], words=2) == [-1.0]
    assert rewards.concise(["p"] * 3, ["a b c", "a b c d", "  "], words=3) == [1.0, 0.0, 0.0]


def test_bad_reward_fn_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="cannot import 'nope.mod'"):
        train_in_process(tmp_path / "r", "stage=grpo", "reward.fn=nope.mod:f", *SHORT)
    with pytest.raises(UserError, match="has no function 'missing'"):
        train_in_process(
            tmp_path / "r2", "stage=grpo", "reward.fn=rlhf_cli.rewards:missing", *SHORT
        )
    res = rlhf("train", "stage=ppo", cwd=tmp_path)  # no reward source at all
    assert res.returncode == 2 and "needs exactly one reward source" in res.stderr


@pytest.mark.parametrize("stage", ["ppo", "grpo", "rloo"])
def test_first_step_kl_is_zero_and_ratio_is_one(tmp_path, stage):
    train_in_process(tmp_path / "r", f"stage={stage}", CHAR, *SHORT, "train.max_steps=1")
    first = read_metrics(tmp_path / "r")[0]
    # A fresh adapter (B = 0) is the reference; sampling and update use the same log-probs.
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["policy/ratio_first"] == pytest.approx(1.0, abs=1e-5)
    assert first["policy/approx_kl_first"] == pytest.approx(0.0, abs=1e-8)
    assert 0 < first["response_length"] <= 16


LEARN = {
    "ppo": (
        "optim.lr=2e-3",
        "stage.epochs=2",
        "stage.normalize_rewards=true",
        "stage.kl_coef=0.01",
    ),
    "grpo": ("optim.lr=5e-3",),
    "rloo": ("optim.lr=5e-3", "stage.normalize_rewards=true", "stage.kl_coef=0.01"),
}


@pytest.mark.parametrize("stage", ["ppo", "grpo", "rloo"])
def test_mean_reward_rises_on_a_toy_task(tmp_path, stage):
    """Reward = share of the letter 'e' in the response: the policy must learn to prefer tokens
    that contain it. The untrained tiny model scores about 0.1."""
    train_in_process(
        tmp_path / "r",
        f"stage={stage}",
        CHAR,
        "data.eval_size=0",
        "stage.max_new_tokens=16",
        "train.max_steps=40",
        "train.save_every=0",
        *LEARN[stage],
    )
    scores = [r["score"] for r in read_metrics(tmp_path / "r")]
    start, end = sum(scores[:5]) / 5, sum(scores[-10:]) / 10
    assert end > start + 0.1, (stage, scores)


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_online_resume_equals_uninterrupted(tmp_path, stage):
    args = (
        f"stage={stage}",
        CHAR,
        *SHORT,
        "train.max_steps=4",
        "train.save_every=2",
        "train.keep_last=3",
        "optim.lr=2e-3",
        "stage.adaptive_kl=true" if stage == "ppo" else "stage.kl_coef=0.05",
    )
    files = ("value_head.safetensors",) if stage == "ppo" else ()
    keys = ("score", "kl", "loss", "kl_coef")
    full, _ = assert_resume_equals(tmp_path, args, last_step=2, keys=keys, files=files)
    if stage == "ppo":
        coefs = [r["kl_coef"] for r in full]
        assert coefs[-1] != coefs[0]  # the adaptive controller moved it


def test_ppo_with_a_reward_model_on_the_shared_base(tmp_path):
    train_in_process(
        tmp_path / "rm",
        "stage=rm",
        "data.eval_size=0",
        "train.max_steps=3",
        "train.micro_batch_size=4",
    )
    res = rlhf(
        "train",
        "stage=ppo",
        f"reward.model={tmp_path / 'rm'}",
        *SHORT,
        "train.max_steps=2",
        f"run_dir={tmp_path / 'ppo'}",
    )
    assert res.returncode == 0, res.stderr
    assert "as a second adapter on the shared base" in res.stderr
    metrics = read_metrics(tmp_path / "ppo")
    assert len(metrics) == 2 and all(r["score"] == r["score"] for r in metrics)  # finite
    final = tmp_path / "ppo" / "final"
    assert (final / "value_head.safetensors").is_file()
    assert not (final / "reward").exists() and not (final / "reference").exists()


def test_rollout_masks_stop_at_eos():
    import torch

    from rlhf_cli.online import position_ids

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
