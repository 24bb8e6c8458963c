"""The online stages (ppo, grpo, rloo) on the tiny model: first-step identities, learning on a
toy verifiable reward, reward models on a shared base, resume."""

from __future__ import annotations

import pytest
from conftest import adapter, assert_resume_equals, max_diff, read_metrics, rlhf, train_in_process

from rlhf_cli import rewards
from rlhf_cli.core.errors import UserError

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
    assert res.returncode == 2 and "stage=ppo needs a reward: reward.model=" in res.stderr


@pytest.mark.parametrize("stage", ["ppo", "grpo", "rloo", "reinforce"])
def test_first_step_kl_is_zero_and_ratio_is_one(tmp_path, stage):
    train_in_process(tmp_path / "r", f"stage={stage}", CHAR, *SHORT, "train.max_steps=1")
    first = read_metrics(tmp_path / "r")[0]
    # A fresh adapter (B = 0) is the reference; sampling and update use the same log-probs.
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["policy/ratio_first"] == pytest.approx(1.0, abs=1e-5)
    assert first["policy/approx_kl_first"] == pytest.approx(0.0, abs=1e-8)
    assert 0 < first["response_length"] <= 16


LEARN = {
    # An unquantized base: 2-6x faster than 4-bit on a CPU and the same lesson (the 4-bit online
    # path trains in test_real_model). Gains (mean of the last 10 steps - the first 5) over
    # seeds 42, 1, 2: ppo +0.19 +0.13 +0.16 in 40 steps (lr 2e-3 learned too little on some
    # seeds); grpo +0.50 +0.49 +0.24, rloo +0.52 +0.50 +0.24, reinforce +0.51 +0.35 +0.33 in 20.
    "ppo": (
        "train.max_steps=40",
        "optim.lr=5e-3",
        "stage.epochs=2",
        "stage.normalize_rewards=true",
        "stage.kl_coef=0.01",
    ),
    "grpo": ("train.max_steps=20", "optim.lr=5e-3"),
    "rloo": (
        "train.max_steps=20",
        "optim.lr=5e-3",
        "stage.normalize_rewards=true",
        "stage.kl_coef=0.01",
    ),
    "reinforce": (
        "train.max_steps=20",
        "optim.lr=5e-3",
        "stage.group_size=4",
        "stage.normalize_rewards=true",
        "stage.kl_coef=0.01",
    ),
}


def assert_reward_rises(run_dir, stage: str, *extra: str) -> None:
    """LEARN[stage] on the toy task: the mean score of the last 10 steps beats that of the
    first 5 by more than 0.1."""
    gain, scores = reward_gain(run_dir, stage, *extra)
    assert gain > 0.1, (stage, scores)


def reward_gain(run_dir, stage: str, *extra: str) -> tuple[float, list[float]]:
    """LEARN[stage] on the toy task: (the mean score of the last 10 steps - that of the first
    5, the scores)."""
    train_in_process(
        run_dir,
        f"stage={stage}",
        CHAR,
        "quant=none",
        "data.eval_size=0",
        "stage.max_new_tokens=16",
        "train.save_every=0",
        *LEARN[stage],
        *extra,
    )
    scores = [r["score"] for r in read_metrics(run_dir)]
    return sum(scores[-10:]) / 10 - sum(scores[:5]) / 5, scores


@pytest.mark.parametrize("stage", ["ppo", "grpo", "rloo", "reinforce"])
def test_mean_reward_rises_on_a_toy_task(tmp_path, stage):
    """Reward = share of the letter 'e' in the response: the policy must learn to prefer tokens
    that contain it. The untrained tiny model scores about 0.1."""
    assert_reward_rises(tmp_path / "r", stage)


