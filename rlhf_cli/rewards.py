"""Reward functions for the online stages: `reward.fn=rlhf_cli.rewards:<name>`.

A reward function takes the prompts and the sampled responses (strings, one per sample) and
returns one float per response. Keyword arguments, each passed to the functions that take it
(or that take **kwargs):
- every other column of the prompt data, as a list with one value per response (None where a
  row lacks it): `answer=[...]` checks a response against its own row's answer;
- `response_ids`: each response's token ids (up to and including EOS);
- `max_new_tokens`: the sampling limit (one int);
- `turns` (multi-turn rollouts): each response's conversation after the prompt, as messages
  ({"role", "content"}); `responses` then holds the final reply;
- `+reward.kwargs.<key>=...` from the config (one value for every response).
Write your own the same way and name it as `package.module:function`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhf_cli.core.errors import RewardError, UserError

RewardFn = Callable[..., list[float]]
MODEL_TERM = "model"  # the reward model's term: rewards/model
ENV_TERM = "env"  # a multi-turn environment's summed rewards: rewards/env


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
    fn: RewardFn | None = None  # bound to the reward.kwargs it takes
    params: frozenset[str] | None = None  # the keywords it takes; None: any (**kwargs)
    required: frozenset[str] = frozenset()  # keywords it cannot do without
    bound: frozenset[str] = frozenset()  # the reward.kwargs bound into fn

    def takes(self, key: str) -> bool:
        return self.params is None or key in self.params


def function_term(name: str, spec: str, weight: float, kwargs: dict[str, Any]) -> RewardTerm:
    """A term for the function `spec`, bound to the `kwargs` it takes."""
    fn = load_reward_fn(spec)
    params, required = _signature(fn)
    accepted = {k: v for k, v in kwargs.items() if params is None or k in params}
    return RewardTerm(
        name, spec, weight, functools.partial(fn, **accepted), params, required, frozenset(accepted)
    )


def _signature(fn: RewardFn) -> tuple[frozenset[str] | None, frozenset[str]]:
    """(the keywords `fn` takes, None for any; those without a default), past the two
    positional ones (prompts, responses)."""
    try:
        params = list(inspect.signature(fn).parameters.values())[2:]
    except (TypeError, ValueError):  # a builtin or C function: pass everything
        return None, frozenset()
    empty = inspect.Parameter.empty
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = frozenset(p.name for p in named if p.default is empty)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None, required
    return frozenset(p.name for p in named), required


def row_inputs(
    columns: list[dict[str, Any]], response_ids: list[list[int]], max_new_tokens: int
) -> dict[str, Any]:
    """The keywords a batch offers its reward functions: each data column as a per-response
    list (None where a row lacks it), the responses' token ids and the sampling limit."""
    names = sorted(set().union(*columns)) if columns else []
    inputs: dict[str, Any] = {name: [c.get(name) for c in columns] for name in names}
    inputs["response_ids"] = response_ids
    inputs["max_new_tokens"] = max_new_tokens
    return inputs


def check_inputs(terms: list[RewardTerm], columns: set[str], multi_turn: bool = False) -> None:
    """Before sampling: each function gets every keyword it needs (from reward.kwargs, the
    data's columns or the tool's own), and no data column shadows a reward.kwargs value."""
    offered = columns | {"response_ids", "max_new_tokens"} | ({"turns"} if multi_turn else set())
    for term in terms:
        if term.fn is None:
            continue
        missing = sorted(term.required - term.bound - offered)
        if missing:
            raise UserError(
                f"reward function {term.spec} needs {', '.join(missing)}: add a data column of "
                f"that name (the columns are: {', '.join(sorted(columns)) or 'only the prompt'}) "
                f"or +reward.kwargs.{missing[0]}=..."
            )
        both = sorted(k for k in term.bound & columns)
        if both:
            raise UserError(
                f"reward function {term.spec}: {both[0]!r} is both a data column and "
                f"reward.kwargs.{both[0]}: rename one"
            )


def reward_terms(reward) -> list[RewardTerm]:
    """The terms of a RewardConfig, in order (the functions of reward.fn or reward.fns, then
    reward.model), each function bound to the reward.kwargs it accepts. Imports the functions:
    a typo fails here, before any model loads."""
    specs = [reward.fn] if reward.fn else list(reward.fns)
    weights = [float(w) for w in reward.weights] or [1.0] * (len(specs) + bool(reward.model))
    kwargs: dict[str, Any] = dict(reward.kwargs)
    terms: list[RewardTerm] = []
    names = {MODEL_TERM, ENV_TERM}  # a function named model (env) is logged as model_2 (env_2)
    for spec, weight in zip(specs, weights):
        names.add(name := free_name(spec.rpartition(":")[2], names))
        terms.append(function_term(name, spec, weight, kwargs))
    taken = set().union(*(t.bound for t in terms)) if terms else set()
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


def call_reward_fn(
    term: RewardTerm,
    prompts: list[str],
    responses: list[str],
    inputs: dict[str, Any] | None = None,
) -> list[float]:
    """term.fn on a batch, with the `inputs` (row_inputs) it takes; an exception in it, or a
    wrong number of scores, is a RewardError naming the function."""
    extra = {k: v for k, v in (inputs or {}).items() if term.takes(k) and k not in term.bound}
    try:
        values = list(term.fn(prompts, responses, **extra))
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


