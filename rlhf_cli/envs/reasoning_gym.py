"""reasoning-gym (open-thought/reasoning-gym) as data and reward.

- Data: `data.path=reasoning_gym:TASK` (or a mixture, `reasoning_gym:TASK+TASK...`, drawn by
  data.reasoning_gym.weights) generates data.reasoning_gym.size rows from the seed
  data.reasoning_gym.seed, each `{prompt, answer, metadata, task}`: the generator's question, its
  reference answer and metadata, and the task's name (a mixture keeps each row's own).
- Reward: `reward.fn=rlhf_cli.envs.reasoning_gym:score` takes each response's final answer (the
  last `<answer>...</answer>`, else the last `\\boxed{...}`, else the last non-empty line) and
  grades it with reasoning-gym's own scorer for that row's task, against that row's answer and
  metadata. Some tasks give partial credit (e.g. 0.01 for a wrong answer of the right form);
  `+reward.kwargs.partial=false` counts only a full score (1) and scores everything else 0.

An optional extra: pip install 'rlhf-cli[reasoning-gym]'.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from rlhf_cli.config import ReasoningGymConfig
from rlhf_cli.core.errors import UserError
from rlhf_cli.rewards import last_boxed

PREFIX = "reasoning_gym:"
INSTALL = "pip install 'rlhf-cli[reasoning-gym]' (in a checkout: .venv/bin/pip install -e '.[reasoning-gym]')"


@functools.cache
def _rg():
    try:
        import reasoning_gym
    except ImportError:
        raise UserError(
            f"data.path=reasoning_gym:...: reasoning-gym is not installed: {INSTALL}"
        ) from None
    return reasoning_gym


def tasks_of(path: str) -> list[str]:
    """The task names of data.path=reasoning_gym:TASK[+TASK...]."""
    return [t.strip() for t in path[len(PREFIX) :].split("+") if t.strip()]


def rows(path: str, cfg: ReasoningGymConfig) -> list[dict[str, Any]]:
    """The generated rows of data.path=reasoning_gym:TASK[+TASK...]."""
    rg = _rg()
    tasks = tasks_of(path)
    known = sorted(n for n in rg.factory.DATASETS if n != "composite")
    unknown = [t for t in tasks if t not in known]
    if not tasks or unknown:
        raise UserError(
            f"data.path={path}: {'no task named' if not tasks else 'no such task: ' + ', '.join(unknown)}; "
            f"reasoning-gym has {len(known)}, e.g. {', '.join(known[:6])} (reasoning_gym.factory.DATASETS)"
        )
    weights = cfg.weights or [1.0] * len(tasks)
    if len(weights) != len(tasks):
        raise UserError(
            f"data.reasoning_gym.weights has {len(weights)} values for {len(tasks)} tasks: give one "
            "per task of data.path, or none for equal weights"
        )
    configs = dict(cfg.config)
    extra = sorted(set(configs) - set(tasks))
    if extra:
        raise UserError(
            f"data.reasoning_gym.config names {', '.join(extra)}, not a task of data.path={path}"
        )
    try:
        if len(tasks) == 1:
            data = rg.create_dataset(
                tasks[0], size=cfg.size, seed=cfg.seed, **dict(configs.get(tasks[0], {}))
            )
        else:
            from reasoning_gym.composite import DatasetSpec

            specs = [DatasetSpec(t, w, dict(configs.get(t, {}))) for t, w in zip(tasks, weights)]
            data = rg.create_dataset("composite", size=cfg.size, seed=cfg.seed, datasets=specs)
        entries = list(data)
    except (TypeError, ValueError, AssertionError, KeyError) as err:
        raise UserError(f"data.path={path}: reasoning-gym refused the settings: {err}") from None
    return [
        {
            "prompt": e["question"],
            "answer": e["answer"],
            "metadata": e["metadata"],
            "task": e["metadata"].get("source_dataset", tasks[0]),
        }
        for e in entries
    ]


def final_answer(response: str) -> str:
    """What a response answers: its last <answer>...</answer>, else its last \\boxed{...}, else
    its last non-empty line ("" for an empty response)."""
    from reasoning_gym.utils import extract_answer

    tagged = extract_answer(response)
    if tagged is not None:
        return tagged
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed.strip()
    lines = [line.strip() for line in response.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@functools.cache
def _scorer(task: str) -> Callable:
    return _rg().get_score_answer_fn(task)


def score(
    prompts: list[str],
    responses: list[str],
    answer: list[Any],
    metadata: list[dict],
    partial: bool = True,
) -> list[float]:
    """reasoning-gym's score of each response's final answer, by its own row's task; a scorer
    that raises on an odd answer scores it 0. partial=false: 1 for a full score, else 0."""
    _rg()
    out = []
    for question, response, ref, meta in zip(prompts, responses, answer, metadata):
        entry = {"question": question, "answer": ref, "metadata": meta}
        try:
            value = float(_scorer(meta["source_dataset"])(final_answer(response), entry))
        except Exception:  # the scorer on a malformed answer: no credit, never a crash
            value = 0.0
        out.append(value if partial else float(value >= 1.0))
    return out