@pytest.mark.parametrize("stage", ["ppo", "grpo", "reinforce"])
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
    keys = ("score", "kl", "loss", "kl_coef") + (("baseline",) if stage == "reinforce" else ())
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
    # NaN is written as null: a type check, not r == r (None == None)
    assert len(metrics) == 2 and all(isinstance(r["score"], float) for r in metrics)
    final = tmp_path / "ppo" / "final"
    assert (final / "value_head.safetensors").is_file()
    assert not (final / "reward").exists() and not (final / "reference").exists()
    # The reward model as one term of a weighted sum with a function.
    train_in_process(
        tmp_path / "mixed",
        "stage=ppo",
        CHAR,
        f"reward.model={tmp_path / 'rm'}",
        "reward.weights=[2.0,0.5]",
        *SHORT,
        "train.max_steps=1",
    )
    row = read_metrics(tmp_path / "mixed")[0]
    assert row["rewards/model"] != 0 and row["rewards/char_fraction"] > 0
    expected = 2.0 * row["rewards/char_fraction"] + 0.5 * row["rewards/model"]
    assert row["score"] == pytest.approx(expected, rel=1e-5)


def test_rollout_masks_stop_at_eos():
    import torch

    from rlhf_cli.model.forward import position_ids

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


@pytest.mark.parametrize(
    "variant",
    [
        ("stage.loss_agg=token_mean",),
        ("stage.loss_agg=seq_mean_token_mean",),
        ("stage.loss_agg=seq_sum_norm", "stage.scale_rewards=false"),  # Dr. GRPO
        ("stage.importance_level=sequence", "stage.epochs=2"),  # GSPO
        ("stage.clip_eps_high=0.28", "stage.epochs=2"),  # DAPO's clip-higher
    ],
    ids=["token_mean", "seq_mean_token_mean", "dr_grpo", "gspo", "clip_higher"],
)
def test_grpo_variants_accumulate_to_the_big_batch_loss(tmp_path, variant):
    """One minibatch of 8 responses as 1 micro-batch of 8 or 8 of 1: the same rollouts, so the
    same loss, gradient norm and update, whatever the aggregation (a micro-batch divided by
    its own weight instead of the minibatch's would be off by up to 8x)."""
    args = (
        "stage=grpo",
        CHAR,
        "data.eval_size=0",
        "stage.rollout_batch_size=4",
        "stage.group_size=2",
        "stage.minibatch_size=8",
        "stage.max_new_tokens=16",
        "train.max_steps=2",
        "optim.lr=5e-3",
        "quant=none",  # the 4-bit matmul takes another kernel for a batch of 1
        *variant,
    )
    train_in_process(tmp_path / "big", *args, "train.micro_batch_size=8")
    train_in_process(tmp_path / "small", *args, "train.micro_batch_size=1")
    big, small = read_metrics(tmp_path / "big"), read_metrics(tmp_path / "small")
    for a, b in zip(big, small, strict=True):
        assert a["score"] == b["score"]  # the same rollouts
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert big[0]["grad_norm"] > 0
    # Adam divides by sqrt(v): summation-order noise reaches ~1e-5 in two steps; a micro-batch
    # weighed wrongly moves the adapter by ~1e-3.
    assert max_diff(adapter(tmp_path / "big"), adapter(tmp_path / "small")) < 1e-4


def test_loss_aggregations_weigh_short_and_long_responses_differently(tmp_path):
    """The same rollouts, three aggregations of the first update's loss sum(-A) (ratio 1, no
    KL): each response's token mean is -A_i, and group advantages sum to 0, so the published
    GRPO mean is 0; token_mean is S / T and Dr. GRPO's S / (R x 12), so Dr. GRPO x 12 equals
    token_mean x the mean response length T / R."""
    args = (
        "stage=grpo",
        CHAR,
        "data.eval_size=0",
        "stage.rollout_batch_size=4",
        "stage.max_new_tokens=12",
        "train.max_steps=1",
        "stage.kl_coef=0",
    )
    losses = {}
    for mode in ("token_mean", "seq_mean_token_mean", "seq_sum_norm"):
        train_in_process(tmp_path / mode, *args, f"stage.loss_agg={mode}")
        losses[mode] = read_metrics(tmp_path / mode)[0]["loss"]
    length = read_metrics(tmp_path / "token_mean")[0]["response_length"]
    assert length < 12  # some responses ended early: the aggregations differ
    assert losses["seq_mean_token_mean"] == pytest.approx(0.0, abs=1e-6)
    assert abs(losses["token_mean"]) > 1e-3, losses
    assert losses["seq_sum_norm"] * 12 == pytest.approx(losses["token_mean"] * length, rel=1e-4)


