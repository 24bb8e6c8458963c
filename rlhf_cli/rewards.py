"""Reward functions for the online stages: `reward.fn=rlhf_cli.rewards:<name>`.

A reward function takes the prompts and the sampled responses (strings, one per sample) and
returns one float per response; extra keyword arguments come from `+reward.kwargs.<key>=...`.
Write your own the same way and name it as `package.module:function`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhf_cli.errors import RewardError, UserError

RewardFn = Callable[..., list[float]]
MODEL_TERM = "model"  # the reward model's term: rewards/model


def load_reward_fn(spec: str) -> RewardFn:
    """'package.module:function' -> the function. The module is imported with the current
    directory first on the path, under every launcher (`rlhf`, `python -m`, torchrun)."""
    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"reward.fn={spec}: cannot import {module_name!r} ({err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"reward.fn={spec}: {module_name} has no function {attr!r}")
    return fn


@dataclass
class RewardTerm:
    """One term of the reward: weight x a function's scores (fn) or the reward model's (fn
    None)."""

    name: str  # logged as rewards/<name>
    spec: str  # package.module:function, or the reward model's directory
    weight: float
    fn: RewardFn | None = None


def reward_terms(reward) -> list[RewardTerm]:
    """The terms of a RewardConfig, in order (the functions of reward.fn or reward.fns, then
    reward.model), each function bound to the reward.kwargs it accepts. Imports the functions:
    a typo fails here, before any model loads."""
    specs = [reward.fn] if reward.fn else list(reward.fns)
    weights = [float(w) for w in reward.weights] or [1.0] * (len(specs) + bool(reward.model))
    kwargs: dict[str, Any] = dict(reward.kwargs)
    terms, taken = [], set()
    names = {MODEL_TERM}  # the reward model's: a function named model is logged as model_2
    for spec, weight in zip(specs, weights):
        fn = load_reward_fn(spec)
        accepted = _accepted(fn, kwargs)
        taken |= set(accepted)
        names.add(name := free_name(spec.rpartition(":")[2], names))
        terms.append(RewardTerm(name, spec, weight, functools.partial(fn, **accepted)))
    unused = sorted(set(kwargs) - taken)
    if unused:
        raise UserError(
            f"reward.kwargs.{unused[0]}: none of the reward functions ({', '.join(specs) or 'none'}) "
            "takes this argument: drop it or fix its name"
        )
    if reward.model:
        terms.append(RewardTerm(MODEL_TERM, str(reward.model), weights[-1]))
    return terms


def free_name(base: str, taken: set[str]) -> str:
    """`base`, or the first of base_2, base_3, ... not in `taken` (the same function twice:
    concise, concise_2)."""
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _accepted(fn: RewardFn, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The kwargs `fn` takes (all of them when it has **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C function: pass everything
        return dict(kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(kwargs)
    names = {p.name for p in params}
    return {k: v for k, v in kwargs.items() if k in names}


def call_reward_fn(term: RewardTerm, prompts: list[str], responses: list[str]) -> list[float]:
    """term.fn on a batch; an exception in it, or a wrong number of scores, is a RewardError
    naming the function."""
    try:
        values = list(term.fn(prompts, responses))
        scores = [float(v) for v in values]
    except Exception as err:  # noqa: BLE001 - the user's code: any exception is reported
        raise RewardError(
            f"reward function {term.spec} raised {type(err).__name__}: {err}".strip()
        ) from err
    if len(scores) != len(responses):
        raise RewardError(
            f"reward function {term.spec} returned {len(scores)} scores for "
            f"{len(responses)} responses: return one float per response"
        )
    return scores


def char_fraction(prompts: list[str], responses: list[str], chars: str = "e") -> list[float]:
    """Fraction of the response's characters that are in `chars` (0 for an empty response): a
    dense toy reward that a tiny model can learn to raise."""
    wanted = set(chars)
    return [sum(ch in wanted for ch in r) / len(r) if r else 0.0 for r in responses]


def keyword(prompts: list[str], responses: list[str], word: str = "please") -> list[float]:
    """1.0 when the response contains `word` (case-insensitive), else 0.0."""
    return [float(word.lower() in r.lower()) for r in responses]


def length_target(prompts: list[str], responses: list[str], words: int = 20) -> list[float]:
    """-|len(words) - target| / target: prefers responses of about `words` words."""
    return [-abs(len(r.split()) - words) / words for r in responses]


_ARITH = re.compile(r"(-?\d+)\s*([+\-x*])\s*(-?\d+)")
_NUMBER = re.compile(r"-?\d+")


def arithmetic_exact_match(prompts: list[str], responses: list[str]) -> list[float]:
    """Verifiable reward: 1.0 when the first number in the response is the value of the first
    `a + b`, `a - b`, `a x b` or `a * b` in the prompt; 0.0 otherwise (or when there is none)."""
    ops = {
        "+": lambda a, b: a + b,
        "-": lambda a, b: a - b,
        "x": lambda a, b: a * b,
        "*": lambda a, b: a * b,
    }
    out = []
    for prompt, response in zip(prompts, responses, strict=True):
        task, got = _ARITH.search(prompt), _NUMBER.search(response)
        if task is None or got is None:
            out.append(0.0)
            continue
        a, op, b = task.groups()
        out.append(float(int(got.group()) == ops[op](int(a), int(b))))
    return out


def concise(prompts: list[str], responses: list[str], words: int = 20) -> list[float]:
    """1.0 for a non-empty response of at most `words` words, else 0.0: a verifiable property
    that SmolLM2-135M-Instruct shows in about a quarter of its samples (scripts/demo_real.py)."""
    return [float(0 < len(r.split()) <= words) for r in responses]
