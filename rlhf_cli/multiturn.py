"""Multi-turn rollouts: the policy talks with an environment (or calls tools) for several turns
and is rewarded for the whole episode.

An environment is any object with
    reset(row) -> None or a message    # row: the prompt's data row ("prompt" and every column)
    step(text) -> (observation, reward, done)
A reset() that returns a message (a string is a `user` message) starts the conversation from it:
it is the prompt, in place of the row's (a game, a seeded puzzle; data.path=episodes:N gives
rows that are only seeds). A group's members share their row, so their seed and first message.
`text` is the policy's reply (its special tokens dropped); the observation is a message for the
next turn (a string is a `user` message; a dict is a message as it is, e.g. {"role": "tool", ...})
or None, `reward` a float added to the episode's reward, `done` ends the episode.
stage.env=module:Name names one (built once per sampled response, with stage.env_kwargs);
stage.tools=[module:function, ...] uses ToolEnv: a reply that calls tools gets their results.

The trajectory keeps the policy's token ids exactly as sampled (its replies are never decoded
and encoded again); between two replies come the tokens the chat template writes for the end
of the reply, the observation and the next reply's header, encoded once. Those are context,
not actions: the rollout's `mask` leaves them out of the loss, the KL and the advantages.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf_cli.core.errors import RewardError, UserError, first_line

SENTINEL = "\u2063rlhf-cli-reply\u2063"  # stands for a reply when rendering what follows it


@dataclass
class Episode:
    """One sampled conversation after its prompt."""

    env: Any
    ids: list[int] = field(default_factory=list)  # every token after the prompt
    policy: list[bool] = field(default_factory=list)  # True where the policy wrote the token
    # The engine's log-prob of each token (vllm; 0 on the context tokens), or None (hf).
    logps: list[float] | None = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)  # the turns, as text
    reward: float = 0.0  # the environment's rewards, summed
    done: bool = False
    ended: bool = True  # the last reply ended with EOS (not cut at max_new_tokens)
    turns: int = 0  # replies the policy made
    last_reply: list[int] = field(default_factory=list)  # the final reply's tokens
    context_full: bool = False  # ended because the next turn would not fit the context
    # The prompt the environment wrote (its reset() returned the first message), or None.
    prompt_ids: list[int] | None = None
    prompt_text: str | None = None


def load_object(spec: str, key: str) -> Any:
    """'package.module:name' -> the object (the current directory first on the path)."""
    import importlib
    import os
    import sys

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"{key}={spec}: must look like package.module:name")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"{key}={spec}: cannot import {module_name!r} ({err})") from err
    obj = getattr(module, attr, None)
    if obj is None:
        raise UserError(f"{key}={spec}: {module_name} has no {attr!r}")
    return obj


class EnvFactory:
    """Builds one environment per sampled response; `name` is what error lines call it."""

    def __init__(self, name: str, build: Callable[[], Any]):
        self.name, self.build = name, build

    def __call__(self) -> Any:
        try:
            return self.build()
        except Exception as err:  # noqa: BLE001 - the user's code: reported, with a checkpoint
            raise env_error(self.name, "__init__()", err) from err


def env_error(name: str, where: str, err: Exception) -> RewardError:
    """A RewardError for an exception in an environment's code: the run stops the way it does
    for a failing reward function (a checkpoint at the step's start, one line)."""
    text = first_line(err, empty="")[:300]
    return RewardError(f"environment {name}: {where} raised {type(err).__name__}: {text}".strip())


def env_factory(stage) -> EnvFactory | None:
    """What builds one environment per response: stage.env (with stage.env_kwargs; `trl:` in
    front for a class written for TRL's environment_factory), ToolEnv over stage.tools, or None
    for single-turn sampling."""
    env = getattr(stage, "env", None)
    timeout = float(getattr(stage, "tool_timeout_s", TOOL_TIMEOUT_S))
    if env and env.startswith(TRL_PREFIX):
        cls = trl_class(env)
        kwargs = dict(getattr(stage, "env_kwargs", {}) or {})
        return EnvFactory(f"stage.env={env}", lambda: TRLEnvironment(cls(**kwargs), timeout))
    if env:
        cls = load_object(env, "stage.env")
        kwargs = dict(getattr(stage, "env_kwargs", {}) or {})
        for method in ("reset", "step"):
            if not callable(getattr(cls, method, None)):
                raise UserError(
                    f"stage.env={env}: it has no {method}() method (see rlhf_cli.multiturn)"
                )
        return EnvFactory(f"stage.env={env}", lambda: cls(**kwargs))
    tools = tool_functions(getattr(stage, "tools", []) or [])
    if tools:
        return EnvFactory("stage.tools", lambda: ToolEnv(tools, timeout))
    return None


def stage_tools(stage) -> list[Callable]:
    """The tools a chat template describes in the prompts: stage.tools, and the public methods
    of a TRL-style environment class (stage.env=trl:...)."""
    tools = list(tool_functions(getattr(stage, "tools", []) or []).values())
    env = getattr(stage, "env", None)
    if env and env.startswith(TRL_PREFIX):
        kwargs = dict(getattr(stage, "env_kwargs", {}) or {})
        try:
            probe = trl_class(env)(**kwargs)
        except Exception as err:  # noqa: BLE001 - the user's code
            raise UserError(f"stage.env={env}: its constructor raised {err!r}") from err
        tools += list(trl_tools(probe).values())
    return tools


def tool_functions(specs: list[str]) -> dict[str, Callable]:
    """stage.tools -> {name: function}; each must have the docstring (a summary and an Args:
    line per argument) from which a chat template's tool description is made."""
    from transformers.utils import get_json_schema

    tools = {}
    for spec in specs:
        fn = load_object(spec, "stage.tools")
        if not callable(fn):
            raise UserError(f"stage.tools: {spec} is not a function")
        try:
            get_json_schema(fn)
        except Exception as err:  # noqa: BLE001 - transformers' docstring and type-hint errors
            raise UserError(
                f"stage.tools: {spec} cannot be described to the model ({err}): give it type "
                "hints and a docstring with an Args: line per argument"
            ) from err
        tools[spec.rpartition(":")[2]] = fn
    return tools


# --------------------------------------------------------------------------------------------
# tools


TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> list[tuple[str, dict]] | str:
    """The tool calls of a reply: each <tool_call>{"name": ..., "arguments": {...}}</tool_call>
    (the Hermes / Qwen2.5 format), or a reply that is one such JSON object ("parameters" also
    read as the arguments, as Llama 3.1 writes them). [] when it calls none; an error message
    when a call is malformed (the policy sees it)."""
    bodies = TOOL_CALL.findall(text)
    if not bodies:
        stripped = text.strip()
        if not (stripped.startswith("{") and stripped.endswith("}") and '"name"' in stripped):
            return []
        bodies = [stripped]
    calls = []
    for body in bodies:
        try:
            call = json.loads(body)
        except json.JSONDecodeError as err:
            return f"error: the tool call is not valid JSON ({err.msg})"
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return 'error: a tool call is {"name": ..., "arguments": {...}}'
        args = call.get("arguments", call.get("parameters", {}))
        if isinstance(args, str):  # some templates write the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return "error: the tool call's arguments are not valid JSON"
        if not isinstance(args, dict):
            return "error: a tool call's arguments are an object"
        calls.append((call["name"], args))
    return calls


TOOL_TIMEOUT_S = 10.0  # stage.tool_timeout_s's default
TOOL_RESULT_CHARS = 10_000  # a longer tool result is cut (the policy sees that it was)


def call_with_timeout(fn: Callable, args: dict, seconds: float) -> tuple[str, Any]:
    """fn(**args) run in a daemon thread for at most `seconds`: ("ok", its result), ("raised",
    its exception) or ("timeout", None). A call still running then is abandoned (Python cannot
    stop a thread): the run goes on, the policy is told the call timed out."""
    import threading

    box: list = []

    def target() -> None:
        try:
            box.append(("ok", fn(**args)))
        except Exception as err:  # noqa: BLE001 - the policy's call: it sees the error
            box.append(("raised", err))

    thread = threading.Thread(target=target, daemon=True, name="rlhf-tool-call")
    thread.start()
    thread.join(seconds)
    return box[0] if box else ("timeout", None)


class ToolEnv:
    """stage.tools: a reply that calls tools gets one `tool` message with their results (an
    error message for an unknown tool, bad arguments, an exception in the tool or a call that
    ran past stage.tool_timeout_s, so that the policy can learn from it); a reply without a tool
    call is the final answer and ends the episode. It gives no reward: the reward functions
    score the final answer."""

    def __init__(self, tools: dict[str, Callable], timeout_s: float = TOOL_TIMEOUT_S):
        self.tools, self.timeout_s = tools, timeout_s

    def reset(self, row: dict) -> None:
        pass

    def step(self, text: str) -> tuple[dict | None, float, bool]:
        calls = parse_tool_calls(text)
        if isinstance(calls, str):
            return {"role": "tool", "content": calls}, 0.0, False
        if not calls:
            return None, 0.0, True
        results = []
        for name, args in calls:
            fn = self.tools.get(name)
            if fn is None:
                results.append(f"error: no tool {name!r} (tools: {', '.join(self.tools)})")
                continue
            outcome, value = call_with_timeout(fn, args, self.timeout_s)
            if outcome == "timeout":
                results.append(f"error: {name} timed out (no result after {self.timeout_s:g} s)")
            elif outcome == "raised":
                results.append(f"error: {name} raised {type(value).__name__}: {value}")
            else:
                text = str(value)
                if len(text) > TOOL_RESULT_CHARS:
                    text = (
                        text[:TOOL_RESULT_CHARS] + f" ... (cut at {TOOL_RESULT_CHARS} characters)"
                    )
                results.append(text)
        return {"role": "tool", "content": "\n".join(results)}, 0.0, False


TRL_PREFIX = "trl:"  # stage.env=trl:package.module:Class


def trl_class(spec: str) -> type:
    """The class of stage.env=trl:package.module:Class; it needs a reset method."""
    cls = load_object(spec[len(TRL_PREFIX) :], "stage.env")
    if not callable(getattr(cls, "reset", None)):
        raise UserError(f"stage.env={spec}: it has no reset() method (TRL's environment_factory)")
    return cls


def trl_tools(env: Any) -> dict[str, Callable]:
    """A TRL-style environment's tools: its public methods but reset and get_reward, as TRL's
    GRPOTrainer lists them (the class's functions)."""
    import inspect

    return {
        name: getattr(env, name)
        for name, _ in inspect.getmembers(type(env), predicate=inspect.isfunction)
        if name not in ("reset", "get_reward") and not name.startswith("_")
    }


class TRLEnvironment(ToolEnv):
    """A class written for TRL's `GRPOTrainer(environment_factory=...)`, unchanged:
    `reset(**row)` returns None or a string that TRL appends to the last user message (here: to
    the row's prompt, which then is the conversation's first message), its public methods are
    the tools (called as stage.tools are), and `get_reward()`, when it has one, gives the
    episode's reward once the policy answers without a tool call."""

    def __init__(self, env: Any, timeout_s: float = TOOL_TIMEOUT_S):
        super().__init__(trl_tools(env), timeout_s)
        self.env = env

    def reset(self, row: dict) -> dict[str, Any] | None:
        observation = self.env.reset(**row)
        if observation is None:
            return None
        return {"role": "user", "content": f"{row.get('prompt', '')}{observation}"}

    def step(self, text: str) -> tuple[dict | None, float, bool]:
        message, reward, done = super().step(text)
        if done and callable(getattr(self.env, "get_reward", None)):
            reward = self.env.get_reward()
        return message, reward, done


# --------------------------------------------------------------------------------------------
# the template's tokens between two replies


def observation_ids(renderer, message: dict[str, Any], eos: str) -> list[int]:
    """The tokens a chat template writes after a reply's EOS: the rest of the reply's turn,
    `message`, and the header of the next reply, as the template renders them (found by
    rendering a stand-in reply before and after the message), encoded once."""
    head = [{"role": "user", "content": "..."}, {"role": "assistant", "content": SENTINEL}]
    text = _render(renderer, [*head, message])
    after = text[text.index(SENTINEL) + len(SENTINEL) :]
    if not after.startswith(eos):
        raise UserError(
            "multi-turn rollouts need a chat template that ends each assistant turn with the "
            f"EOS token {eos!r} (this one writes {after[:20]!r} after a reply): set "
            "model.chat_template"
        )
    return renderer.tokenizer.encode(after[len(eos) :], add_special_tokens=False)


def _render(renderer, messages: list[dict]) -> str:
    try:
        return renderer.chat(messages, add_generation_prompt=True)
    except ValueError:
        if messages[-1].get("role") in ("user", "assistant"):
            raise
        # A template that knows only user/assistant turns (roles must alternate): the tool's
        # or environment's message is shown as the user's.
        content = messages[-1]["content"]
        return renderer.chat([*messages[:-1], {"role": "user", "content": content}], True)


# --------------------------------------------------------------------------------------------
# sampling


def as_message(
    observation: Any, name: str = "the environment", where: str = "step()"
) -> dict[str, Any]:
    if isinstance(observation, dict):
        if not isinstance(observation.get("content"), str):
            raise RewardError(
                f"environment {name}: {where} returned the observation {short(observation)}: a "
                "message dict needs a string 'content'"
            )
        return {"role": "user", **observation}
    if isinstance(observation, str):
        return {"role": "user", "content": observation}
    raise RewardError(
        f"environment {name}: {where} returned the observation {short(observation)} "
        f"({type(observation).__name__}): return a str, a message dict or None"
    )


def short(value: Any, chars: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= chars else text[: chars - 3] + "..."


def env_step(env: Any, name: str, text: str) -> tuple[Any, float, bool]:
    """env.step(text), checked: an exception in it or a return value that is not
    (observation, reward, done) with a finite number as the reward is a RewardError naming the
    environment."""
    try:
        out = env.step(text)
    except Exception as err:  # noqa: BLE001 - the user's code: reported, with a checkpoint
        raise env_error(name, "step()", err) from err
    if not isinstance(out, tuple | list) or len(out) != 3:
        raise RewardError(
            f"environment {name}: step() returned {short(out)}: return (observation, reward, done)"
        )
    observation, reward, done = out
    try:
        reward = float(reward)
    except (TypeError, ValueError):
        raise RewardError(
            f"environment {name}: step() returned the reward {short(reward)}: return a number"
        ) from None
    return observation, reward, bool(done)


@torch.no_grad()
def sample_episodes(
    generate: Callable[[list[list[int]]], list[Any]],
    examples: list[dict],
    make_env: Callable[[], Any],
    renderer,
    tokenizer,
    max_turns: int,
    max_new_tokens: int = 0,
    max_context: int | None = None,
    max_prompt_length: int | None = None,
) -> list[Episode]:
    """One episode per example (already repeated group_size times): the policy replies (one
    batched generation per turn, `generate` returning each reply as a rollout.Reply: its tokens
    up to and including EOS, whether it ended there, the engine's log-probs or None), the
    environment answers, until it is done or max_turns replies were made. `ended` is whether
    the last reply ended with EOS.

    An environment's exception or malformed answer is a RewardError naming it (the run stops
    with a checkpoint at the step's start). A conversation whose next turn (the context, the
    environment's message and max_new_tokens) would not fit `max_context` tokens ends before
    that message, cleanly (`context_full`; the final reply is the last one made). A reset()
    that returns a message makes the prompt (its last max_prompt_length tokens)."""
    name = getattr(make_env, "name", "the environment")
    episodes = []
    for ex in examples:
        env = make_env()
        try:
            first = env.reset({"prompt": ex["prompt_text"], **ex.get("columns", {})})
        except Exception as err:  # noqa: BLE001 - the user's code: reported, with a checkpoint
            raise env_error(name, "reset()", err) from err
        episode = Episode(env)
        if first is not None:
            message = as_message(first, name, "reset()")
            episode.prompt_ids = opening_ids(renderer, message)[-(max_prompt_length or 0) :]
            episode.prompt_text = str(message.get("content", ""))
        elif not ex["prompt_ids"]:
            raise RewardError(
                f"environment {name}: reset() returned no first message for a row without a "
                "prompt (a seed row): return the message the conversation starts from"
            )
        episodes.append(episode)
    eos = tokenizer.eos_token
    limit = max_context if max_context is not None else float("inf")
    for turn in range(max_turns):
        active = [(ex, e) for ex, e in zip(examples, episodes) if not e.done]
        if not active:
            break
        contexts = [prompt_of(ex, e) + e.ids for ex, e in active]
        for (ex, e), reply in zip(active, generate(contexts)):
            e.ids += reply.ids
            e.policy += [True] * len(reply.ids)
            if reply.logps is None or e.logps is None:
                e.logps = None
            else:
                e.logps += list(reply.logps)
            e.last_reply = list(reply.ids)
            e.turns += 1
            e.ended = reply.ended
            text = tokenizer.decode(reply.ids, skip_special_tokens=True)
            e.messages.append({"role": "assistant", "content": text})
            observation, reward, done = env_step(e.env, name, text)
            e.reward += reward
            if done or observation is None or turn == max_turns - 1:
                e.done = True
                continue
            message = as_message(observation, name)
            # A reply cut at max_new_tokens is closed with its EOS as context (not trained on:
            # the policy did not write it), so the conversation reads as the template writes it.
            obs = ([] if reply.ended else [tokenizer.eos_token_id]) + observation_ids(
                renderer, message, eos
            )
            if len(prompt_of(ex, e)) + len(e.ids) + len(obs) + max_new_tokens > limit:
                e.done = e.context_full = True
                continue
            e.ids += obs
            e.policy += [False] * len(obs)
            if e.logps is not None:
                e.logps += [0.0] * len(obs)
            e.messages.append(message)
    return episodes


def prompt_of(example: dict, episode: Episode) -> list[int]:
    """The episode's prompt: the one its environment wrote, else its row's."""
    return example["prompt_ids"] if episode.prompt_ids is None else episode.prompt_ids


def opening_ids(renderer, message: dict[str, Any]) -> list[int]:
    """A conversation's first message as a prompt: rendered by the chat template with the
    assistant's header after it (the content alone for a model without a template)."""
    if renderer.has_own_template:
        return renderer.encode(renderer.chat([message], add_generation_prompt=True), first=False)
    return renderer.encode(str(message.get("content", "")), first=True)


# --------------------------------------------------------------------------------------------
# a calculator: a tool, and an environment for the shipped arithmetic task

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        _check_size(node.op, left, right)
        try:
            return _OPS[type(node.op)](left, right)
        except OverflowError:
            raise ValueError("the result is too large") from None
    raise ValueError("only numbers and + - * / // % ** are allowed")


MAX_BITS = 1024  # the calculator's largest result: about 308 digits


def _bits(x: float) -> float:
    """log2 |x| (0 for |x| <= 1), for int and float alike."""
    import math

    x = abs(x)
    if x <= 1:
        return 0.0
    return float(x.bit_length()) if isinstance(x, int) else math.log2(x)


def _check_size(op: ast.operator, left: float, right: float) -> None:
    """Refuse an operation whose result would exceed MAX_BITS before computing it (a power
    tower such as ((9**64)**64)**64 would otherwise take minutes and gigabytes)."""
    if _bits(left) > MAX_BITS or _bits(right) > MAX_BITS:
        raise ValueError("a number is too large")
    if isinstance(op, ast.Pow):
        if abs(right) > 64 and abs(left) > 1:
            raise ValueError("exponent too large")
        if right > 0 and _bits(left) * right > MAX_BITS:
            raise ValueError("the result is too large")
    elif isinstance(op, ast.Mult) and _bits(left) + _bits(right) > MAX_BITS:
        raise ValueError("the result is too large")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: Numbers with + - * / // % ** and parentheses, e.g. "(12 + 3) * 4".
    """
    text = expression.replace("×", "*").replace("x", "*").replace("^", "**")
    value = _evaluate(ast.parse(text.strip(), mode="eval").body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


EXPRESSION = re.compile(r"(-?\d+(?:\.\d+)?)\s*([-+*/x×])\s*(-?\d+(?:\.\d+)?)")


class CalculatorEnv:
    """The shipped arithmetic task's environment (builtin:arithmetic): the first reply that
    writes a calculation (`a op b`, as a small model writes it unprompted) gets the calculator's
    result back ("Calculator: 47 * 83 = 3901. ..."); the reply after it is the final answer, and
    so is a first reply without a calculation. No reward of its own: score the final answer with
    reward.fn=rlhf_cli.rewards:math_answer (the row's answer column)."""

    def __init__(self, uses: int = 1):
        self.uses = uses

    def reset(self, row: dict) -> None:
        self.left = self.uses

    def step(self, text: str) -> tuple[str | None, float, bool]:
        match = EXPRESSION.search(text) if self.left > 0 else None
        if match is None:
            return None, 0.0, True
        self.left -= 1
        a, op, b = match.groups()
        try:
            result = calculator(f"{a}{op}{b}")
        except (ValueError, ArithmeticError, SyntaxError) as err:
            result = f"error ({err})"
        return f"Calculator: {a} {op} {b} = {result}. What is the final answer?", 0.0, False