def test_online_variant_options_are_validated(tmp_path):
    res = rlhf("train", "stage=grpo", CHAR, "stage.clip_eps_high=0.1", cwd=tmp_path)
    assert res.returncode == 2 and "stage.clip_eps_high=0.1 must be >= stage.clip_eps" in res.stderr
    res = rlhf("train", "stage=grpo", CHAR, "stage.loss_agg=mean", cwd=tmp_path)
    assert res.returncode == 2 and "stage.loss_agg" in res.stderr
    res = rlhf("train", "stage=ppo", CHAR, "stage.importance_level=seq", cwd=tmp_path)
    assert res.returncode == 2 and "stage.importance_level" in res.stderr


def test_reinforce_baselines_by_hand():
    """moving: the first batch (mean 2) is its own baseline, then b = 0.9 x 2 + 0.1 x 2 = 2;
    the next batch (mean 6) gets b = 2 and leaves 0.9 x 2 + 0.1 x 6 = 2.4. batch: b = 6."""
    import torch

    from rlhf_cli.stages.reinforce import reinforce_advantages

    adv, b = reinforce_advantages(torch.tensor([1.0, 3.0]), None, "moving", 0.9, 2.0)
    assert adv.tolist() == [-1.0, 1.0] and b == pytest.approx(2.0)
    adv, b = reinforce_advantages(torch.tensor([5.0, 7.0]), b, "moving", 0.9, 6.0)
    assert adv.tolist() == pytest.approx([3.0, 5.0]) and b == pytest.approx(2.4)
    adv, b = reinforce_advantages(torch.tensor([5.0, 7.0]), 2.4, "batch", 0.9, 6.0)
    assert adv.tolist() == [-1.0, 1.0] and b == 6.0


def test_zero_std_group_share_by_hand():
    import torch

    from rlhf_cli.rollout.sampler import zero_std

    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert zero_std(scores, 2).tolist() == [True, False, True]  # [1,1], [0,1], [0.5,0.5]
    assert zero_std(scores, 3).tolist() == [False, False]
    assert zero_std(scores, 6).tolist() == [False]


def test_mask_truncated_leaves_cut_off_responses_out_of_the_loss(tmp_path):
    """4 new tokens: most of the tiny model's responses are cut off. With
    stage.mask_truncated=true only the ones that ended count in the policy loss: the same
    rollouts give another loss and gradient, and none at all where nothing ended."""
    args = (
        "stage=grpo",
        CHAR,
        *SHORT[:1],
        "stage.max_new_tokens=4",
        "stage.rollout_batch_size=4",
        "train.max_steps=1",
    )
    train_in_process(tmp_path / "masked", *args, "stage.mask_truncated=true")
    train_in_process(tmp_path / "plain", *args)
    masked, plain = read_metrics(tmp_path / "masked")[0], read_metrics(tmp_path / "plain")[0]
    assert masked["score"] == plain["score"]  # the same rollouts
    assert plain["eos_fraction"] < 0.5 and plain["grad_norm"] > 0
    assert masked["grad_norm"] != pytest.approx(plain["grad_norm"], rel=1e-3)
    if masked["eos_fraction"] == 0:
        assert masked["loss"] == 0.0 and masked["grad_norm"] == 0.0
    else:
        assert masked["grad_norm"] > 0