# --------------------------------------------------------------------------- verifiable rewards

_BOXED = re.compile(r"\\boxed\s*\{")
_FINAL_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")


def final_answer(response: str) -> str | None:
    """The answer a response gives, as text: the content of its last \\boxed{...} (nested
    braces allowed), else its last number (with a sign, decimals, a fraction a/b, thousands
    commas); None when it gives neither. (math_answer compares with Math-Verify; it uses this
    only for a reference that is text.)"""
    if _BOXED.search(response):
        return last_boxed(response)
    numbers = _FINAL_NUMBER.findall(response)
    return numbers[-1] if numbers else None


def last_boxed(response: str) -> str | None:
    """The content of the last \\boxed{...} (nested braces allowed); None when there is none or
    it is not closed."""
    starts = [m.end() for m in _BOXED.finditer(response)]
    if not starts:
        return None
    depth, i = 1, starts[-1]
    for j in range(i, len(response)):
        depth += {"{": 1, "}": -1}.get(response[j], 0)
        if depth == 0:
            return response[i:j]
    return None  # an unclosed \\boxed{


@functools.cache
def _math_verify():
    try:
        import math_verify
    except ImportError as err:
        raise RewardError(
            "rlhf_cli.rewards:math_answer needs Math-Verify: pip install 'math-verify[antlr4_9_3]'"
            f" ({err})"
        ) from None
    return math_verify


def _parse(text: str, timeout: int | None) -> list:
    mv = _math_verify()
    targets = [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]
    return mv.parse(text, targets, parsing_timeout=timeout)


def verify_answer(response: str, answer: Any) -> bool:
    """Whether `response` gives the reference `answer`, by Math-Verify (the Hugging Face checker
    that TRL, verifiers, reasoning-gym and GEM use): the response's answer is extracted (a
    \\boxed{} first, then the last LaTeX or plain expression), parsed into SymPy and compared
    with the reference's (numbers to 6 decimal places, fractions, percents, sets, intervals,
    equations' right-hand sides, units and \\text dropped). A reference of words, or one that
    does not parse as math, is compared as text with the response's last \\boxed{} (or the
    whole response): case, spaces, $, \\text{} and a final period ignored."""
    if answer is None:
        return False
    expected = str(answer)
    if _WORDS.fullmatch(expected.strip()):  # "Paris", "yes": a word is no formula (p*a*r*i*s)
        return _plain(response) == _plain(expected)
    # Math-Verify's timeouts are signals: they work only in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    # A bare reference with LaTeX or brackets in it ("\\frac{1}{2}", "(3, 4)") is read as
    # LaTeX; a plain one ("1,234", "0.5") as an expression first.
    wrapped = f"${expected}$"
    latex = "$" not in expected and any(c in expected for c in "\\()[]{}^")
    first, second = (wrapped, expected) if latex else (expected, wrapped)
    gold = _parse(first, timeout) or _parse(second, timeout)
    if not gold:
        return _plain(response) == _plain(expected)
    predicted = _parse(response, timeout)
    return bool(predicted) and _math_verify().verify(gold, predicted, timeout_seconds=timeout)


_WORDS = re.compile(r"[A-Za-z][A-Za-z '-]*\.?")


def _plain(text: str) -> str:
    text = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", final_answer(text) or text)
    return re.sub(r"[\s$]", "", text).rstrip(".").lower()


def math_answer(prompts: list[str], responses: list[str], answer: list[Any]) -> list[float]:
    """Verifiable reward: 1.0 when the response's final answer equals its row's `answer` column
    by Math-Verify (verify_answer: \\boxed{} first, else the last expression; numbers,
    fractions, percents, LaTeX), else 0.0."""
    return [float(verify_answer(r, a)) for r, a in zip(responses, answer, strict=True)]


THINK_ANSWER = r"<think>.*?</think>\s*<answer>.*?</answer>"


def format_match(
    prompts: list[str], responses: list[str], pattern: str = THINK_ANSWER
) -> list[float]:
    """1.0 when the whole response (stripped) matches the regular expression `pattern` (default
    <think>...</think><answer>...</answer>; `.` spans lines), else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(r.strip()) is not None) for r in responses]


def overlong_penalty(
    prompts: list[str],
    responses: list[str],
    response_ids: list[list[int]],
    max_new_tokens: int,
    overlong_buffer: int | None = None,
) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), a reward term: 0 for a response
    of L <= L_max - L_cache tokens, (L_max - L_cache - L) / L_cache in the last L_cache tokens
    before L_max (down to -1 at L_max), -1 beyond. L_max is the sampling limit
    (stage.max_new_tokens), L_cache `overlong_buffer` (default a fifth of L_max)."""
    cache = overlong_buffer if overlong_buffer is not None else max(1, max_new_tokens // 5)
    if not 0 < cache <= max_new_tokens:
        raise ValueError(f"overlong_buffer={cache} must be in [1, max_new_tokens={max_new_tokens}]")
    free = max_new_tokens - cache
    out = []
    for ids in response_ids:
        n = len(ids)
        out.append(0.0 if n <= free else (free - n) / cache if n <= max_new_tokens else -1.0)
    return out
