"""Stage rm: a reward model = the LM (with LoRA) + a scalar head on the last token's hidden state.

Pairs use the Bradley-Terry loss -log sigma(r_w - r_l) (with the data's margin, Llama 2, and
optional centering); ranked lists of K responses use Plackett-Luce, which equals Bradley-Terry
at K = 2. Every sequence ends with EOS, whose hidden state is scored. All responses of a batch go
through one forward. The head is saved as reward_head.safetensors beside the adapter; `rlhf
score` and the online stages load both with `load_reward_model`.
"""

from __future__ import annotations

import torch

from rlhf_cli.data.batches import PreferenceBatch, collate_preference
from rlhf_cli.losses import plackett_luce_loss, reward_loss
from rlhf_cli.model.heads import HEAD, ScalarHead, sequence_scores
from rlhf_cli.trainer.loop import Stage


class RMStage(Stage):
    name = "rm"
    data_kind = "preference"

    def __init__(self, cfg, model, tokenizer, device, amp_dtype):
        super().__init__(cfg, model, tokenizer, device, amp_dtype)
        self.head = ScalarHead(model.config.hidden_size).to(device)

    def extra_modules(self) -> dict[str, torch.nn.Module]:
        return {HEAD: self.head}

    def collate(self, examples) -> PreferenceBatch:
        return collate_preference(
            examples,
            self.tokenizer.pad_token_id,
            self.tokenizer.eos_token_id,
            shared_prompt=self.cfg.train.shared_prompt,
            multiple=self.cfg.train.pad_to_multiple_of,
            pack=self.pack,
            slices=self.slices,
        )

    def weight(self, batch: PreferenceBatch) -> int:
        return batch["index"].shape[0]

    def loss(self, batch: PreferenceBatch):
        s = self.cfg.stage
        index = batch["index"]
        present = index >= 0
        scores = sequence_scores(self.model, self.head, batch).float()
        by_rank = torch.where(
            present, scores[index.clamp(min=0)], torch.zeros((), device=scores.device)
        )
        rows = torch.arange(index.shape[0], device=index.device)
        last = present.sum(1) - 1
        chosen, rejected = by_rank[:, 0], by_rank[rows, last]
        if index.shape[1] == 2 and bool(present.all()):
            margin = batch["margin"].to(scores.device)
            use_margin = s.use_margin and bool(torch.isfinite(margin).any())
            losses = reward_loss(
                chosen,
                rejected,
                margin=torch.nan_to_num(margin, nan=0.0) if use_margin else None,
                center_coef=s.center_coef,
            )
        else:
            losses = plackett_luce_loss(by_rank, present)
            if s.center_coef:
                losses = losses + s.center_coef * (by_rank * present).sum(1).pow(2)
        chosen, rejected = chosen.detach(), rejected.detach()
        metrics = {
            "accuracy": (chosen > rejected).float().sum(),
            "margin": (chosen - rejected).sum(),
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
        }
        return losses.sum(), metrics
