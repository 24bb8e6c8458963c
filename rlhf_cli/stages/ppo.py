"""Stage ppo: PPO with a value head, GAE and a per-token KL penalty (Ziegler et al. 2019;
Ouyang et al. 2022).

Per-token reward r_t = -kl_coef * KL_t (+ the sequence score on the last response token);
GAE gives advantages and returns; the loss is the clipped surrogate plus vf_coef times the
clipped value loss. kl_coef is fixed or adapted towards kl_target.
"""

from __future__ import annotations

import torch

from rlhf_cli.core import distributed as dist
from rlhf_cli.losses import (
    clipped_value_loss,
    gae_advantages,
    kl_penalty,
    masked_mean,
    masked_whiten,
)
from rlhf_cli.rollout.batch import Rollout
from rlhf_cli.trainer.online import OnlineStage


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the response tokens."""
    var = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    err = returns - values
    var_err = masked_mean((err - masked_mean(err, mask)) ** 2, mask)
    return float(1 - var_err / var.clamp(min=1e-8))


class PPOStage(OnlineStage):
    name = "ppo"
    uses_value_head = True

    def advantages(self, rollout: Rollout, rewards: torch.Tensor, old: dict) -> None:
        s = self.cfg.stage
        mask = rollout.mask
        per_token = (
            -self.kl_coef * kl_penalty(old["logps"], old["ref_logps"], s.kl_estimator) * mask
        )
        last = mask.long().cumsum(-1).argmax(-1)  # index of each response's last token
        per_token[torch.arange(len(last)), last] += rewards
        values = old["values"].float() * mask
        adv, returns = gae_advantages(per_token, values, mask, s.gamma, s.gae_lambda)
        if s.whiten_advantages:  # over the whole rollout batch, every rank's share included
            adv = masked_whiten(adv, mask, all_reduce=dist.all_reduce_sum)
        old["advantages"] = adv
        old["returns"] = returns
        self.last_explained_variance = explained_variance(values, returns, mask)

    def extra_loss(self, logps, values, mb: dict, mask):
        s = self.cfg.stage
        vloss, vclip = clipped_value_loss(
            values.float(), mb["values"].float(), mb["returns"], mask, s.value_clip
        )
        return s.vf_coef * vloss, {"value/loss": vloss.detach(), "value/clipfrac": vclip}

    def train_step(self, examples, updater):
        record, tokens = super().train_step(examples, updater)
        record["value/explained_variance"] = self.last_explained_variance
        return record, tokens
