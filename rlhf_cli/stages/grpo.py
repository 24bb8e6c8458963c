"""Stage grpo: Group Relative Policy Optimization (Shao et al. 2024).

K responses per prompt, one score each; the advantage of a response is its score normalised
within its group, (R - mean) / (std + eps) (or R - mean with stage.scale_rewards=false), the
same for all its tokens. No value model. The KL to the reference (k3) is a per-token loss term,
not a reward penalty, averaged with the policy loss (stage.loss_agg: token_mean by default, as
DAPO; seq_mean_token_mean as published; seq_sum_norm with scale_rewards=false is Dr. GRPO).
"""

from __future__ import annotations

from rlhf_cli.losses import group_advantages, kl_penalty, masked_mean
from rlhf_cli.rollout.batch import Rollout
from rlhf_cli.trainer.online import OnlineStage


class GRPOStage(OnlineStage):
    name = "grpo"

    def advantages(self, rollout: Rollout, rewards, old: dict) -> None:
        s = self.cfg.stage
        kind = "grpo" if s.scale_rewards else "mean"
        old["advantages"] = group_advantages(rewards.float(), s.group_size, kind=kind)

    def extra_loss(self, logps, values, mb: dict, mask):
        # Per token, added to the policy's token losses: aggregated as stage.loss_agg says.
        kl = kl_penalty(logps, mb["ref_logps"], self.cfg.stage.kl_estimator)
        return self.kl_coef * kl, {"policy/kl_loss": masked_mean(kl, mask).detach()}
