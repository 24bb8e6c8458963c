"""Multi-turn rollouts: the policy talks with an environment (or calls tools) for several turns
and is rewarded for the whole episode.

An environment is any object with
    reset(row) -> None                 # row: the prompt's data row ("prompt" and every column)
    step(text) -> (observation, reward, done)
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

from rlhf_cli.errors import UserError

SENTINEL = "\u2063rlhf-cli-reply\u2063"  # stands for a reply when rendering what follows it


@dataclass
class Episode:
    """One sampled conversation after its prompt."""

    env: Any
    ids: list[int] = field(default_factory=list)  # every token after the prompt
    policy: list[bool] = field(default_factory=list)  # True where the policy wrote the token
    messages: list[dict[str, Any]] = field(default_factory=list)  # the turns, as text
    reward: float = 0.0  # the environment's rewards, summed
    done: bool = False
    ended: bool = True  # the last reply ended with EOS (not cut at max_new_tokens)
    turns: int = 0  # replies the policy made


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


def env_factory(stage) -> Callable[[], Any] | None:
    """What builds one environment per response: stage.env (with stage.env_kwargs), ToolEnv
    over stage.tools, or None for single-turn sampling."""
    env = getattr(stage, "env", None)
    if env:
        cls = load_object(env, "stage.env")
        kwargs = dict(getattr(stage, "env_kwargs", {}) or {})
        for method in ("reset", "step"):
            if not callable(getattr(cls, method, None)):
                raise UserError(
                    f"stage.env={env}: it has no {method}() method (see rlhf_cli.multiturn)"
                )
        return lambda: cls(**kwargs)
    tools = tool_functions(getattr(stage, "tools", []) or [])
    if tools:
        return lambda: ToolEnv(tools)
    return None


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


class ToolEnv:
    """stage.tools: a reply that calls tools gets one `tool` message with their results (an
    error message for an unknown tool, bad arguments or an exception in the tool, so that the
    policy can learn from it); a reply without a tool call is the final answer and ends the
    episode. It gives no reward: the reward functions score the final answer."""

    def __init__(self, tools: dict[str, Callable]):
        self.tools = tools

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
            try:
                results.append(str(fn(**args)))
            except Exception as err:  # noqa: BLE001 - the policy's call: it sees the error
                results.append(f"error: {name} raised {type(err).__name__}: {err}")
        return {"role": "tool", "content": "\n".join(results)}, 0.0, False


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


def as_message(observation: Any) -> dict[str, Any]:
    if isinstance(observation, dict):
        if "content" not in observation:
            raise UserError(f"an environment's observation {observation!r} has no content")
        return {"role": "user", **observation}
    return {"role": "user", "content": str(observation)}


@torch.no_grad()
def sample_episodes(
    generate: Callable[[list[list[int]]], list[tuple[list[int], bool]]],
    examples: list[dict],
    make_env: Callable[[], Any],
    renderer,
    tokenizer,
    max_turns: int,
) -> list[Episode]:
    """One episode per example (already repeated group_size times): the policy replies (one
    batched generation per turn, `generate` returning each reply's tokens up to and including
    EOS and whether it ended there), the environment answers, until it is done or max_turns
    replies were made. `ended` is whether the last reply ended with EOS."""
    episodes = []
    for ex in examples:
        env = make_env()
        env.reset({"prompt": ex["prompt_text"], **ex.get("columns", {})})
        episodes.append(Episode(env))
    eos = tokenizer.eos_token
    for turn in range(max_turns):
        active = [e for e in episodes if not e.done]
        if not active:
            break
        contexts = [ex["prompt_ids"] + e.ids for ex, e in zip(examples, episodes) if not e.done]
        for e, (reply, ended) in zip(active, generate(contexts)):
            e.ids += reply
            e.policy += [True] * len(reply)
            e.turns += 1
            e.ended = ended
            text = tokenizer.decode(reply, skip_special_tokens=True)
            e.messages.append({"role": "assistant", "content": text})
            observation, reward, done = e.env.step(text)
            e.reward += float(reward)
            if done or observation is None or turn == max_turns - 1:
                e.done = True
                continue
            message = as_message(observation)
            # A reply cut at max_new_tokens is closed with its EOS as context (not trained on:
            # the policy did not write it), so the conversation reads as the template writes it.
            obs = ([] if ended else [tokenizer.eos_token_id]) + observation_ids(
                renderer, message, eos
            )
            e.ids += obs
            e.policy += [False] * len(obs)
            e.messages.append(message)
    return episodes


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
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _OPS[type(node.op)](left, right)
    raise ValueError("only numbers and + - * / // % ** are allowed")


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
        except (ValueError, ZeroDivisionError, SyntaxError) as err:
            result = f"error ({err})"
        return f"Calculator: {a} {op} {b} = {result}. What is the final answer?", 0.0, False