# A reward module in the working directory, as a user writes one (found by every launcher).
MY_REWARDS = '''
import os
from pathlib import Path


def flat_or_length(prompts, responses):
    """0 for every response to a prompt that says 'flat' (a group with nothing to learn), else
    10 + the response's length in characters / 1000."""
    return [0.0 if "flat" in p else 10 + len(r) / 1000 for p, r in zip(prompts, responses)]


def length(prompts, responses, scale=1.0):
    return [scale * len(r) for r in responses]


def words(prompts, responses):
    return [float(len(r.split())) for r in responses]


def first_is_nan(prompts, responses):
    return [float("nan")] + [len(r) / 100 for r in responses[1:]]


def model(prompts, responses):
    return [1.0 for r in responses]


f = f_3 = model


def fails_on_call_2(prompts, responses):
    """len(r) / 100, but raises on its second call (the count kept in calls.txt)."""
    calls = Path("calls.txt")
    n = int(calls.read_text()) + 1 if calls.exists() else 1
    calls.write_text(str(n))
    if n == 2:
        raise ValueError("the grader is down")
    return [len(r) / 100 for r in responses]
'''


@pytest.fixture
def in_user_dir(tmp_path, monkeypatch):
    """tmp_path as the working directory, with my_rewards.py and 6 prompts in it."""
    (tmp_path / "my_rewards.py").write_text(MY_REWARDS)
    words = ("flat a", "flat b", "tell c", "flat d", "tell e", "tell f")
    (tmp_path / "prompts.jsonl").write_text(
        "".join(f'{{"prompt": "{w}: say something"}}\n' for w in words)
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


DYNAMIC = (
    "stage=grpo",
    "reward.fn=my_rewards:flat_or_length",
    "data.path=prompts.jsonl",
    "data.eval_size=0",
    "train.shuffle=false",
    "stage.rollout_batch_size=2",
    "stage.group_size=4",
    "stage.max_new_tokens=8",
    "train.max_steps=1",
)


def test_dynamic_sampling_fills_the_batch_with_groups_that_differ(in_user_dir):
    """Prompts in order flat, flat | tell, flat | tell, tell; 2 groups a batch. Plain: the
    batch is the first two (both flat, score 0). Dynamic, 3 tries: the tries are sampled
    until two groups differ: tell c and tell e, score 10 + length/1000, 3 of the 6 sampled
    groups flat. 2 tries: only tell c differs; the batch is filled with the first flat group
    (score (0 + 10.x) / 2)."""
    train_in_process(in_user_dir / "plain", *DYNAMIC)
    plain = read_metrics(in_user_dir / "plain")[0]
    assert plain["score"] == 0.0 and plain["zero_std_groups"] == 1.0
    assert "dynamic/tries" not in plain

    train_in_process(in_user_dir / "dyn3", *DYNAMIC, "stage.dynamic_sampling=true")
    dyn = read_metrics(in_user_dir / "dyn3")[0]
    assert dyn["dynamic/tries"] == 3 and dyn["dynamic/filled"] == 0.0
    assert dyn["zero_std_groups"] == 0.5
    assert 10 < dyn["score"] < 10.1 and dyn["score_std"] > 0 and dyn["grad_norm"] > 0

    train_in_process(
        in_user_dir / "dyn2",
        *DYNAMIC,
        "stage.dynamic_sampling=true",
        "stage.dynamic_sampling_max_tries=2",
    )
    dyn = read_metrics(in_user_dir / "dyn2")[0]
    assert dyn["dynamic/tries"] == 2 and dyn["dynamic/filled"] == 0.5
    assert dyn["zero_std_groups"] == 0.75
    assert 5 < dyn["score"] < 5.05


def test_dynamic_sampling_needs_groups(tmp_path):
    res = rlhf("train", "stage=ppo", CHAR, "stage.dynamic_sampling=true", cwd=tmp_path)
    assert res.returncode == 2
    assert "stage.dynamic_sampling" in res.stderr and "group_size >= 2" in res.stderr


def test_join_groups_repads_prompts_and_responses():
    """Two rollouts (prompt widths 2 and 3, response widths 2 and 3); group size 1; picking
    row 1 of the second and row 0 of the first left-pads the picked prompts to the widest
    picked (2) and right-pads responses to 3 (pad 0)."""
    import torch

    from rlhf_cli.rollout.batch import Rollout, join_groups

    def rollout(prompts, responses, width):
        ids, attn, mask = [], [], []
        for p, r in zip(prompts, responses):
            left, right = width - len(p), max(map(len, responses)) - len(r)
            ids.append([0] * left + p + r + [0] * right)
            attn.append([0] * left + [1] * (len(p) + len(r)) + [0] * right)
            mask.append([True] * len(r) + [False] * right)
        return Rollout(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(attn),
            prompt_len=width,
            mask=torch.tensor(mask),
            ended=torch.tensor([True] * len(prompts)),
            prompts=prompts,
            prompt_texts=[str(p) for p in prompts],
            responses=responses,
            columns=[{"answer": p[0]} for p in prompts],
        )

    a = rollout([[5, 6], [7]], [[8, 9], [10]], width=2)
    b = rollout([[1, 2, 3], [4]], [[11], [12, 13, 14]], width=3)
    joined = join_groups([a, b], [(1, 1), (0, 0)], 1, pad=0)
    assert joined.prompt_len == 2
    assert joined.input_ids.tolist() == [[0, 4, 12, 13, 14], [5, 6, 8, 9, 0]]
    assert joined.attention_mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert joined.mask.tolist() == [[True, True, True], [True, True, False]]
    assert joined.prompts == [[4], [5, 6]] and joined.responses == [[12, 13, 14], [8, 9]]
    assert joined.columns == [{"answer": 4}, {"answer": 5}]


def test_several_weighted_rewards_are_summed_and_logged(in_user_dir):
    """score = 2 x length + 0.5 x words, each logged; scale goes to the function that takes it."""
    train_in_process(
        in_user_dir / "r",
        "stage=grpo",
        "reward.fns=[my_rewards:length,my_rewards:words]",
        "reward.weights=[2.0,0.5]",
        "+reward.kwargs.scale=0.1",
        "data.path=prompts.jsonl",
        "data.eval_size=2",
        "train.eval_every=1",
        "stage.rollout_batch_size=2",
        "stage.max_new_tokens=8",
        "train.max_steps=2",
    )
    for row in read_metrics(in_user_dir / "r") + read_metrics(in_user_dir / "r", "eval"):
        length, words = row["rewards/length"], row["rewards/words"]
        assert length > 0 and words > 0
        assert row["score"] == pytest.approx(2.0 * length + 0.5 * words, rel=1e-5)
    row = read_metrics(in_user_dir / "r")[0]
    assert row["rewards/length_std"] > 0 and "rewards/words_std" in row
    # length got scale=0.1: a 8-token response of the tiny model is under 100 characters
    assert row["rewards/length"] < 10


def test_reward_term_names_never_collide(in_user_dir):
    """Each term gets its own rewards/<name>: "model" is the reward model's (a function named
    model is model_2), and a repeated name counts up to the first free one (f, f_3, f gave an
    endless loop: the count of names starting with f pointed at f_3, which was taken)."""
    import signal

    from rlhf_cli.config import RewardConfig

    def too_long(*_):
        raise TimeoutError("reward_terms did not return")

    cfg = RewardConfig(
        fns=[f"my_rewards:{n}" for n in ("model", "f", "f_3", "f", "f")], model="runs/rm"
    )
    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(20)
    try:
        terms = rewards.reward_terms(cfg)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert [t.name for t in terms] == ["model_2", "f", "f_3", "f_2", "f_4", "model"]
    assert [t.spec for t in terms][-1] == "runs/rm"


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (("reward.fns=[my_rewards:length]", "reward.weights=[1.0,2.0]"), "2 values for 1 reward"),
        (("reward.fn=my_rewards:length", "reward.fns=[my_rewards:words]"), "both set"),
        (("reward.fns=[my_rewards]",), "must look like package.module:function"),
        (("reward.fns=[my_rewards:words]", "+reward.kwargs.scale=2"), "reward.kwargs.scale"),
        (("reward.fns=[my_rewards:nope]",), "has no function 'nope'"),
    ],
)
def test_bad_reward_settings_are_one_line(in_user_dir, overrides, needle):
    res = rlhf("train", "stage=grpo", "data.path=prompts.jsonl", *overrides, cwd=in_user_dir)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert not (in_user_dir / "runs").exists() or not any((in_user_dir / "runs").rglob("*.pt"))


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_non_finite_rewards_are_dropped_and_counted(in_user_dir, stage):
    """One NaN reward per batch: counted, left out of the loss; the update and the running
    reward moments stay finite (whitening or group statistics would spread it)."""
    import torch

    train_in_process(
        in_user_dir / "r",
        f"stage={stage}",
        "reward.fn=my_rewards:first_is_nan",
        "stage.normalize_rewards=true",
        "data.path=prompts.jsonl",
        "data.eval_size=0",
        "stage.rollout_batch_size=2",
        "stage.group_size=2",
        "stage.max_new_tokens=8",
        "train.max_steps=2",
    )
    rows = read_metrics(in_user_dir / "r")
    assert [r["nonfinite_rewards"] for r in rows] == [1.0, 1.0]
    assert all(r["skipped"] == 0 and r["grad_norm"] > 0 for r in rows)
    # not NaN (which metrics.jsonl writes as null)
    assert all(isinstance(r["loss"], float) and isinstance(r["score"], float) for r in rows)
    state = torch.load(in_user_dir / "r" / "final" / "trainer_state.pt", weights_only=True)
    moments = state["stage"]["moments"]
    assert moments["count"] == 6  # 3 finite rewards a step
    assert all(v == v for v in moments.values())


