"""Stage rloo: REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024).

K responses per prompt; each response's reward is its score minus kl_coef times its sequence
KL to the reference (summed per-token estimates, stage.kl_estimator); its advantage is that reward minus the mean reward of the other K-1
responses of its prompt. The whole response is one action (the same advantage for every token).
"""

from __future__ import annotations

from rlhf_cli.losses import group_advantages, kl_penalty
from rlhf_cli.rollout.batch import Rollout
from rlhf_cli.trainer.online import OnlineStage


class RLOOStage(OnlineStage):
    name = "rloo"

    def advantages(self, rollout: Rollout, rewards, old: dict) -> None:
        s = self.cfg.stage
        kl = kl_penalty(old["logps"], old["ref_logps"], s.kl_estimator) * rollout.mask
        penalised = rewards.float() - self.kl_coef * kl.sum(-1)
        old["advantages"] = group_advantages(penalised, s.group_size, kind="rloo")
