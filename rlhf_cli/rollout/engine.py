"""The engine interface and the hf engine (transformers' generate on the training model);
`make_engine` picks by rollout.engine. The generation config both engines follow."""

from __future__ import annotations

import torch

from rlhf_cli.core import distributed as dist
from rlhf_cli.core.errors import UserError
from rlhf_cli.model.forward import is_fsdp
from rlhf_cli.model.load import autocast, model_path
from rlhf_cli.rollout.batch import Reply
from rlhf_cli.rollout.vllm import VLLMEngine


def generation_config(
    tokenizer,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
):
    """A complete GenerationConfig: greedy at temperature 0, else sampling from the policy's own
    distribution (truncated only by top_p < 1, top_k > 0 or min_p > 0). Every field that reshapes the
    distribution is set to its neutral value, so nothing is taken from the model's
    generation_config.json (repetition_penalty, min_p, top_k, no_repeat_ngram_size, ...): the
    samples come from the distribution whose log-probs are trained and evaluated."""
    from transformers import GenerationConfig

    sampling = temperature > 0
    return GenerationConfig(
        do_sample=sampling,
        # Greedy: the sampling knobs unset (generate_ids blanks the model's own defaults), or
        # transformers warns on every call that they are ignored.
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=top_k if sampling else None,
        min_p=min_p if sampling else None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        length_penalty=1.0,
        num_beams=1,
        num_return_sequences=1,
        min_length=0,  # (min_new_tokens unset: both set is a warning on every call)
        max_new_tokens=max_new_tokens,
        bad_words_ids=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        renormalize_logits=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


def generate_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, config):
    """model.generate with `config` alone: transformers fills every unset field of a passed
    config from the model's own generation_config (generation_config.json), so the model's is
    swapped for a blank one while generating."""
    from transformers import GenerationConfig

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = lm.generation_config
    lm.generation_config = GenerationConfig()
    try:
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            # FSDP gathers each layer's weights in every forward: every rank takes a step
            # per token until all ranks' rows are done (a finished rank runs on idle).
            synced_gpus=is_fsdp(model) and dist.world_size() > 1,
        )
    finally:
        lm.generation_config = saved


class HFEngine:
    """transformers' generate on the policy itself."""

    name = "hf"
    sync_seconds = 0.0  # nothing to sync

    def __init__(self, model, tokenizer, device: torch.device, amp_dtype):
        self.model, self.tokenizer, self.device, self.amp_dtype = (
            model,
            tokenizer,
            device,
            amp_dtype,
        )
        # The longest prompt + response the model's positions hold (None: no stated limit).
        self.max_context = getattr(model.config, "max_position_embeddings", None)

    def policy_changed(self) -> None:
        pass

    def sync(self) -> float:
        return 0.0

    def release(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], generation) -> list[Reply]:
        """One reply to each token-id prompt, all in one left-padded batch (every row's last
        prompt token at the same position)."""

        width = max(len(p) for p in prompts)
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        attn = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device
        )
        cache = self.model.config.use_cache
        self.model.config.use_cache = True
        try:
            with autocast(self.amp_dtype, self.device):
                out = generate_ids(self.model, ids, attn, generation)
        finally:
            self.model.config.use_cache = cache
        response = out[:, width:]
        is_eos = response == eos
        keep = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # up to the first EOS
        return [
            Reply(row[m].tolist(), bool(e)) for row, m, e in zip(response, keep, is_eos.any(-1))
        ]


def make_engine(cfg, model, tokenizer, device: torch.device, amp_dtype):
    """The engine rollout.engine names, for this model."""
    if cfg.rollout.engine == "hf":
        return HFEngine(model, tokenizer, device, amp_dtype)

    if is_fsdp(model):  # (config refuses it; a guard for programmatic use)
        raise UserError("rollout.engine=vllm with dist.strategy=fsdp: use dist.strategy=ddp")
    return VLLMEngine(cfg.rollout, model, tokenizer, model_path(cfg.model), device)
