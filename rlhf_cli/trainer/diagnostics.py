"""What a training curve means, in one line: notes printed during a run (each kind once, when
first seen) and listed in its summary. Pure functions of the metric history (the `train`
records of metrics.jsonl, oldest first), so each rule has a hand-made test.

- dpo: chosen rewards that stay near 0 (or fall) while the rejected ones fall: the policy
  learns to avoid the rejected text more than to give the chosen one.
- online stages: the KL to the reference or the response length running away, the entropy
  collapsing, and groups whose rewards are all equal (no learning signal).
"""

from __future__ import annotations

from statistics import fmean
from typing import Any

WINDOW = 3  # the recent steps a rule looks at


MIN_STEPS = 2 * WINDOW  # no note before there is a start and a recent window to compare
MOSTLY_FLAT = 0.75  # the share of groups with all-equal rewards that leaves most of a step idle


def _series(history: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in history if isinstance(r.get(key), int | float)]


def dpo_notes(history: list[dict[str, Any]]) -> dict[str, str]:
    chosen, rejected = _series(history, "rewards/chosen"), _series(history, "rewards/rejected")
    if min(len(chosen), len(rejected)) < MIN_STEPS:
        return {}
    c, r = fmean(chosen[-WINDOW:]), fmean(rejected[-WINDOW:])
    # The margin grows from the rejected side: chosen up by less than a fifth of the fall.
    if r < -1.0 and c < 0.2 * -r:
        return {
            "dpo_rejected_only": (
                f"rewards/chosen {c:+.2f} while rewards/rejected {r:+.2f}: the policy learns to "
                "avoid the rejected answers more than to give the chosen ones (their "
                "log-probability is not rising); train SFT on the chosen answers first, or add "
                "stage.rpo_alpha=1 (an NLL term on chosen)"
            )
        }
    return {}


def online_notes(history: list[dict[str, Any]], max_new_tokens: int) -> dict[str, str]:
    notes: dict[str, str] = {}
    kl = _series(history, "kl")
    if len(kl) >= MIN_STEPS:
        early, late = fmean(kl[:WINDOW]), fmean(kl[-WINDOW:])
        if late > 10.0 and late > 4 * max(early, 1.0):
            notes["kl_runaway"] = (
                f"the KL to the reference rose to {late:.1f} nats per response (from "
                f"{early:.1f}): the policy is leaving the reference fast, often by exploiting "
                "the reward; raise stage.kl_coef, lower optim.lr, or check the samples"
            )
    length = _series(history, "response_length")
    if len(length) >= MIN_STEPS:
        early, late = fmean(length[:WINDOW]), fmean(length[-WINDOW:])
        if late >= 0.9 * max_new_tokens and late > 1.5 * early:
            notes["length_runaway"] = (
                f"responses grew to {late:.0f} tokens (from {early:.0f}), at "
                f"stage.max_new_tokens={max_new_tokens}: a reward that favours length, or "
                "answers that never end; add stage.missing_eos_penalty, stage.mask_truncated, "
                "or a length term in the reward"
            )
    entropy = _series(history, "entropy")
    if len(entropy) >= MIN_STEPS:
        early, late = fmean(entropy[:WINDOW]), fmean(entropy[-WINDOW:])
        if early > 0 and late < 0.1 * early:
            notes["entropy_collapse"] = (
                f"the entropy fell to {late:.3f} nats per token (from {early:.2f}): sampling has "
                "become nearly deterministic and groups stop differing; lower optim.lr, raise "
                "stage.temperature or stage.clip_eps_high"
            )
    flat = _series(history, "zero_std_groups")
    if len(flat) >= WINDOW and min(flat[-WINDOW:]) >= MOSTLY_FLAT:
        notes["equal_rewards"] = (
            f"in the last {WINDOW} steps {fmean(flat[-WINDOW:]):.0%} of the groups had all-equal "
            "rewards (each step at least three in four): no advantage, little to learn; a "
            "larger stage.group_size, stage.dynamic_sampling=true, an easier task (a lower "
            "difficulty in the generator's settings), a denser reward, or a higher "
            "stage.temperature"
        )
    return notes


def notes(stage: str, history: list[dict[str, Any]], max_new_tokens: int = 0) -> dict[str, str]:
    """{kind: note} for the stage's history (empty when nothing stands out)."""
    if stage == "dpo":
        return dpo_notes(history)
    if stage in ("ppo", "grpo", "rloo", "reinforce"):
        return online_notes(history, max_new_tokens)
    return {}
