"""Stage dpo: direct preference optimization (Rafailov et al. 2023) and its variants.

h = (logp_pi(y_w) - logp_ref(y_w)) - (logp_pi(y_l) - logp_ref(y_l)); the loss on h is chosen
by stage.loss_type in rlhf_cli.losses.dpo_loss. Ranked data (K > 2 responses) uses the
Plackett-Luce loss over the implicit rewards beta * (logp_pi - logp_ref).

The reference-free losses run the policy only, on mean log-probs per response token: ORPO
(Hong et al. 2024; NLL of the chosen response + orpo_lambda times the odds-ratio term) and SimPO
(Meng et al. 2024; -log sigmoid(beta (c - r) - gamma)); stage.rpo_alpha adds the chosen
response's NLL to SimPO (CPO-SimPO, as TRL's CPOTrainer) and to the other losses (RPO).

The reference policy, in order of preference:
- ref.model: a separate frozen model;
- model.adapter (training continues an SFT adapter): a frozen copy of that adapter on the same
  base, so the reference is the SFT policy, never the raw base;
- otherwise the same base with the adapter disabled (no second copy of any weight).
With ref.precompute=true the reference log-probs are computed once, cached in the run
directory, and each step runs the policy only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from rlhf_cli.config import REFERENCE_FREE
from rlhf_cli.core import distributed as dist
from rlhf_cli.core.errors import UserError
from rlhf_cli.core.progress import console
from rlhf_cli.data.batches import PreferenceBatch, collate_preference, move, row_count
from rlhf_cli.losses import dpo_loss, orpo_loss, plackett_luce_loss, simpo_loss
from rlhf_cli.model.forward import response_logps
from rlhf_cli.model.load import (
    adapter_switched,
    autocast,
    disable_dropout,
    eval_mode,
    setup_reference,
)
from rlhf_cli.trainer.loop import Stage
from rlhf_cli.trainer.state import StopRequested


def by_rank(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(N,) row values -> (B, K) by example and rank; 0 where the rank is absent."""
    return torch.where(index >= 0, rows[index.clamp(min=0)], torch.zeros((), device=rows.device))


