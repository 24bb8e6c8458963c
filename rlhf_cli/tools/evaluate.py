"""`rlhf eval RUN`: how good a policy is, and how far it moved.

- reward: sample responses to a prompt set and score them with a reward function or a reward
  model (mean and spread);
- KL to the reference: for each sample y ~ pi(.|x), sum over its tokens of log pi - log pi_ref,
  averaged over samples: a Monte-Carlo estimate of KL(pi || pi_ref) per sequence (exact in
  expectation at temperature 1, the policy's own distribution), the x-axis of the DPO paper's
  reward-vs-KL frontier (Rafailov et al. 2023, figure 2);
- on preference pairs: the implicit-reward accuracy, P[beta log pi/pi_ref (chosen) > the same
  for rejected] (DPO's `rewards/accuracies`), and the policy's own preference accuracy,
  P[log pi(chosen) > log pi(rejected)].
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from rlhf_cli.core.errors import UserError
from rlhf_cli.core.progress import console, summary_table
from rlhf_cli.data.batches import collate_preference
from rlhf_cli.data.examples import build_examples
from rlhf_cli.data.rows import load_rows
from rlhf_cli.losses import prompt_pass_at_k
from rlhf_cli.model.heads import load_reward_model, score_examples, scoring_examples
from rlhf_cli.model.load import autocast_dtype
from rlhf_cli.rewards import RewardTerm, call_reward_fn, check_inputs, function_term, row_inputs
from rlhf_cli.rollout.engine import generation_config
from rlhf_cli.tools.policy import Policy, generate, load_policy, prompt_examples
from rlhf_cli.tools.sample import default_max_new_tokens


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class RewardModelScorer:
    """Scores (prompt ids, response ids) of the policy's tokenizer with a reward model trained
    by stage=rm; text is re-encoded when the reward model has another vocabulary."""

    def __init__(self, path: str, policy: Policy, batch_size: int):

        self.model, self.head, self.tokenizer, cfg = load_reward_model(path, policy.device)
        self.amp = autocast_dtype(cfg.train.precision, policy.device)
        self.policy, self.batch_size = policy, batch_size

    def __call__(self, prompts: list[list[int]], responses: list[list[int]]) -> list[float]:

        p = self.policy
        examples = scoring_examples(prompts, responses, p.tokenizer, self.tokenizer)
        scores = score_examples(
            self.model, self.head, examples, self.tokenizer, self.batch_size, p.device, self.amp
        )
        return scores.tolist()


def sequence_logps(
    policy: Policy, prompts: list[list[int]], responses: list[list[int]], batch_size: int
) -> tuple[list[float], list[float] | None]:
    """(log pi(y|x), log pi_ref(y|x) or None without a reference) of each (prompt, response)."""
    pi: list[float] = []
    ref: list[float] | None = [] if policy.reference is not None else None
    examples = [
        {"prompt_ids": p, "responses_ids": [r], "margin": None} for p, r in zip(prompts, responses)
    ]
    for chunk in batches(examples, batch_size):
        batch = collate_preference(chunk, policy.tokenizer.pad_token_id)
        pi += policy.logps(batch).tolist()
        if ref is not None:
            ref += policy.logps(batch, reference=True).tolist()
    return pi, ref


def pair_metrics(policy: Policy, path: str, beta: float, batch_size: int) -> dict[str, Any]:
    """Implicit-reward and policy preference accuracies on preference data (best vs worst of a
    ranked list)."""
    stats: Counter = Counter()
    rows = load_rows(path, name=None, split="train", on_bad_row="drop", stats=stats)
    data_cfg = replace(policy.cfg.data, path=path, format="auto", eval_size=0.0)
    examples, report = build_examples(rows, path, data_cfg, policy.renderer(), "preference", stats)
    console.print("pairs: " + report.line())
    chosen_pi, rejected_pi, margins = [], [], []
    for chunk in batches(examples, batch_size):
        batch = collate_preference(chunk, policy.tokenizer.pad_token_id)
        index = batch["index"]
        last = (index >= 0).sum(1) - 1
        rows_ = torch.arange(index.shape[0])
        best, worst = index[:, 0], index[rows_, last]
        pi = policy.logps(batch).cpu()
        chosen_pi += pi[best].tolist()
        rejected_pi += pi[worst].tolist()
        if policy.reference is not None:
            ref = policy.logps(batch, reference=True).cpu()
            margins += (beta * ((pi[best] - ref[best]) - (pi[worst] - ref[worst]))).tolist()
    n = len(examples)
    out: dict[str, Any] = {
        "path": path,
        "pairs": n,
        "preference_accuracy": sum(c > r for c, r in zip(chosen_pi, rejected_pi)) / n,
        "beta": beta,
        "implicit_accuracy": sum(m > 0 for m in margins) / n if margins else None,
        "implicit_margin": statistics.fmean(margins) if margins else None,
    }
    return out


def evaluate(
    run: str,
    prompts: str | None = None,
    *,
    reward_model: str | None = None,
    reward_fn: str | None = None,
    reward_kwargs: dict | None = None,
    pairs: str | None = None,
    out: str | None = None,
    ref: str | None = None,
    label: str | None = None,
    beta: float | None = None,
    n: int = 1,
    max_new_tokens: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    engine: str = "hf",
    batch_size: int = 16,
    device: str = "auto",
    seed: int = 0,
    quant: str | None = None,
) -> dict[str, Any]:
    """Evaluate `run` (see the module docstring); returns the JSON it writes to `out`."""
    if prompts is None and pairs is None:
        raise UserError("nothing to evaluate: name prompts=FILE (and/or pairs=PREFERENCE_FILE)")
    if reward_model and reward_fn:
        raise UserError("name one reward source: reward.model=<rm run> or reward.fn=module:fn")
    fn = None  # a typo fails before loading
    if reward_fn:
        fn = function_term("reward", reward_fn, 1.0, reward_kwargs or {})
        unused = sorted(set(reward_kwargs or {}) - fn.bound)
        if unused:
            raise UserError(
                f"reward.kwargs.{unused[0]}: {reward_fn} takes no such argument: drop it or fix "
                "its name"
            )
    policy = load_policy(run, device, quant, with_reference=ref is None)
    policy.engine_name = engine
    if ref is not None:
        other = load_policy(ref, device, quant)
        if other.tokenizer.get_vocab() != policy.tokenizer.get_vocab():
            raise UserError(f"ref={ref}: another tokenizer than {run}'s; KL needs the same one")
        policy.ref_model, policy.reference = other.model, other.description
    result: dict[str, Any] = {
        "run": str(run),
        "label": label or Path(run).name,
        "policy": policy.description,
        "reference": policy.reference,
    }
    table: dict[str, Any] = {"policy": policy.description, "reference": policy.reference or "none"}
    if prompts is not None:
        result.update(
            _sample_and_score(
                policy,
                prompts,
                reward_model,
                fn,
                n=n,
                max_new_tokens=max_new_tokens or default_max_new_tokens(policy.cfg),
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                min_p=min_p,
                batch_size=batch_size,
                seed=seed,
            )
        )
        result["reward_source"] = (
            f"reward.model={reward_model}"
            if reward_model
            else f"reward.fn={reward_fn}"
            if fn
            else None
        )
        table["samples"] = f"{result['samples']} ({prompts}, temperature {temperature})"
        if result["reward_source"]:
            table["reward"] = f"{result['reward']:.4f} ± {result['reward_std']:.4f} (mean ± std)"
            table["reward source"] = result["reward_source"]
        if result["kl"] is not None:
            table["KL to reference"] = f"{result['kl']:.4f} ± {result['kl_std']:.4f} nats/sequence"
        for key, value in result.items():
            if key.startswith("pass@"):
                table[key] = value
        table["response tokens"] = result["response_length"]
        table["ended with EOS"] = result["eos_fraction"]
    if pairs is not None:
        if beta is None:
            beta = float(getattr(policy.cfg.stage, "beta", 0.1))
        result["pairs"] = pair_metrics(policy, pairs, beta, batch_size)
        p = result["pairs"]
        table["preference accuracy"] = f"{p['preference_accuracy']:.4f} ({p['pairs']} pairs)"
        if p["implicit_accuracy"] is not None:
            table["implicit-reward accuracy"] = f"{p['implicit_accuracy']:.4f} (beta {beta})"
            table["implicit-reward margin"] = p["implicit_margin"]
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
        table["written to"] = out
    summary_table(f"rlhf eval {run}", table)
    return result


def pass_rates(examples: list[dict], scores: list[float], n: int) -> dict[str, float]:
    """pass@k (k = 1, 2, 4, ... n) over the prompts, each sampled n times (a score >= 1 passes),
    and per task where the rows name one (a `task` column)."""
    by_key: dict[str, list[float]] = {}
    for i in range(0, len(scores), n):
        passed = sum(s >= 1.0 for s in scores[i : i + n])
        task = examples[i].get("columns", {}).get("task")
        for key, value in prompt_pass_at_k(n, passed, task).items():
            by_key.setdefault(key, []).append(value)
    return {key: statistics.fmean(values) for key, values in by_key.items()}


def _sample_and_score(
    policy: Policy,
    prompts: str,
    reward_model: str | None,
    fn: RewardTerm | None,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    min_p: float,
    batch_size: int,
    seed: int,
) -> dict[str, Any]:
    examples = [ex for ex in prompt_examples(policy, prompts) for _ in range(n)]
    if fn is not None:  # every argument it needs, before any sampling
        check_inputs([fn], {k for ex in examples for k in ex.get("columns", {})})
    prompt_ids = [ex["prompt_ids"] for ex in examples]
    generation = generation_config(
        policy.tokenizer, max_new_tokens, temperature, top_p, top_k, min_p
    )
    torch.manual_seed(seed)
    responses = generate(policy, prompt_ids, generation, batch_size)
    texts = [policy.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    scores: list[float] | None = None
    if fn is not None:
        inputs = row_inputs([ex.get("columns", {}) for ex in examples], responses, max_new_tokens)
        scores = call_reward_fn(fn, [ex["prompt_text"] for ex in examples], texts, inputs)
    elif reward_model:
        scores = RewardModelScorer(reward_model, policy, batch_size)(prompt_ids, responses)
    pi, ref = sequence_logps(policy, prompt_ids, responses, batch_size)
    kls = [a - b for a, b in zip(pi, ref)] if ref is not None else None
    reward, reward_std = mean_std(scores) if scores is not None else (None, None)
    kl, kl_std = mean_std(kls) if kls is not None else (None, None)
    eos = policy.tokenizer.eos_token_id
    return {
        "prompts": prompts,
        "samples": len(responses),
        "reward": reward,
        "reward_std": reward_std,
        **(pass_rates(examples, scores, n) if scores is not None and n > 1 else {}),
        "kl": kl,
        "kl_std": kl_std,
        "logp": statistics.fmean(pi),
        "response_length": statistics.fmean(len(r) for r in responses),
        "eos_fraction": statistics.fmean(bool(r) and r[-1] == eos for r in responses),
        "settings": {
            "n": n,
            "temperature": temperature,
            "top_p": top_p,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "quant": policy.cfg.quant.mode,
        },
        "responses": [
            {
                "prompt": ex["prompt_text"],
                "response": text.strip(),
                "score": None if scores is None else scores[i],
                "kl": None if kls is None else kls[i],
                "ended": bool(responses[i]) and responses[i][-1] == eos,
            }
            for i, (ex, text) in enumerate(zip(examples, texts))
        ],
    }
