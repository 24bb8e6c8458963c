"""Stage rm: a reward model = the LM (with LoRA) + a scalar head on the last token's hidden state.

Pairs use the Bradley-Terry loss -log sigma(r_w - r_l) (with the data's margin, Llama 2, and
optional centering); ranked lists of K responses use Plackett-Luce, which equals Bradley-Terry
at K = 2. Every sequence ends with EOS, whose hidden state is scored. All responses of a batch go
through one forward. The head is saved as reward_head.safetensors beside the adapter; `rlhf
score` and the online stages load both with `load_reward_model`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from rlhf_cli.data import PreferenceBatch, collate_preference
from rlhf_cli.errors import UserError
from rlhf_cli.loop import Stage
from rlhf_cli.losses import plackett_luce_loss, reward_loss
from rlhf_cli.models import (
    ScalarHead,
    decoder,
    model_inputs,
    packed_states,
    set_eval,
    shared_prompt_hidden,
    shares_prompt,
)

HEAD = "reward_head"


def sequence_scores(model, head: ScalarHead, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) the reward of every row of a batch (right-padded, shared-prompt or packed)."""
    if shares_prompt(model, batch):
        _, hidden = shared_prompt_hidden(model, batch)
        return head.last_token(hidden, batch["response_mask"])
    if "sequence" in batch:  # packed rows: each sequence's last token, wherever it lies
        return head(packed_states(model, batch).flatten(0, 1)[batch["last"]])
    hidden = decoder(model)(**model_inputs(batch)).last_hidden_state
    return head.last_token(hidden, batch["attention_mask"])


def scoring_examples(
    prompts: list[list[int]], responses: list[list[int]], tokenizer, reward_tokenizer=None
) -> list[dict]:
    """(prompt, response) token ids of the policy's tokenizer -> examples for a reward model
    (collate_preference with its EOS cuts each response at EOS, as in training). A reward model
    with another vocabulary gets the same text re-encoded by its own tokenizer, special tokens
    dropped (the policy's chat markup means nothing to another tokenizer)."""
    if reward_tokenizer is None or reward_tokenizer.get_vocab() == tokenizer.get_vocab():
        return [
            {"prompt_ids": p, "responses_ids": [r], "margin": None}
            for p, r in zip(prompts, responses)
        ]
    examples = []
    for p, r in zip(prompts, responses):
        text = tokenizer.decode(p + r, skip_special_tokens=True)
        ids = reward_tokenizer(text)["input_ids"]
        examples.append({"prompt_ids": [], "responses_ids": [ids], "margin": None})
    return examples


def score_examples(
    model, head: ScalarHead, examples: list[dict], tokenizer, batch_size: int, device, amp
) -> torch.Tensor:
    """(N,) fp32 scores of examples (one response each) by a reward model whose tokenizer is
    `tokenizer`; the same position as training scores (the response's EOS)."""
    from rlhf_cli.models import autocast

    out = []
    for i in range(0, len(examples), batch_size):
        batch = collate_preference(
            examples[i : i + batch_size], tokenizer.pad_token_id, tokenizer.eos_token_id
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad(), autocast(amp, device):
            out.append(sequence_scores(model, head, batch).float())
    return torch.cat(out)


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


def load_reward_model(path: str | Path, device: torch.device, cfg=None):
    """(model, head, tokenizer, config) of a reward model saved by `stage=rm` (a run directory,
    its final/ or a checkpoint), quantized as it was trained unless `cfg` says otherwise."""
    from peft import PeftModel

    from rlhf_cli.config import load_saved_config
    from rlhf_cli.models import load_base_model, load_tokenizer

    path = Path(path)
    found = next((p for p in (path, path / "final") if (p / f"{HEAD}.safetensors").is_file()), None)
    if found is None:
        raise UserError(
            f"{path}: not a reward model (no {HEAD}.safetensors); train one with "
            "`rlhf train stage=rm` and pass its run directory"
        )
    if cfg is None:
        cfg = load_saved_config(found / "config.yaml")
    base_cfg = replace(cfg, model=replace(cfg.model, adapter=None))
    tokenizer = load_tokenizer(base_cfg.model)
    model = load_base_model(base_cfg, device)
    if (found / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(model, str(found), is_trainable=False)
    head = ScalarHead(model.config.hidden_size)
    from safetensors.torch import load_model

    load_model(head, str(found / f"{HEAD}.safetensors"))
    model.requires_grad_(False)
    return set_eval(model), head.to(device).eval(), tokenizer, cfg
