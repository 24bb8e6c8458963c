"""Multi-turn rollouts (rlhf_cli.multiturn): the trajectory, its masks and its rewards on the
tiny model; tools and the calculator environment by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import compose, read_metrics, train_in_process

from rlhf_cli import multiturn
from rlhf_cli.core.errors import UserError
from rlhf_cli.multiturn import CalculatorEnv, ToolEnv, calculator, parse_tool_calls
from rlhf_cli.rollout.batch import Reply

ENVS = '''
class Echo:
    """Answers each reply with "seen <n> of <answer>" (the row's answer column) and a reward of
    1; done after `replies` replies (reward 10 then)."""

    def __init__(self, replies=3):
        self.replies = replies

    def reset(self, row):
        self.row, self.n = row, 0

    def step(self, text):
        self.n += 1
        if self.n >= self.replies:
            return None, 10.0, True
        return f"seen {self.n} of {self.row['answer']}", 1.0, False


def final_length(prompts, responses):
    """The final reply's length in characters: rewards that differ within a group."""
    return [float(len(r)) for r in responses]


def reply_words(prompts, responses, turns):
    """The number of replies in the conversation (the turns keyword)."""
    return [float(sum(m["role"] == "assistant" for m in t)) for t in turns]


def reply_tokens(prompts, responses, response_ids):
    """The length of response_ids (what a length reward sees)."""
    return [float(len(ids)) for ids in response_ids]


class Boom:
    """Raises in step() on the call numbered in calls.txt's `fail_on` (counted in calls.txt)."""

    def __init__(self, fail_on=1):
        self.fail_on = fail_on

    def reset(self, row):
        pass

    def step(self, text):
        import pathlib

        path = pathlib.Path("calls.txt")
        n = int(path.read_text()) + 1 if path.exists() else 1
        path.write_text(str(n))
        if n == self.fail_on:
            raise ZeroDivisionError("the game server divided by zero")
        return None, 1.0, True


class Returns:
    """step() returns the Python literal it was built with."""

    def __init__(self, value="None"):
        self.value = value

    def reset(self, row):
        pass

    def step(self, text):
        import ast

        return ast.literal_eval(self.value)


class Flood:
    """Answers every reply with `chars` characters."""

    def __init__(self, chars=200_000):
        self.chars = chars

    def reset(self, row):
        pass

    def step(self, text):
        return "a " * (self.chars // 2), 0.0, False


def slow_tool(seconds: float) -> str:
    """Sleeps.

    Args:
        seconds: How long.
    """
    import time

    time.sleep(seconds)
    return "slept"
'''


@pytest.fixture
def env_dir(tmp_path, monkeypatch):
    (tmp_path / "my_envs.py").write_text(ENVS)
    rows = [{"prompt": f"Count with me, round {i}.", "answer": f"a{i}"} for i in range(8)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fixed_replies(stage, words=("yes", "no", "maybe")):
    """Make the stage's policy reply with these words in turn (then EOS), recording them."""
    eos = stage.tokenizer.eos_token_id
    calls: list[list[list[int]]] = []

    def generate(prompts, generation):
        turn = len(calls)
        ids = stage.tokenizer.encode(words[turn % len(words)], add_special_tokens=False)
        calls.append([ids + [eos] for _ in prompts])
        return [Reply(ids + [eos], True) for _ in prompts]

    stage._generate = generate
    return calls


def grpo_stage(*overrides):
    from rlhf_cli.data.examples import load_datasets
    from rlhf_cli.model.load import load_model, load_tokenizer
    from rlhf_cli.stages import stage_class

    cfg = compose(
        "stage=grpo", "data.path=rows.jsonl", "data.eval_size=0", "quant=none", *overrides
    )
    tokenizer = load_tokenizer(cfg.model)
    examples, _, _ = load_datasets(cfg.data, tokenizer, "prompt", 0)
    model = load_model(cfg, torch.device("cpu"), tokenizer)
    stage = stage_class("grpo")(cfg, model, tokenizer, torch.device("cpu"), None)
    return stage, examples


def test_the_trajectory_keeps_the_replies_and_masks_the_environment(env_dir):
    """Three replies with the environment's two messages between them: the conversation after
    the prompt is reply, message, reply, message, reply; the mask marks exactly the replies'
    tokens; each message's tokens are what the chat template writes after a reply's EOS (the
    rest of the turn, the message, the next reply's header); the rewards add up (1 + 1 + 10)."""
    stage, examples = grpo_stage("stage.env=my_envs:Echo", "stage.max_turns=4")
    calls = fixed_replies(stage)
    rollout = stage.rollout(examples[:2], k=2)
    assert len(calls) == 3  # one generation a turn, for every episode at once
    tok, eos = stage.tokenizer, stage.tokenizer.eos_token
    for row in range(4):
        answer = examples[row // 2]["columns"]["answer"]
        messages = [{"role": "user", "content": f"seen {n} of {answer}"} for n in (1, 2)]
        glue = [multiturn.observation_ids(stage.renderer, m, eos) for m in messages]
        replies = [calls[t][row] for t in range(3)]
        want = replies[0] + glue[0] + replies[1] + glue[1] + replies[2]
        assert rollout.responses[row] == want
        start = rollout.prompt_len
        ids = rollout.input_ids[row, start : start + len(want)].tolist()
        assert ids == want
        policy = [True] * len(replies[0]) + [False] * len(glue[0]) + [True] * len(replies[1])
        policy += [False] * len(glue[1]) + [True] * len(replies[2])
        assert rollout.mask[row, : len(want)].tolist() == policy
        assert not rollout.mask[row, len(want) :].any()
        assert rollout.attention_mask[row, start : start + len(want)].all()
        text = tok.decode(glue[0])
        assert text == f"<|user|>\nseen 1 of {answer}</s><|assistant|>\n", text
        assert [m["role"] for m in rollout.turns[row]] == [
            "assistant",
            "user",
            "assistant",
            "user",
            "assistant",
        ]
        assert rollout.final_texts[row] == "maybe"
    assert rollout.env_rewards.tolist() == [12.0] * 4
    assert rollout.ended.all()


def test_turn_limits_and_cut_replies(env_dir):
    """stage.max_turns=2 stops after the second reply (the environment wanted three), whose
    step is still taken (a reward at the end). A reply cut at max_new_tokens (no EOS) goes to
    the environment like any other; before the next message its EOS is added as context, not
    as the policy's token; `ended` is the last reply's."""
    stage, examples = grpo_stage("stage.env=my_envs:Echo", "stage.max_turns=2")
    calls = fixed_replies(stage)
    rollout = stage.rollout(examples[:1], k=2)
    assert len(calls) == 2
    assert [[m["role"] for m in t] for t in rollout.turns] == [
        ["assistant", "user", "assistant"]
    ] * 2
    # The last reply still goes to the environment (its reward counts); its message is dropped.
    assert rollout.env_rewards.tolist() == [2.0, 2.0]

    eos = stage.tokenizer.eos_token_id
    turns = []

    def cut(prompts, generation):  # the first row's first and the second row's last reply
        turns.append(len(prompts))
        if len(turns) == 1:
            return [Reply([7, 8], False), Reply([9, eos], True)]
        return [Reply([10, eos], True), Reply([11, 12], False)]

    stage._generate = cut
    rollout = stage.rollout(examples[:1], k=2)
    assert turns == [2, 2]
    answer = examples[0]["columns"]["answer"]
    glue = multiturn.observation_ids(
        stage.renderer,
        {"role": "user", "content": f"seen 1 of {answer}"},
        stage.tokenizer.eos_token,
    )
    assert rollout.responses[0] == [7, 8, eos, *glue, 10, eos]
    assert rollout.mask[0, : 5 + len(glue)].tolist() == [True, True, False] + [False] * len(
        glue
    ) + [True, True]
    assert rollout.responses[1] == [9, eos, *glue, 11, 12]
    assert rollout.ended.tolist() == [True, False]


@pytest.mark.slow
def test_a_multi_turn_grpo_run_updates_on_the_generated_ids(env_dir, monkeypatch):
    """GRPO with the environment on the tiny model, real sampling (each reply given an EOS, so
    that the episodes go on): the ids of the first update are the prompt and the conversation
    as generated, the policy's log-probs of the first minibatch equal the rollout's (ratio 1),
    the environment's reward and a function of the turns are logged and summed into the score,
    and the run resumes exactly."""
    from rlhf_cli.trainer.online import OnlineStage

    real_generate = OnlineStage._generate
    generated: list = []

    def generate(self, prompts, generation):
        replies = real_generate(self, prompts, generation)
        eos = self.tokenizer.eos_token_id
        replies = [Reply(r.ids if r.ended else r.ids + [eos], True) for r in replies]
        generated.append(replies)
        return replies

    seen: list = []
    real_forward = OnlineStage.forward

    def forward(self, model, batch, prompt_len, **kw):
        seen.append(batch["input_ids"].clone())
        return real_forward(self, model, batch, prompt_len, **kw)

    monkeypatch.setattr(OnlineStage, "_generate", generate)
    monkeypatch.setattr(OnlineStage, "forward", forward)
    args = (
        "stage=grpo",
        "stage.env=my_envs:Echo",
        "+stage.env_kwargs.replies=2",
        "stage.max_turns=3",
        "reward.fn=my_envs:reply_words",
        "data.path=rows.jsonl",
        "data.eval_size=0",
        "quant=none",
        "stage.rollout_batch_size=4",
        "stage.max_new_tokens=6",
        "train.max_steps=1",
    )
    train_in_process(env_dir / "r", *args)
    (row,) = read_metrics(env_dir / "r")
    assert row["rewards/env"] == 11.0 and row["rewards/reply_words"] == 2.0 and row["turns"] == 2
    assert row["score"] == pytest.approx(13.0)
    assert row["policy/ratio_first"] == pytest.approx(1.0, abs=1e-5)
    # The first forward is the rollout's old log-probs: every reply, as generated, in place.
    first = seen[0]
    replies = [[r.ids for r in turn] for turn in generated]
    for b in range(first.shape[0]):
        flat = first[b].tolist()
        for turn in replies:
            reply = turn[b]
            assert any(flat[i : i + len(reply)] == reply for i in range(len(flat))), b
    # Resume in the middle: the same steps after the checkpoint as without a stop.
    from conftest import assert_resume_equals

    more = (*args[:-1], "train.max_steps=3", "train.save_every=1", "train.keep_last=3")
    assert_resume_equals(env_dir / "resume", more, last_step=1, keys=("score", "loss", "kl"))


def test_tool_calls_are_parsed_and_answered():
    calls = parse_tool_calls(
        'Let me check. <tool_call>\n{"name": "calculator", "arguments": {"expression": "2*21"}}\n'
        "</tool_call>"
    )
    assert calls == [("calculator", {"expression": "2*21"})]
    assert parse_tool_calls('{"name": "calculator", "parameters": {"expression": "1+1"}}') == [
        ("calculator", {"expression": "1+1"})
    ]
    assert parse_tool_calls("The answer is 42.") == []
    assert parse_tool_calls("<tool_call>{oops}</tool_call>").startswith("error: ")
    env = ToolEnv({"calculator": calculator})
    env.reset({"prompt": "x"})
    assert env.step(
        '<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>'
    ) == ({"role": "tool", "content": "42"}, 0.0, False)
    message, _, done = env.step('<tool_call>{"name": "search", "arguments": {}}</tool_call>')
    assert message["content"].startswith("error: no tool 'search'") and not done
    message, _, _ = env.step(
        '<tool_call>{"name": "calculator", "arguments": {"expression": "import os"}}</tool_call>'
    )
    assert message["content"].startswith("error: calculator raised")
    assert env.step("It is 42.") == (None, 0.0, True)


def test_the_calculator_and_its_environment():
    assert calculator("(12 + 3) * 4") == "60" and calculator("7 / 2") == "3.5"
    assert calculator("47 x 83") == "3901" and calculator("2^10") == "1024"
    with pytest.raises(ValueError):
        calculator("__import__('os')")
    env = CalculatorEnv()
    env.reset({"prompt": "What is 47 * 83?", "answer": 3901})
    message, reward, done = env.step("47 * 83 = 3,800 I think")
    assert message == "Calculator: 47 * 83 = 3901. What is the final answer?"
    assert (reward, done) == (0.0, False)
    assert env.step("So it is 47 * 83 = 3901.") == (None, 0.0, True)  # one use, then the answer
    env.reset({"prompt": "What is 2 + 2?"})
    assert env.step("It is four.") == (None, 0.0, True)


def test_environment_settings_are_checked(env_dir):
    with pytest.raises(SystemExit):
        compose("stage=grpo", "stage.env=my_envs:Echo", "stage.tools=[x:y]")
    with pytest.raises(UserError, match="has no 'Nope'"):
        multiturn.env_factory(compose("stage=grpo", "stage.env=my_envs:Nope").stage)
    with pytest.raises(UserError, match="reply_words: it has no reset"):
        multiturn.env_factory(compose("stage=grpo", "stage.env=my_envs:reply_words").stage)


@pytest.mark.parametrize(
    "stage", ["ppo", "rloo", "reinforce", "grpo-dynamic"], ids=lambda s: s.replace("-", " ")
)
def test_every_online_stage_runs_conversations(env_dir, monkeypatch, stage):
    """ppo (the value head and GAE over the replies' tokens only), rloo, reinforce and grpo with
    dynamic sampling (groups of several rollout batches joined) on two-reply conversations."""
    from rlhf_cli.trainer.online import OnlineStage

    real_generate = OnlineStage._generate

    def generate(self, prompts, generation):  # every reply ends, so the conversations go on
        eos = self.tokenizer.eos_token_id
        return [
            Reply(r.ids if r.ended else r.ids + [eos], True)
            for r in real_generate(self, prompts, generation)
        ]

    monkeypatch.setattr(OnlineStage, "_generate", generate)
    name, _, dynamic = stage.partition("-")
    train_in_process(
        env_dir / "r",
        f"stage={name}",
        "stage.env=my_envs:Echo",
        "+stage.env_kwargs.replies=2",
        "reward.fn=my_envs:final_length",
        "data.path=rows.jsonl",
        "data.eval_size=2",
        "train.eval_every=1",
        "quant=none",
        "stage.rollout_batch_size=2",
        "stage.max_new_tokens=4",
        "train.max_steps=2",
        *(("stage.group_size=2",) if name != "ppo" else ()),
        *(("stage.dynamic_sampling=true",) if dynamic else ()),
    )
    rows = read_metrics(env_dir / "r")
    assert len(rows) == 2
    for row in rows:
        assert row["turns"] == 2 and math.isfinite(row["loss"]) and row["grad_norm"] > 0
        assert row["rewards/env"] == 11.0
        assert row["score"] == pytest.approx(11.0 + row["rewards/final_length"])
    last = read_metrics(env_dir / "r", "eval")[-1]
    assert last["rewards/env"] == 11.0 and last["score"] > 11.0


TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>\nTools: {% for t in tools %}{{ t.function.name }}("
    "{{ t.function.parameters.properties | list | join(', ') }}) {% endfor %}{{ eos_token }}"
    "{% endif %}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_a_template_that_describes_tools_gets_them_in_the_prompt(env_dir):
    """stage.tools with a template that has a place for tools: the prompts describe them (from
    the functions' docstrings); a function without one is refused in one line."""
    from rlhf_cli.data.examples import load_datasets
    from rlhf_cli.model.load import load_tokenizer
    from rlhf_cli.multiturn import tool_functions

    (env_dir / "tools.jinja").write_text(TOOLS_TEMPLATE)
    cfg = compose(
        "stage=grpo",
        "stage.tools=[rlhf_cli.multiturn:calculator]",
        "reward.fn=my_envs:final_length",
        "data.path=rows.jsonl",
        "data.eval_size=0",
        "model.chat_template=tools.jinja",
    )
    tokenizer = load_tokenizer(cfg.model)
    tools = list(tool_functions(cfg.stage.tools).values())
    (first, *_), _, _ = load_datasets(cfg.data, tokenizer, "prompt", 0, tools=tools)
    text = tokenizer.decode(first["prompt_ids"])
    assert text.startswith("<|system|>\nTools: calculator(expression) </s><|user|>\n"), text
    (plain, *_), _, _ = load_datasets(cfg.data, tokenizer, "prompt", 0)
    assert "Tools" not in tokenizer.decode(plain["prompt_ids"])
    with pytest.raises(UserError, match="final_length cannot be described"):
        tool_functions(["my_envs:final_length"])


def test_length_rewards_see_the_final_reply_not_the_environment(env_dir):
    """In a conversation, `response_ids` is the final reply's tokens (as `responses` is its
    text), not the whole conversation with the environment's messages: DAPO's overlong penalty
    of three short replies is 0, not -1."""
    stage, examples = grpo_stage(
        "stage.env=my_envs:Echo",
        "stage.max_turns=3",
        "stage.max_new_tokens=8",
        "reward.fns=[rlhf_cli.rewards:overlong_penalty,my_envs:reply_tokens]",
    )
    fixed_replies(stage, words=("yes", "no", "a b c d e f"))
    rollout = stage.rollout(examples[:1], k=2)
    final = stage.tokenizer.encode("a b c d e f", add_special_tokens=False)
    eos = stage.tokenizer.eos_token_id
    assert rollout.final_ids == [final + [eos]] * 2
    assert len(rollout.responses[0]) > 8  # the conversation is longer than one reply's limit
    terms = stage.score_terms(rollout)
    assert terms["reply_tokens"].tolist() == [7.0, 7.0]  # 6 tokens and EOS
    # L_max 8, L_cache 8 // 5 = 1: a reply of up to 7 tokens gets 0 (the policy's three replies
    # together, 3 + 3 + 7 tokens, or the conversation would get -1).
    assert terms["overlong_penalty"].tolist() == [0.0, 0.0]


def test_an_environment_that_raises_or_answers_garbage_is_one_line(env_dir):
    """An exception in step(), or a return value that is not (observation, reward, done) with a
    str/dict/None observation and a numeric reward: a RewardError naming the environment."""
    from rlhf_cli.core.errors import RewardError

    stage, examples = grpo_stage("stage.env=my_envs:Boom")
    fixed_replies(stage)
    with pytest.raises(
        RewardError,
        match=r"^environment stage.env=my_envs:Boom: step\(\) raised "
        r"ZeroDivisionError: the game server divided by zero$",
    ):
        stage.rollout(examples[:1], k=1)
    cases = {
        "'done'": "step() returned 'done': return (observation, reward, done)",
        "(3, 0.0, False)": "returned the observation 3 (int): return a str, a message dict or None",
        "({'role': 'tool'}, 0.0, False)": "a message dict needs a string 'content'",
        "('ok', 'high', False)": "returned the reward 'high': return a number",
    }
    for value, message in cases.items():
        stage, examples = grpo_stage(
            "stage.env=my_envs:Returns", f'+stage.env_kwargs.value="{value}"'
        )
        fixed_replies(stage)
        with pytest.raises(RewardError, match="^environment stage.env=my_envs:Returns: ") as err:
            stage.rollout(examples[:1], k=1)
        assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_an_environment_that_raises_saves_and_resumes(env_dir):
    """The environment raises at its second step (step 2 of the run): exit 2, one line naming
    it, no traceback, a checkpoint at step 1; the resume runs steps 2 and 3 only."""
    from conftest import rlhf

    args = (
        "stage=grpo",
        "stage.env=my_envs:Boom",
        "+stage.env_kwargs.fail_on=3",
        "stage.group_size=2",
        "stage.rollout_batch_size=1",
        "reward.fn=my_envs:final_length",
        "data.path=rows.jsonl",
        "data.eval_size=0",
        "quant=none",
        "stage.max_new_tokens=4",
        "train.max_steps=3",
        "train.save_every=0",
        "run_dir=r",
    )
    res = rlhf("train", *args, cwd=env_dir)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert "environment stage.env=my_envs:Boom: step() raised ZeroDivisionError" in res.stderr
    assert [r["step"] for r in read_metrics(env_dir / "r")] == [1]
    assert (env_dir / "r" / "checkpoints" / "step-000001").is_dir()
    res = rlhf("train", *args, "resume=auto", cwd=env_dir)
    assert res.returncode == 0, res.stderr
    assert [r["step"] for r in read_metrics(env_dir / "r")] == [1, 2, 3]
    # Steps: 1 (calls 1, 2), 2 (call 3 raised; the step ran again on resume: 4, 5), 3 (6, 7).
    assert (env_dir / "calls.txt").read_text() == "7"


def test_a_conversation_that_outgrows_the_context_ends_cleanly(env_dir):
    """An environment answering with 200,000 characters: the episode ends before that message
    (which would not fit the model's positions), is counted (context_full), and the run goes
    on; a short answer within the context is kept."""
    stage, examples = grpo_stage(
        "stage.env=my_envs:Flood", "stage.max_turns=3", "stage.max_new_tokens=8"
    )
    calls = fixed_replies(stage)
    rollout = stage.rollout(examples[:1], k=2)
    assert len(calls) == 1  # no second turn: the message did not fit
    assert rollout.context_full.tolist() == [True, True]
    assert rollout.responses[0] == calls[0][0]  # the reply alone, no observation
    assert [m["role"] for m in rollout.turns[0]] == ["assistant"]
    stage, examples = grpo_stage(
        "stage.env=my_envs:Flood",
        "+stage.env_kwargs.chars=20",
        "stage.max_turns=2",
        "stage.max_new_tokens=8",
    )
    calls = fixed_replies(stage)
    rollout = stage.rollout(examples[:1], k=1)
    assert len(calls) == 2 and rollout.context_full.tolist() == [False]
    # A context limit reached by the replies themselves (the engine's or the model's).
    # A context limit the conversation reaches by itself (the engine's or the model's): room
    # for the first reply and its message, not for a second reply of max_new_tokens after it.
    glue = multiturn.observation_ids(
        stage.renderer, {"role": "user", "content": "a " * 10}, stage.tokenizer.eos_token
    )
    stage.engine.max_context = len(examples[0]["prompt_ids"]) + 3 + len(glue) + 7
    calls = fixed_replies(stage)
    rollout = stage.rollout(examples[:1], k=1)
    assert len(calls) == 1 and rollout.context_full.tolist() == [True]
    stage.engine.max_context += 1  # now the second turn fits
    calls = fixed_replies(stage)
    rollout = stage.rollout(examples[:1], k=1)
    assert len(calls) == 2 and rollout.context_full.tolist() == [False]


def test_tool_calls_have_a_time_limit_and_the_calculator_a_size_limit():
    """A tool call past stage.tool_timeout_s is answered with an error at once (the run goes
    on); the calculator refuses results over ~308 digits before computing them (a power tower
    of 23 characters took 18 s and the next level never returned); CalculatorEnv answers an
    overflow with an error message instead of raising."""
    import time

    env = ToolEnv({"calculator": calculator, "slow": lambda seconds: time.sleep(seconds)}, 0.2)
    t0 = time.perf_counter()
    message, _, done = env.step(
        '<tool_call>{"name": "slow", "arguments": {"seconds": 5}}</tool_call>'
    )
    assert time.perf_counter() - t0 < 2
    assert message["content"] == "error: slow timed out (no result after 0.2 s)" and not done
    t0 = time.perf_counter()
    for expression in ("(((9**64)**64)**64)**64", "9**64**64", "10**300 * 10**300"):
        with pytest.raises(ValueError, match="too large"):
            calculator(expression)
    assert time.perf_counter() - t0 < 1
    assert calculator("2**64") == str(2**64) and calculator("(9**64) * 3") == str(3 * 9**64)
    env = CalculatorEnv()
    env.reset({"prompt": "x"})
    message, _, done = env.step("9" * 320 + " / 3")
    assert message.startswith("Calculator: ") and "error (" in message and not done
