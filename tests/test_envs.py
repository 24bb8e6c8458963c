"""The ecosystem's task libraries as sources: reasoning-gym's rows and scorer, pass@k."""

from __future__ import annotations

import pytest
from conftest import train_in_process

from rlhf_cli.config import ReasoningGymConfig
from rlhf_cli.core.errors import UserError
from rlhf_cli.envs import reasoning_gym as RG
from rlhf_cli.losses import pass_at_k, pass_ks

rg = pytest.importorskip("reasoning_gym")


def test_pass_at_k_by_hand():
    """1 - C(n-c, k) / C(n, k): of 4 samples one passes; 5 samples, two pass."""
    assert pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(4, 1, 2) == 1 - 3 / 6  # C(3,2)=3 of C(4,2)=6 pairs miss it
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # C(3,2)=3, C(5,2)=10
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 is the pass rate
    assert pass_ks(4) == [1, 2, 4] and pass_ks(6) == [1, 2, 4, 6] and pass_ks(1) == [1]
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_rows_are_the_generators_and_a_seed_repeats_them():
    got = RG.rows("reasoning_gym:leg_counting", ReasoningGymConfig(size=5, seed=3))
    want = list(rg.create_dataset("leg_counting", size=5, seed=3))
    assert [r["prompt"] for r in got] == [e["question"] for e in want]
    assert [r["answer"] for r in got] == [e["answer"] for e in want]
    assert {r["task"] for r in got} == {"leg_counting"}
    again = RG.rows("reasoning_gym:leg_counting", ReasoningGymConfig(size=5, seed=3))
    other = RG.rows("reasoning_gym:leg_counting", ReasoningGymConfig(size=5, seed=4))
    assert again == got and [r["prompt"] for r in other] != [r["prompt"] for r in got]
    # a generator setting reaches the generator: 2 animals a question at most
    few = RG.rows(
        "reasoning_gym:leg_counting",
        ReasoningGymConfig(size=4, config={"leg_counting": {"min_animals": 2, "max_animals": 2}}),
    )
    assert {r["metadata"]["num_animals"] for r in few} == {2}


def test_each_response_is_scored_by_its_own_rows_task_and_answer():
    rows = RG.rows("reasoning_gym:leg_counting+spell_backward", ReasoningGymConfig(size=12, seed=1))
    tasks = [r["task"] for r in rows]
    assert set(tasks) == {"leg_counting", "spell_backward"}  # a mixture keeps each row's task
    assert tasks == [r["metadata"]["source_dataset"] for r in rows]
    prompts, answers, meta = ([r[k] for r in rows] for k in ("prompt", "answer", "metadata"))
    forms = [f"<answer>{a}</answer>" if i % 3 == 0 else
             f"So it is \\boxed{{{a}}}." if i % 3 == 1 else f"Let me think.\n{a}\n"
             for i, a in enumerate(answers)]  # fmt: skip
    assert RG.score(prompts, forms, answers, meta) == [1.0] * 12
    # every answer one row off: wrong for its own row (the scorer of that row's task)
    shifted = answers[1:] + answers[:1]
    want = [float(a == b) for a, b in zip(shifted, answers)]
    assert RG.score(prompts, [f"<answer>{a}</answer>" for a in shifted], answers, meta) == want
    assert want.count(0.0) >= 10


def test_partial_credit_or_all_or_nothing():
    """countdown gives 0.01 for an answer that is no expression; partial=false counts only a full score."""
    (row,) = RG.rows("reasoning_gym:countdown", ReasoningGymConfig(size=1, seed=0))
    args = ([row["prompt"]] * 2, ["<answer>zzz</answer>", row["answer"]])
    cols = ([row["answer"]] * 2, [row["metadata"]] * 2)
    assert RG.score(*args, *cols) == [0.01, 1.0]
    assert RG.score(*args, *cols, partial=False) == [0.0, 1.0]


def test_final_answer_tag_then_boxed_then_last_line():
    assert RG.final_answer("x <answer>4</answer> then <answer> 5 </answer>") == "5"
    assert RG.final_answer("it is \\boxed{\\frac{1}{2}} so") == "\\frac{1}{2}"
    assert RG.final_answer("first\n\n  last one  \n") == "last one"
    assert RG.final_answer("") == ""