class DPOStage(Stage):
    name = "dpo"
    data_kind = "preference"

    def __init__(self, cfg, model, tokenizer, device, amp_dtype):
        super().__init__(cfg, model, tokenizer, device, amp_dtype)
        self.reference_free = getattr(cfg.stage, "loss_type", None) in REFERENCE_FREE
        if self.reference_free:
            self.ref_model, self.ref_adapter = None, None
            self.ref_source = f"none (stage.loss_type={cfg.stage.loss_type} needs no reference)"
        else:
            self.ref_model, self.ref_adapter, self.ref_source = setup_reference(cfg, model, device)
        console.print(f"{self.name}: reference = {self.ref_source}")
        if not cfg.stage.dropout and disable_dropout(model):
            console.print(f"{self.name}: dropout off in the policy (stage.dropout=true keeps it)")

    # -- data ------------------------------------------------------------------------------

    def collate(self, examples) -> PreferenceBatch:
        batch = collate_preference(
            examples,
            self.tokenizer.pad_token_id,
            shared_prompt=self.cfg.train.shared_prompt,
            multiple=self.cfg.train.pad_to_multiple_of,
            pack=self.pack,
            slices=self.slices,
        )
        if all("ref_logps" in ex for ex in examples):
            rows = [0.0] * row_count(batch)
            for b, ex in enumerate(examples):
                for k, value in enumerate(ex["ref_logps"]):
                    rows[int(batch["index"][b, k])] = value
            batch["ref_logps"] = torch.tensor(rows, dtype=torch.float64)  # type: ignore[typeddict-unknown-key]
        return batch

    def weight(self, batch: PreferenceBatch) -> int:
        return batch["index"].shape[0]  # the loss is a mean over examples (pairs)

    # -- reference ---------------------------------------------------------------------------

    @torch.no_grad()
    def reference_logps(self, batch: PreferenceBatch) -> torch.Tensor:
        """Summed reference log-probs of every row, (N,)."""
        if "ref_logps" in batch:
            return batch["ref_logps"].to(self.device, torch.float32)  # type: ignore[typeddict-item]
        if self.ref_model is not None:
            return response_logps(self.ref_model, batch)[0]
        with eval_mode(self.model), adapter_switched(self.model, self.ref_adapter):
            return response_logps(self.model, batch)[0]

    def prepare(self, train_examples: list, eval_examples: list, run_dir: Path) -> None:
        """ref.precompute: reference log-probs for every example, once, cached on disk."""
        if not self.cfg.ref.precompute:
            return
        key = hashlib.sha256(
            json.dumps(
                [
                    self.ref_source,
                    self.cfg.model.name_or_path,
                    self.cfg.quant.mode,
                    [
                        (ex["prompt_ids"], ex["responses_ids"])
                        for ex in train_examples + eval_examples
                    ],
                ]
            ).encode()
        ).hexdigest()
        cache = run_dir / "ref_logps.pt"
        if not dist.is_main():  # rank 0 computes and writes the cache; the others read it
            dist.barrier()
            self._attach(
                train_examples + eval_examples, torch.load(cache, weights_only=True)["logps"]
            )
            return
        if cache.is_file():
            try:
                saved = torch.load(cache, weights_only=True)
            except Exception:  # noqa: BLE001 - a cut-off or foreign file: it is only a cache
                console.print(f"[yellow]warning:[/] {cache} is unreadable: computing it again")
                saved = {}
            if saved.get("key") == key:
                self._attach(train_examples + eval_examples, saved["logps"])
                console.print(f"{self.name}: reference log-probs from {cache}")
                dist.barrier()
                return
        values: list[list[float]] = []
        size = self.cfg.train.micro_batch_size
        everything = train_examples + eval_examples
        for i in range(0, len(everything), size):
            if self.stop_requested():  # a signal: stop before training (nothing to save yet)
                raise StopRequested
            chunk = [
                {k: v for k, v in ex.items() if k != "ref_logps"} for ex in everything[i : i + size]
            ]
            batch = move(self.collate(chunk), self.device)
            with autocast(self.amp_dtype, self.device):
                rows = self.reference_logps(batch).double().cpu()
            for b, ex in enumerate(chunk):
                values.append(
                    [float(rows[batch["index"][b, k]]) for k in range(len(ex["responses_ids"]))]
                )
        torch.save({"key": key, "logps": values}, cache)
        dist.barrier()
        self._attach(everything, values)
        console.print(
            f"{self.name}: reference log-probs precomputed for {len(values)} examples -> {cache}"
        )

    @staticmethod
    def _attach(examples: list, values: list[list[float]]) -> None:
        for ex, v in zip(examples, values, strict=True):
            ex["ref_logps"] = v

    # -- loss --------------------------------------------------------------------------------

    def loss(self, batch: PreferenceBatch):
        if self.reference_free:
            return self.reference_free_loss(batch)
        s = self.cfg.stage
        index = batch["index"]
        policy_sum, n_tokens = response_logps(self.model, batch)
        ref_sum = self.reference_logps(batch)
        # IPO is defined on length-normalised log-probs (Azar et al. 2023).
        normalise = s.length_normalize or s.loss_type == "ipo"
        policy = policy_sum / n_tokens if normalise else policy_sum
        ref = ref_sum / n_tokens if normalise else ref_sum
        pi, rf = by_rank(policy, index), by_rank(ref.to(policy.dtype), index)
        present = index >= 0
        if index.shape[1] == 2 and bool(present.all()):
            losses, chosen_r, rejected_r = dpo_loss(
                pi[:, 0],
                pi[:, 1],
                rf[:, 0],
                rf[:, 1],
                beta=s.beta,
                loss_type=s.loss_type,
                label_smoothing=s.label_smoothing,
            )
        else:
            if s.loss_type != "sigmoid":
                raise UserError(
                    f"ranked data (K > 2 responses) uses Plackett-Luce; stage.loss_type="
                    f"{s.loss_type} applies to pairs only: set stage.loss_type=sigmoid"
                )
            if s.label_smoothing:
                raise UserError(
                    f"ranked data (K > 2 responses) uses Plackett-Luce, which has no label "
                    f"smoothing: set stage.label_smoothing=0 (got {s.label_smoothing})"
                )
            rewards = s.beta * (pi - rf)
            losses = plackett_luce_loss(rewards, present)
            last = present.sum(1) - 1
            rows = torch.arange(index.shape[0], device=index.device)
            chosen_r, rejected_r = rewards[:, 0].detach(), rewards[rows, last].detach()
        if s.rpo_alpha:
            # RPO: NLL of the chosen response, length-normalised (Pang et al. 2024).
            chosen_nll = -(policy_sum / n_tokens)[index[:, 0]]
            losses = losses + s.rpo_alpha * chosen_nll
        last = present.sum(1) - 1
        rows = torch.arange(index.shape[0], device=index.device)
        metrics = {
            "rewards/chosen": chosen_r.sum(),
            "rewards/rejected": rejected_r.sum(),
            "rewards/accuracies": (chosen_r > rejected_r).float().sum(),
            "rewards/margins": (chosen_r - rejected_r).sum(),
            "logps/chosen": policy_sum[index[:, 0]].detach().sum(),
            "logps/rejected": policy_sum[index[rows, last]].detach().sum(),
        }
        return losses.sum(), metrics

    def reference_free_loss(self, batch: PreferenceBatch):
        """ORPO or SimPO on pairs: the policy's mean log-prob per response token (c, r)."""
        s = self.cfg.stage
        index = batch["index"]
        if index.shape[1] != 2 or not bool((index >= 0).all()):
            raise UserError(
                f"stage.loss_type={s.loss_type} takes preference pairs; ranked data (K > 2 "
                "responses) uses Plackett-Luce: set stage.loss_type=sigmoid"
            )
        policy_sum, n_tokens = response_logps(self.model, batch)
        average = policy_sum / n_tokens
        chosen, rejected = average[index[:, 0]], average[index[:, 1]]
        metrics = {}
        if s.loss_type == "orpo":
            odds = orpo_loss(chosen, rejected, lam=s.orpo_lambda)
            nll = -chosen  # token mean over each chosen response
            losses, scale = nll + odds, s.orpo_lambda
            metrics["nll"] = nll.detach().sum()
            metrics["odds_ratio_loss"] = odds.detach().sum()
        else:
            losses, scale = simpo_loss(chosen, rejected, beta=s.beta, gamma=s.simpo_gamma), s.beta
            if s.rpo_alpha:  # CPO-SimPO: + alpha x the NLL of the chosen response (token mean)
                losses = losses + s.rpo_alpha * -chosen
                metrics["nll"] = (-chosen).detach().sum()
        chosen_r, rejected_r = scale * chosen.detach(), scale * rejected.detach()
        metrics.update(
            {
                "rewards/chosen": chosen_r.sum(),
                "rewards/rejected": rejected_r.sum(),
                "rewards/accuracies": (chosen_r > rejected_r).float().sum(),
                "rewards/margins": (chosen_r - rejected_r).sum(),
                "logps/chosen": policy_sum[index[:, 0]].detach().sum(),
                "logps/rejected": policy_sum[index[:, 1]].detach().sum(),
            }
        )
        return losses.sum(), metrics
