"""Stage sft: next-token negative log-likelihood on the response tokens.

The loss is the mean over every response token of the optimizer step (not a mean of
per-example means), so accumulation and data parallelism give the big-batch loss.
"""

from __future__ import annotations

import torch

from rlhf_cli.data.batches import SFTBatch, collate_sft
from rlhf_cli.losses import IGNORE_INDEX
from rlhf_cli.model.forward import labelled_logps
from rlhf_cli.trainer.loop import Stage


class SFTStage(Stage):
    name = "sft"
    data_kind = "sft"

    def collate(self, examples) -> SFTBatch:
        return collate_sft(
            examples,
            self.tokenizer.pad_token_id,
            self.cfg.train.pad_to_multiple_of,
            self.pack,
            self.slices,
        )

    def weight(self, batch: SFTBatch) -> int:
        # Position 0 is never predicted (nothing precedes it).
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, batch: SFTBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # = losses.nll_sum on the full logits, with the LM head run on response positions only.
        logps, _ = labelled_logps(self.model, batch)
        return -logps.sum(), {}
