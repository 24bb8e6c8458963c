"""Scalar heads: the reward model's (and PPO's value) head on the last hidden state, loading a
trained reward model and scoring sequences with it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from rlhf_cli.config import load_saved_config
from rlhf_cli.core.errors import UserError
from rlhf_cli.data.batches import collate_preference
from rlhf_cli.model.forward import (
    decoder,
    model_inputs,
    packed_states,
    shared_prompt_hidden,
    shares_prompt,
)
from rlhf_cli.model.load import autocast, load_base_model, load_tokenizer, set_eval


class ScalarHead(torch.nn.Module):
    """A linear map from the hidden state of each sequence's last real token to one number (a
    reward or a value); kept in fp32 outside the adapter and saved beside it."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        # Zero at the start: a value head's random guesses would drown the first advantages.
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (...): one score per position."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)

    def last_token(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) right-padded -> (B,): the score at each row's last non-pad token (packed
        rows: PackedRows' `last` instead)."""
        last = attention_mask.sum(dim=1) - 1
        return self(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])


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

    out = []
    for i in range(0, len(examples), batch_size):
        batch = collate_preference(
            examples[i : i + batch_size], tokenizer.pad_token_id, tokenizer.eos_token_id
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad(), autocast(amp, device):
            out.append(sequence_scores(model, head, batch).float())
    return torch.cat(out)


def load_reward_model(path: str | Path, device: torch.device, cfg=None):
    """(model, head, tokenizer, config) of a reward model saved by `stage=rm` (a run directory,
    its final/ or a checkpoint), quantized as it was trained unless `cfg` says otherwise."""
    from peft import PeftModel

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
