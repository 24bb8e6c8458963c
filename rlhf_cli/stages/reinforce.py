"""Stage reinforce: REINFORCE with a baseline (Williams 1992; the source notes' A = R - b).

Each response's reward is its score minus kl_coef times its sequence KL to the reference
(summed per-token estimates, stage.kl_estimator), as in RLOO; its advantage is that reward
minus a baseline b: the running mean of past rewards (`stage.baseline=moving`, updated after
each batch with `stage.baseline_decay`; the first batch uses its own mean) or the mean of the
current batch (`batch`). The whole response is one action. With the default single update
per rollout (minibatch = the whole batch, one epoch) the clipped loss is plain REINFORCE:
the ratio is exactly 1, so nothing is clipped and the gradient is -A grad log pi.
"""

from __future__ import annotations

import torch

from rlhf_cli.core import distributed as dist
from rlhf_cli.losses import kl_penalty
from rlhf_cli.rollout.batch import Rollout
from rlhf_cli.trainer.online import OnlineStage


def reinforce_advantages(
    rewards: torch.Tensor, baseline: float | None, kind: str, decay: float, batch_mean: float
) -> tuple[torch.Tensor, float]:
    """(A = R - b, the next moving baseline). `batch_mean` is the mean reward over every rank.
    moving: b is the running mean so far (this batch's mean when there is none yet), and the
    next one is decay b + (1 - decay) batch_mean; batch: b = batch_mean."""
    if kind == "batch":
        return rewards - batch_mean, batch_mean
    b = batch_mean if baseline is None else baseline
    return rewards - b, decay * b + (1 - decay) * batch_mean


class ReinforceStage(OnlineStage):
    name = "reinforce"

    def __init__(self, cfg, model, tokenizer, device, amp_dtype):
        super().__init__(cfg, model, tokenizer, device, amp_dtype)
        self.baseline: float | None = None

    def advantages(self, rollout: Rollout, rewards, old: dict) -> None:
        s = self.cfg.stage
        kl = kl_penalty(old["logps"], old["ref_logps"], s.kl_estimator) * rollout.mask
        penalised = rewards.float() - self.kl_coef * kl.sum(-1)
        sums = torch.stack([penalised.sum(), torch.tensor(float(len(penalised)))]).double()
        total, count = dist.all_reduce_sum(sums.to(penalised.device)).tolist()
        old["advantages"], self.baseline = reinforce_advantages(
            penalised, self.baseline, s.baseline, s.baseline_decay, total / count
        )

    def train_step(self, examples, updater):
        record, tokens = super().train_step(examples, updater)
        record["baseline"] = float(self.baseline) if self.baseline is not None else 0.0
        return record, tokens

    def state_dict(self) -> dict:
        return {**super().state_dict(), "baseline": self.baseline}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state:
            self.baseline = state.get("baseline")
