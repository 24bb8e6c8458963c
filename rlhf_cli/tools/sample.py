"""`rlhf sample RUN`: responses of a trained run (or a plain model directory) to prompts from a
file or the command line, as JSON lines {prompt, response}."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhf_cli.core.errors import UserError
from rlhf_cli.core.progress import console, summary_table
from rlhf_cli.rollout.engine import generation_config
from rlhf_cli.tools.policy import generate, load_policy, prompt_examples


def default_max_new_tokens(cfg) -> int:
    """An online run's own rollout length; otherwise 64."""
    return int(getattr(cfg.stage, "max_new_tokens", 64))


def sample(
    run: str,
    prompts: str | None = None,
    prompt: str | None = None,
    out: str | None = None,
    *,
    n: int = 1,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    engine: str = "hf",
    batch_size: int = 16,
    device: str = "auto",
    seed: int = 0,
    quant: str | None = None,
    show: int = 3,
) -> list[dict]:
    """Sample `n` responses per prompt (greedy at temperature 0); write them to `out` (JSONL)
    and print the first `show` (all of them without `out`)."""
    if (prompts is None) == (prompt is None):
        raise UserError('name the prompts: prompts=FILE or prompt="..." (one of them)')
    if n > 1 and temperature == 0:
        raise UserError(f"n={n} samples of a greedy decode are all the same: set temperature > 0")
    policy = load_policy(run, device, quant)
    policy.engine_name = engine
    examples = prompt_examples(policy, prompts, prompt)
    generation = generation_config(
        policy.tokenizer,
        max_new_tokens or default_max_new_tokens(policy.cfg),
        temperature,
        top_p,
        top_k,
        min_p,
    )
    torch.manual_seed(seed)
    ids = [ex["prompt_ids"] for ex in examples for _ in range(n)]
    responses = generate(policy, ids, generation, batch_size)
    decode = policy.tokenizer.decode
    eos = policy.tokenizer.eos_token_id
    rows = [
        {
            "prompt": ex["prompt_text"],
            "response": decode(r, skip_special_tokens=True).strip(),
            "ended": bool(r) and r[-1] == eos,  # False: cut off at max_new_tokens
        }
        for ex, r in zip((ex for ex in examples for _ in range(n)), responses)
    ]
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with Path(out).open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    for row in rows if not out else rows[:show]:
        console.print(f"[bold]prompt:[/] {row['prompt']}\n[bold]response:[/] {row['response']}\n")
    summary_table(
        f"rlhf sample {run}",
        {
            "policy": policy.description,
            "samples": f"{len(rows)} ({len(examples)} prompts x {n})",
            "decoding": (
                "greedy" if temperature == 0 else f"temperature {temperature}, top_p {top_p}"
            )
            + (f", top_k {top_k}" if top_k and temperature else "")
            + (f", min_p {min_p}" if min_p and temperature else "")
            + f" ({engine})",
            "mean response tokens": sum(map(len, responses)) / max(1, len(responses)),
            "ended with EOS": sum(bool(r) and r[-1] == eos for r in responses) / max(1, len(rows)),
            **({"written to": out} if out else {}),
        },
    )
    return rows
