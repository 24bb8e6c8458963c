"""A rollout batch: the replies an engine wrote, joined with their prompts into padded
tensors (`Rollout`), grouped per prompt for GRPO/RLOO."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Reply:
    ids: list[int]  # the response's tokens up to and including the first EOS
    ended: bool  # it reached EOS (False: cut off at max_new_tokens)
    logps: list[float] | None = None  # the engine's log-prob of each token (vllm)


@dataclass
class Rollout:
    """A batch of sampled responses; (B, R) tensors are aligned to the response tokens."""

    input_ids: torch.Tensor  # (B, P + R) left-padded prompt, then the response
    attention_mask: torch.Tensor  # (B, P + R): 0 on prompt padding and after the first EOS
    prompt_len: int  # P
    mask: torch.Tensor  # (B, R) bool: response tokens up to and including the first EOS
    ended: torch.Tensor  # (B,) bool: the response emitted EOS
    prompts: list[list[int]]
    prompt_texts: list[str]
    responses: list[list[int]]  # the response tokens (up to and including EOS)
    columns: list[dict[str, Any]]  # each row's other data columns, for the reward functions
    # Multi-turn (stage.env / stage.tools): `responses` hold the whole conversation after the
    # prompt, `mask` only the policy's replies; the messages, the final reply's text and the
    # environment's summed reward of each row.
    turns: list[list[dict[str, Any]]] | None = None
    final_texts: list[str] | None = None
    final_ids: list[list[int]] | None = None  # the final reply's tokens
    env_rewards: torch.Tensor | None = None
    context_full: torch.Tensor | None = None  # (B,) bool: ended as the context was full
    # (B, R) the rollout engine's log-prob of each response token (rollout.engine=vllm); 0 on
    # the context tokens of a conversation and after the response.
    engine_logps: torch.Tensor | None = None

    def select(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx]}


def join_groups(
    parts: list[Rollout], picks: list[tuple[int, int]], group_size: int, pad: int
) -> Rollout:
    """One rollout of the picked groups ((part, group) pairs) of several rollouts: prompts
    left-padded to the widest, responses right-padded to the longest."""
    rows = [(parts[p], g * group_size + j) for p, g in picks for j in range(group_size)]
    multiturn = {}
    if rows[0][0].turns is not None:
        multiturn = {
            "turns": [r.turns[i] for r, i in rows],
            "final_texts": [r.final_texts[i] for r, i in rows],
            "final_ids": [r.final_ids[i] for r, i in rows],
            "env_rewards": torch.stack([r.env_rewards[i] for r, i in rows]),
            "context_full": torch.stack([r.context_full[i] for r, i in rows]),
        }
    return make_rollout(
        [
            {"prompt_ids": r.prompts[i], "prompt_text": r.prompt_texts[i], "columns": r.columns[i]}
            for r, i in rows
        ],
        [r.responses[i] for r, i in rows],
        [r.mask[i, : len(r.responses[i])].tolist() for r, i in rows],
        [bool(r.ended[i]) for r, i in rows],
        pad,
        rows[0][0].input_ids.device,
        logps=None
        if rows[0][0].engine_logps is None
        else [r.engine_logps[i, : len(r.responses[i])].tolist() for r, i in rows],
        **multiturn,
    )


def make_rollout(
    rows: list[dict],
    responses: list[list[int]],
    policy: list[list[bool]],
    ended: list[bool],
    pad: int,
    device: torch.device,
    logps: list[list[float]] | None = None,
    **multiturn,
) -> Rollout:
    """A Rollout of prompt rows and their responses: prompts left-padded to the widest,
    responses right-padded to the longest; `policy` marks the tokens the policy wrote (all of
    a single-turn response); `logps` the engine's log-prob of each response token."""
    prompts = [ex["prompt_ids"] for ex in rows]
    width = max(len(p) for p in prompts)
    length = max(1, max(len(r) for r in responses))
    ids, attn = [], []
    for p, r in zip(prompts, responses):
        left, right = width - len(p), length - len(r)
        ids.append([pad] * left + p + r + [pad] * right)
        attn.append([0] * left + [1] * (len(p) + len(r)) + [0] * right)
    return Rollout(
        input_ids=torch.tensor(ids, device=device),
        attention_mask=torch.tensor(attn, device=device),
        prompt_len=width,
        mask=torch.tensor(
            [m + [False] * (length - len(m)) for m in policy], dtype=torch.bool, device=device
        ),
        ended=torch.tensor(ended, dtype=torch.bool, device=device),
        prompts=prompts,
        prompt_texts=[ex["prompt_text"] for ex in rows],
        responses=responses,
        columns=[ex.get("columns", {}) for ex in rows],
        engine_logps=None
        if logps is None
        else torch.tensor(
            [lp + [0.0] * (length - len(lp)) for lp in logps], dtype=torch.float32, device=device
        ),
        **multiturn,
    )


def generate_batches(engine, prompts: list[list[int]], generation, batch_size: int) -> list[Reply]:
    """`engine.generate` over `prompts` in batches of `batch_size` (the hf engine's memory
    bound; vLLM schedules its own batches, so it gets them all at once)."""
    if engine.name == "vllm":
        return engine.generate(prompts, generation)
    replies: list[Reply] = []
    for start in range(0, len(prompts), batch_size):
        replies += engine.generate(prompts[start : start + batch_size], generation)
    return replies
