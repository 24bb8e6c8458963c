"""Stage grpo: Group Relative Policy Optimization (Shao et al. 2024).

K responses per prompt, one score each; the advantage of a response is its score normalised
within its group, (R - mean) / (std + eps) (or R - mean with stage.scale_rewards=false), the
same for all its tokens. No value model. The KL to the reference (k3) is a loss term, not a
reward penalty.
"""

from __future__ import annotations

from rlhf_cli.losses import group_advantages, kl_penalty, masked_mean
from rlhf_cli.online import OnlineStage, Rollout


class GRPOStage(OnlineStage):
    name = "grpo"

    def advantages(self, rollout: Rollout, rewards, old: dict) -> None:
        s = self.cfg.stage
        kind = "grpo" if s.scale_rewards else "mean"
        old["advantages"] = group_advantages(rewards.float(), s.group_size, kind=kind)

    def extra_loss(self, logps, values, mb: dict, mask):
        kl = masked_mean(kl_penalty(logps, mb["ref_logps"], self.cfg.stage.kl_estimator), mask)
        return self.kl_coef * kl, {"policy/kl_loss": kl.detach()}