def test_a_reward_function_that_raises_saves_and_resumes(in_user_dir):
    """The function raises at step 2: one line naming it, exit 2, a checkpoint at step 1;
    the resume runs steps 2-3 only and ends where an uninterrupted run ends."""
    args = (
        "stage=grpo",
        "data.path=prompts.jsonl",
        "data.eval_size=0",
        "stage.rollout_batch_size=2",
        "stage.max_new_tokens=8",
        "train.max_steps=3",
        "train.save_every=0",
        "quant=none",
    )
    res = rlhf(  # the installed script: it finds my_rewards.py in the working directory too
        "train",
        *args,
        "reward.fn=my_rewards:fails_on_call_2",
        "run_dir=r",
        cwd=in_user_dir,
        script=True,
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert "my_rewards:fails_on_call_2 raised ValueError: the grader is down" in res.stderr
    assert [r["step"] for r in read_metrics(in_user_dir / "r")] == [1]
    assert (in_user_dir / "r" / "checkpoints" / "step-000001").is_dir()
    res = rlhf(
        "train",
        *args,
        "reward.fn=my_rewards:fails_on_call_2",
        "run_dir=r",
        "resume=auto",
        cwd=in_user_dir,
    )
    assert res.returncode == 0, res.stderr
    assert [r["step"] for r in read_metrics(in_user_dir / "r")] == [1, 2, 3]
    # Calls 1 (step 1), 2 (raised), then 3 and 4: the resume sampled steps 2 and 3 only.
    assert (in_user_dir / "calls.txt").read_text() == "4"
    (in_user_dir / "calls.txt").write_text("2")  # it raises on call 2 only
    train_in_process(in_user_dir / "full", *args, "reward.fn=my_rewards:fails_on_call_2")
    full, resumed = read_metrics(in_user_dir / "full"), read_metrics(in_user_dir / "r")
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full], abs=1e-6)
    assert max_diff(adapter(in_user_dir / "full"), adapter(in_user_dir / "r")) < 1e-6
