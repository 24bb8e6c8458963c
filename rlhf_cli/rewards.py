"""Reward functions for the online stages: `reward.fn=rlhf_cli.rewards:<name>`.

A reward function takes the prompts and the sampled responses (strings, one per sample) and
returns one float per response; extra keyword arguments come from `+reward.kwargs.<key>=...`.
Write your own the same way and name it as `package.module:function`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from rlhf_cli.errors import UserError

RewardFn = Callable[..., list[float]]


def load_reward_fn(spec: str) -> RewardFn:
    """'package.module:function' -> the function."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"reward.fn={spec}: cannot import {module_name!r} ({err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"reward.fn={spec}: {module_name} has no function {attr!r}")
    return fn


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