@pytest.mark.parametrize(
    "path, cfg, message",
    [
        ("reasoning_gym:", ReasoningGymConfig(), "no task named"),
        ("reasoning_gym:leg_countin", ReasoningGymConfig(), "no such task: leg_countin"),
        ("reasoning_gym:leg_counting+countdown", ReasoningGymConfig(weights=[1.0]), "1 values"),
        ("reasoning_gym:countdown", ReasoningGymConfig(config={"chain_sum": {}}), "chain_sum"),
        ("reasoning_gym:countdown", ReasoningGymConfig(config={"countdown": {"nope": 1}}), "nope"),
    ],
)
def test_bad_settings_are_one_line(path, cfg, message):
    with pytest.raises(UserError, match=message):
        RG.rows(path, cfg)


def first_leg_of_four(prompts, responses, task):
    """Passes the first response of each group of four, on leg_counting rows only."""
    return [float(i % 4 == 0 and t == "leg_counting") for i, t in enumerate(task)]


@pytest.mark.slow
def test_eval_reports_pass_at_k_overall_and_per_task(tmp_path):
    """GRPO on a reasoning-gym mixture with train.eval_n=4, scored so that exactly one of each
    prompt's 4 eval samples passes on leg_counting and none on spell_backward: pass@1, @2, @4 are
    1/4, 1/2, 1 there and 0 on the other task; overall they are the leg_counting share times
    those."""
    summary = train_in_process(
        tmp_path / "run",
        "stage=grpo",
        "data.path=reasoning_gym:leg_counting+spell_backward",
        "data.reasoning_gym.size=24",
        "data.eval_size=8",
        "reward.fn=test_envs:first_leg_of_four",
        "train.eval_n=4",
        "stage.group_size=2",
        "stage.rollout_batch_size=4",
        "stage.max_new_tokens=4",
        "train.max_steps=1",
    )
    assert summary["eval pass@1/leg_counting"] == 0.25
    assert summary["eval pass@2/leg_counting"] == 0.5
    assert summary["eval pass@4/leg_counting"] == 1.0
    assert summary["eval score/leg_counting"] == 0.25  # mean@4
    assert [summary[f"eval pass@{k}/spell_backward"] for k in (1, 2, 4)] == [0.0, 0.0, 0.0]
    share = summary["eval pass@4"]
    assert 0 < share < 1
    assert summary["eval pass@1"] == pytest.approx(share / 4)
    assert summary["eval pass@2"] == pytest.approx(share / 2)


def test_rlhf_eval_reports_pass_at_k_per_prompt_and_task():
    from rlhf_cli.tools.evaluate import pass_rates

    examples = [{"columns": {"task": t}} for t in ("a", "a", "b", "b", "a", "a")]
    rates = pass_rates(examples, [1.0, 0.0, 0.0, 0.0, 1.0, 1.0], n=2)
    assert rates == {
        "pass@1": (0.5 + 0 + 1) / 3,
        "pass@2": (1 + 0 + 1) / 3,
        "pass@1/a": 0.75,
        "pass@2/a": 1.0,
        "pass@1/b": 0.0,
        "pass@2/b": 0.0,
    }


class NumberGame:
    """Guess a number from 0 to 6: reset() writes the opening message from the row's seed (a
    seed row has no prompt); the answer scores 1 when it names the number."""

    def reset(self, row):
        self.target = row["seed"] % 7
        return f"Game {row['seed']}: guess my number from 0 to 6."

    def step(self, text):
        return None, float(str(self.target) in text), True


def test_an_environment_writes_the_first_message_and_a_group_shares_it(tmp_path):
    from conftest import compose

    from rlhf_cli.data.examples import Renderer
    from rlhf_cli.model.load import load_tokenizer
    from rlhf_cli.multiturn import EnvFactory, opening_ids, sample_episodes
    from rlhf_cli.rollout.batch import Reply

    tok = load_tokenizer(compose("stage=grpo", "stage.env=test_envs:NumberGame").model)
    renderer = Renderer(tok)
    rows = [{"prompt_ids": [], "prompt_text": "", "columns": {"seed": s}} for s in (3, 3, 5, 5)]
    seen = []

    def generate(contexts):
        seen.extend(contexts)
        return [Reply(ids=[7, tok.eos_token_id], ended=True, logps=None) for _ in contexts]

    episodes = sample_episodes(generate, rows, EnvFactory("game", NumberGame), renderer, tok, 2)
    want = [
        opening_ids(
            renderer, {"role": "user", "content": f"Game {s}: guess my number from 0 to 6."}
        )
        for s in (3, 3, 5, 5)
    ]
    assert [e.prompt_ids for e in episodes] == want and want[0] != want[2]
    assert seen == [w + [] for w in want]  # the policy answered the environment's message
    assert [e.prompt_text for e in episodes][1:3] == [
        "Game 3: guess my number from 0 to 6.",
        "Game 5: guess my number from 0 to 6.",
    ]
    cut = sample_episodes(
        generate, rows[:1], EnvFactory("game", NumberGame), renderer, tok, 1, max_prompt_length=3
    )
    assert cut[0].prompt_ids == want[0][-3:]  # the end kept, as for a data prompt


