"""Stage kto: Kahneman-Tversky optimization (Ethayarajh et al. 2024) on unpaired feedback.

Each example is one completion, desirable or not (`prompt`/`completion`/`label` rows; a
preference pair gives one of each). With r = logp_pi - logp_ref, a desirable completion costs
w_d (1 - sigmoid(beta (r - z0))) and an undesirable one w_u (1 - sigmoid(beta (z0 - r))), see
losses.kto_loss. The reference point z0 is the policy's KL to the reference, estimated as the
paper does from mismatched pairs (prompt i with completion i+1) of the whole step, before its
micro-batches run: over every example of the global step (all micro-batches, all ranks), so
it is the same for any split into ranks and micro-batches, and an evaluation estimates it once
over all its examples (a last batch of one example is not paired with itself). Detached and
clamped at 0. A step of one example has no mismatched pair: refused. The reference policy is
DPO's (same options, same precompute for the matched completions).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_cli.core import distributed as dist
from rlhf_cli.core.progress import console
from rlhf_cli.data.batches import collate_preference, move
from rlhf_cli.losses import kto_loss
from rlhf_cli.model.forward import response_logps
from rlhf_cli.model.load import autocast
from rlhf_cli.stages.dpo import DPOStage


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

    z0: torch.Tensor | None = None  # the current step's reference point (begin_step)
    class_scale = (1.0, 1.0)  # N / desirable and N / undesirable examples of the step

    def collate(self, examples):
        batch = super().collate(examples)
        batch["desirable"] = torch.tensor([bool(ex["desirable"]) for ex in examples])
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
    def begin_step(self, examples: list) -> None:
        """z0 for a step (or an evaluation) on `examples`, all of it on every rank: the mean of
        logp_pi - logp_ref over the mismatched pairs of the whole list; and the step's class
        counts, for the class-mean metrics. Each rank scores a
        share, in micro-batches; the sums are added over ranks (a collective: every rank
        calls this, whatever its share)."""
        good = sum(bool(ex["desirable"]) for ex in examples)
        n = len(examples)
        self.class_scale = (n / max(good, 1), n / max(n - good, 1))
        pairs = mismatched(examples)[dist.rank() :: dist.world_size()]
        size = self.cfg.train.micro_batch_size
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in range(0, len(pairs), size):
            batch = collate_preference(
                pairs[i : i + size],
                self.tokenizer.pad_token_id,
                shared_prompt=self.cfg.train.shared_prompt,
                multiple=self.cfg.train.pad_to_multiple_of,
                pack=self.pack,
                slices=self.slices,
            )
            batch = move(batch, self.device)
            with autocast(self.amp_dtype, self.device):
                gap = response_logps(self.model, batch)[0] - self.reference_logps(batch)
            sums[0] += gap.double().sum()
            sums[1] += gap.numel()
        total, count = dist.all_reduce_sum(sums).tolist()
        self.z0 = torch.tensor(max(total / max(count, 1.0), 0.0), device=self.device)

    def loss(self, batch):
        s = self.cfg.stage
        z0 = self.z0
        assert z0 is not None, "begin_step sets the reference point before the step's losses"
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
        # The loop divides every sum by the step's example count N: a class's sum times
        # N / (its count in the step) reads as the class mean over the whole step.
        per_good, per_bad = self.class_scale
        metrics = {
            "rewards/desirable": rewards[good].sum() * per_good,
            "rewards/undesirable": rewards[bad].sum() * per_bad,
            "kl": z0 * n,
            "desirable_fraction": good.float().sum(),
        }
        return losses.sum(), metrics
