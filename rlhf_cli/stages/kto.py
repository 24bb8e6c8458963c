"""Stage kto: Kahneman-Tversky optimization (Ethayarajh et al. 2024) on unpaired feedback.

Each example is one completion, desirable or not (`prompt`/`completion`/`label` rows; a
preference pair gives one of each). With r = logp_pi - logp_ref, a desirable completion costs
w_d (1 - sigmoid(beta (r - z0))) and an undesirable one w_u (1 - sigmoid(beta (z0 - r))), see
losses.kto_loss. The reference point z0 is the policy's KL to the reference, estimated as the
paper does from mismatched pairs of the batch (prompt i with completion i+1), averaged over
ranks, detached and clamped at 0. The reference policy is DPO's (same options, same
precompute for the matched completions).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_cli import distributed as dist
from rlhf_cli.data import collate_preference
from rlhf_cli.losses import kto_loss
from rlhf_cli.progress import console
from rlhf_cli.stages.dpo import DPOStage, response_logps

KL_PREFIX = "kl/"  # keys of the mismatched-pairs batch inside a collated batch


def mismatched(examples: list[dict]) -> list[dict]:
    """Prompt i with the completion of example i+1 (cyclically): pairs that were never rated."""
    n = len(examples)
    return [
        {
            "prompt_ids": examples[i]["prompt_ids"],
            "responses_ids": examples[(i + 1) % n]["responses_ids"],
            "margin": None,
        }
        for i in range(n)
    ]


class KTOStage(DPOStage):
    name = "kto"
    data_kind = "unpaired"

    def collate(self, examples):
        batch = super().collate(examples)
        batch["desirable"] = torch.tensor([bool(ex["desirable"]) for ex in examples])
        kl = collate_preference(
            mismatched(examples),
            self.tokenizer.pad_token_id,
            shared_prompt=self.cfg.train.shared_prompt,
            multiple=self.cfg.train.pad_to_multiple_of,
        )
        batch.update({KL_PREFIX + k: v for k, v in kl.items()})
        return batch

    def prepare(self, train_examples: list, eval_examples: list, run_dir: Path) -> None:
        s = self.cfg.stage
        good = sum(bool(ex["desirable"]) for ex in train_examples)
        bad = len(train_examples) - good
        if good == 0 or bad == 0:
            console.print(
                f"[yellow]warning:[/] kto: the data has {good} desirable and {bad} undesirable "
                "examples; KTO learns from both kinds"
            )
        else:
            ratio = s.desirable_weight * good / (s.undesirable_weight * bad)
            if not 1.0 <= ratio <= 4 / 3:
                console.print(
                    f"[yellow]warning:[/] kto: w_d n_d / (w_u n_u) = {ratio:.2f} ({good} desirable, "
                    f"{bad} undesirable); the paper keeps it in [1, 4/3]: set "
                    "stage.desirable_weight / stage.undesirable_weight"
                )
        super().prepare(train_examples, eval_examples, run_dir)

    @torch.no_grad()
    def reference_point(self, batch) -> torch.Tensor:
        """z0: the mean of logp_pi - logp_ref over the mismatched pairs, over all ranks."""
        kl = {k[len(KL_PREFIX) :]: v for k, v in batch.items() if k.startswith(KL_PREFIX)}
        gap = response_logps(self.model, kl)[0] - self.reference_logps(kl)
        sums = torch.stack([gap.sum().float(), torch.tensor(float(gap.numel()), device=gap.device)])
        total, count = dist.all_reduce_sum(sums).tolist()
        return torch.tensor(max(total / count, 0.0), device=gap.device)

    def loss(self, batch):
        s = self.cfg.stage
        z0 = self.reference_point(batch)
        policy, _ = response_logps(self.model, batch)
        ref = self.reference_logps(batch).to(policy.dtype)
        rows = batch["index"][:, 0]
        policy, ref = policy[rows], ref[rows]
        desirable = batch["desirable"].to(policy.device)
        losses = kto_loss(
            policy,
            ref,
            desirable,
            z0,
            beta=s.beta,
            desirable_weight=s.desirable_weight,
            undesirable_weight=s.undesirable_weight,
        )
        rewards = s.beta * (policy - ref).detach()
        n = float(len(rows))
        good, bad = desirable, ~desirable
        # Class means of this micro-batch, times its size: the loop divides sums by the step's
        # example count, so these read as (size-weighted) class means.
        metrics = {
            "rewards/desirable": rewards[good].mean() * n if good.any() else rewards.new_zeros(()),
            "rewards/undesirable": rewards[bad].mean() * n if bad.any() else rewards.new_zeros(()),
            "kl": z0 * n,
            "desirable_fraction": good.float().sum(),
        }
        return losses.sum(), metrics