def opens_with_the_game(prompts, responses):
    """1 for a prompt the environment wrote: the rollout's prompts are the games' messages."""
    return [float(p.startswith("Game ")) for p in prompts]


GAME = (
    "stage=grpo",
    "reward.fn=test_envs:opens_with_the_game",
    "data.path=episodes:40",
    "data.eval_size=8",
    "stage.env=test_envs:NumberGame",
    "stage.max_turns=1",
    "stage.group_size=2",
    "stage.rollout_batch_size=4",
    "stage.max_new_tokens=4",
    "train.max_steps=3",
    "train.save_every=1",
    "train.keep_last=5",
)


@pytest.mark.slow
def test_a_run_on_an_environments_own_prompts_resumes_exactly(tmp_path):
    from conftest import assert_resume_equals

    full, _ = assert_resume_equals(tmp_path, GAME, last_step=1, keys=("score", "loss", "kl"))
    train = [r for r in full if "score" in r and "loss" in r]
    assert len(train) == 3
    # the reward function saw the games' messages as prompts (1 each) beside the game's reward
    assert all(r["score"] >= 1.0 for r in train)


@pytest.mark.slow
def test_seed_rows_without_an_environment_or_for_sft_are_one_line(tmp_path):
    from conftest import rlhf

    out = rlhf(
        "train",
        "stage=grpo",
        "data.path=episodes:4",
        "data.eval_size=0",
        "reward.fn=rlhf_cli.rewards:concise",
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "need an environment that writes the first message" in out.stderr
    out = rlhf("train", "stage=sft", "data.path=episodes:4", cwd=tmp_path)
    assert out.returncode == 2 and "seed rows only start an environment" in out.stderr
    out = rlhf("train", "stage=sft", "data.path=episodes:x", cwd=tmp_path)
    assert out.returncode == 2 and "episodes:N with N a whole number" in out.stderr
    assert "Traceback" not in out.stderr


def test_stop_rules_read_and_refuse():
    from conftest import compose

    from rlhf_cli.config import rule_met, stop_rule

    def rule(*overrides):
        return stop_rule(compose("stage=sft", *overrides).train)

    assert rule() is None
    assert rule("train.stop_metric=eval/pass@1", "train.stop_above=0.6") == (
        True,
        "pass@1",
        ">=",
        0.6,
    )
    low = rule("train.stop_metric=loss", "train.stop_below=7")
    assert low == (False, "loss", "<=", 7.0)
    assert rule_met(low, {"loss": 6.9}) == 6.9 and rule_met(low, {"loss": 7.1}) is None
    assert rule_met(low, {"score": 0.0}) is None  # a figure this step does not have
    for bad, message in [
        (("train.stop_metric=loss",), "needs one target"),
        (("train.stop_metric=loss", "train.stop_above=1", "train.stop_below=0"), "one target"),
        (("train.stop_above=1",), "need train.stop_metric"),
        (("train.stop_metric=eval/", "train.stop_above=1"), "names no metric"),
    ]:
        with pytest.raises(UserError, match=message):
            from rlhf_cli.config import TrainConfig

            TrainConfig(**{k.split("=")[0][6:]: _value(k.split("=")[1]) for k in bad})


def _value(text: str):
    try:
        return float(text)
    except ValueError:
        return text


@pytest.mark.slow
def test_a_run_stops_when_its_metric_reaches_the_target(tmp_path):
    """SFT on the tiny model stops at the first step whose loss is <= 7.0 (it starts at 7.23);
    GRPO whose every eval scores >= 1 stops after its first evaluation."""
    from conftest import read_metrics

    summary = train_in_process(
        tmp_path / "sft",
        "stage=sft",
        "train.stop_metric=loss",
        "train.stop_below=7.0",
        "data.eval_size=0",
    )
    losses = [r["loss"] for r in read_metrics(tmp_path / "sft")]
    first = next(i for i, v in enumerate(losses, 1) if v <= 7.0)
    assert 1 < first < 60 and len(losses) == first
    assert summary["steps"] == f"{first} ({first} this run)"
    assert (tmp_path / "sft" / "final" / "adapter_model.safetensors").exists()
    summary = train_in_process(
        tmp_path / "grpo",
        *GAME,
        "train.eval_every=1",
        "train.stop_metric=eval/score",
        "train.stop_above=1",
    )
    assert summary["steps"] == "1 (1 this run)" and summary["eval score"] >= 1
    assert len(read_metrics(tmp_path / "grpo", split="eval")) == 1  # not evaluated again


class CounterEnv:
    """Written to TRL's documented environment_factory interface (GRPOTrainer, TRL 1.16): reset
    with the row's columns as keywords, a public method as the tool, get_reward at the end."""

    def reset(self, **kwargs) -> str | None:
        self.count = 0
        self.target = kwargs.get("seed", 0) % 3 + 1
        return f" Reach {self.target} with the increment tool."

    def increment(self, step: int) -> str:
        """Add to the counter.

        Args:
            step: How much to add.
        """
        self.count += step
        return str(self.count)

    def get_reward(self) -> float:
        return float(self.count == self.target)


def test_a_trl_environment_class_runs_unchanged():
    """Its reset's string follows the row's prompt in the first message, a reply that calls its
    method gets the result as a tool message, and get_reward scores the episode."""
    from conftest import compose

    from rlhf_cli.data.examples import Renderer
    from rlhf_cli.model.load import load_tokenizer
    from rlhf_cli.multiturn import env_factory, sample_episodes, stage_tools
    from rlhf_cli.rollout.batch import Reply

    cfg = compose("stage=grpo", "stage.env=trl:test_envs:CounterEnv", "stage.max_turns=3")
    assert [t.__name__ for t in stage_tools(cfg.stage)] == ["increment"]  # for the template
    tok = load_tokenizer(cfg.model)
    make = env_factory(cfg.stage)
    rows = [{"prompt_ids": [1], "prompt_text": "Count.", "columns": {"seed": s}} for s in (1, 2)]
    call = '<tool_call>{"name": "increment", "arguments": {"step": 2}}</tool_call>'
    replies = iter([call, call, "done", "done"])  # turn 1: both call; turn 2: both answer

    def generate(contexts):
        return [
            Reply(
                ids=tok(next(replies), add_special_tokens=False)["input_ids"],
                ended=True,
                logps=None,
            )
            for _ in contexts
        ]

    episodes = sample_episodes(generate, rows, make, Renderer(tok), tok, 3)
    assert [e.prompt_text for e in episodes] == [
        "Count. Reach 2 with the increment tool.",
        "Count. Reach 3 with the increment tool.",
    ]
    assert [m["role"] for m in episodes[0].messages] == ["assistant", "tool", "assistant"]
    assert episodes[0].messages[1]["content"] == "2"
    assert [e.reward for e in episodes] == [1.0, 0.0]  # 2 reached 2, not 3


@pytest.mark.slow
def test_grpo_trains_with_a_trl_environment_class(tmp_path):
    summary = train_in_process(
        tmp_path / "run",
        "stage=grpo",
        "data.path=episodes:24",
        "data.eval_size=8",
        "stage.env=trl:test_envs:CounterEnv",
        "stage.max_turns=2",
        "stage.group_size=2",
        "stage.rollout_batch_size=4",
        "stage.max_new_tokens=8",
        "train.max_steps=2",
    )
    assert summary["steps"] == "2 (2 this run)"


def test_a_scorer_that_raises_on_an_odd_answer_scores_it_zero(monkeypatch):
    (row,) = RG.rows("reasoning_gym:leg_counting", ReasoningGymConfig(size=1, seed=0))

    def broken(task):
        def score_answer(answer, entry):
            raise ValueError(f"cannot read {answer!r}")

        return score_answer

    monkeypatch.setattr(RG, "_scorer", broken)
    args = ([row["prompt"]], ["<answer>???</answer>"], [row["answer"]], [row["metadata"]])
    assert RG.score(*args) == [0.0]


def test_a_reset_that_returns_no_message_is_one_line():
    from rlhf_cli.core.errors import RewardError
    from rlhf_cli.multiturn import EnvFactory, sample_episodes

    class Odd:
        def reset(self, row):
            return 42

        def step(self, text):
            return None, 0.0, True

    rows = [{"prompt_ids": [], "prompt_text": "", "columns": {"seed": 0}}]
    with pytest.raises(
        RewardError, match=r"environment odd: reset\(\) returned the observation 42"
    ):
        sample_episodes(lambda c: [], rows, EnvFactory("odd", Odd), None, None, 1)
