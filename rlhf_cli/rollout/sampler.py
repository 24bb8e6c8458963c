"""Sampling and scoring: the online stages' and rs' rollouts, scored by the reward terms, the
reward model or an environment."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch

from rlhf_cli.config import load_saved_config
from rlhf_cli.core import distributed as dist
from rlhf_cli.core.errors import UserError
from rlhf_cli.core.progress import console
from rlhf_cli.model.heads import (
    HEAD,
    ScalarHead,
    load_reward_model,
    score_examples,
    scoring_examples,
)
from rlhf_cli.model.load import (
    adapter_switched,
    add_frozen_adapter,
)
from rlhf_cli.multiturn import sample_episodes
from rlhf_cli.rewards import ENV_TERM, call_reward_fn, reward_terms, row_inputs
from rlhf_cli.rollout.batch import Rollout, make_rollout
from rlhf_cli.rollout.engine import make_engine

REWARD_ADAPTER = "reward"


class Sampler:
    """Sampling responses with the rollout engine and scoring them with `reward.model` or
    `reward.fn`: what the online stages and rejection sampling (rs) share. Needs `cfg`,
    `model`, `tokenizer`, `device`, `amp_dtype` (a Stage's) and `self.generation`; for
    conversations of several turns, `make_env` (an environment per response) and `renderer`."""

    make_env: Any = None
    renderer: Any = None
    engine: Any = None  # rollout.engine.HFEngine or rollout.vllm.VLLMEngine
    gen_seconds = 0.0  # the last rollout's generation time
    sync_seconds = 0.0  # ... and the engine's weight reload before it

    name: str
    cfg: Any
    model: Any
    tokenizer: Any
    device: torch.device
    amp_dtype: Any
    generation: Any

    # -- rewards -----------------------------------------------------------------------------

    def _setup_reward(self) -> None:

        r = self.cfg.reward
        self.reward_terms = reward_terms(r)
        if len(self.reward_terms) > 1:
            console.print(
                f"{self.name}: reward = "
                + " + ".join(f"{t.weight:g} x {t.name}" for t in self.reward_terms)
            )
        self.reward_model = self.reward_head = self.reward_tokenizer = None
        self.reward_adapter: str | None = None
        if r.model is None:
            return

        found = next(
            (p for p in resolve_dirs(r.model) if (p / f"{HEAD}.safetensors").is_file()), None
        )
        if found is None:
            raise UserError(f"reward.model={r.model}: not a reward model (no {HEAD}.safetensors)")
        rm_cfg = load_saved_config(found / "config.yaml")
        same_base = (
            hasattr(self.model, "peft_config")
            and rm_cfg.model.name_or_path == self.cfg.model.name_or_path
            and rm_cfg.quant.mode == self.cfg.quant.mode
            and (found / "adapter_config.json").is_file()
        )
        if same_base:
            self.reward_adapter = add_frozen_adapter(self.model, found, REWARD_ADAPTER)
            from safetensors.torch import load_model

            self.reward_head = ScalarHead(self.model.config.hidden_size)
            load_model(self.reward_head, str(found / f"{HEAD}.safetensors"))
            self.reward_head.to(self.device).requires_grad_(False)
            console.print(
                f"{self.name}: reward model {found} as a second adapter on the shared base"
            )
        else:
            self.reward_model, self.reward_head, self.reward_tokenizer, _ = load_reward_model(
                found, self.device
            )
            console.print(f"{self.name}: reward model {found} loaded separately (another base)")

    @torch.no_grad()
    def score_terms(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Each reward term's (B,) scores, unweighted, by name (the environment's as `env`)."""
        texts = None
        out = {} if rollout.env_rewards is None else {ENV_TERM: rollout.env_rewards}
        for term in self.reward_terms:
            if term.fn is None:
                out[term.name] = self._model_scores(rollout).float()
                continue
            if texts is None:
                texts = rollout.final_texts or [
                    self.tokenizer.decode(r, skip_special_tokens=True) for r in rollout.responses
                ]
                # (multi-turn: the final reply's tokens, as `responses` holds its text)
                inputs = row_inputs(
                    rollout.columns,
                    rollout.final_ids or rollout.responses,
                    self.generation.max_new_tokens,
                )
                if rollout.turns is not None:
                    inputs["turns"] = rollout.turns
            values = call_reward_fn(term, rollout.prompt_texts, texts, inputs)
            out[term.name] = torch.tensor(values, device=self.device)
        return out

    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) the weighted sum of the terms (an environment's term counts once)."""
        total = sum(t.weight * terms[t.name] for t in self.reward_terms)
        return total + terms[ENV_TERM] if ENV_TERM in terms else total

    def scores(self, rollout: Rollout) -> torch.Tensor:
        """(B,) one score per response: the weighted sum of the reward terms."""
        return self.combine(self.score_terms(rollout))

    def _model_scores(self, rollout: Rollout) -> torch.Tensor:

        rtok = self.reward_tokenizer or self.tokenizer
        examples = scoring_examples(rollout.prompts, rollout.responses, self.tokenizer, rtok)
        shared = self.reward_adapter is not None  # a second adapter on the policy's base
        with adapter_switched(self.model, self.reward_adapter) if shared else nullcontext():
            return score_examples(
                self.model if shared else self.reward_model,
                self.reward_head,
                examples,
                rtok,
                self.cfg.reward.batch_size,
                self.device,
                self.amp_dtype,
            )

    # -- rollouts ----------------------------------------------------------------------------

    def setup_engine(self) -> None:

        self.engine = make_engine(self.cfg, self.model, self.tokenizer, self.device, self.amp_dtype)

    def policy_changed(self) -> None:
        """After an optimizer update (or a restore): the engine's copy of the policy is stale."""
        if self.engine is not None:
            self.engine.policy_changed()

    def _generate(self, prompts: list[list[int]], generation):
        """One reply (rollout.batch.Reply) to each token-id prompt, timed."""
        t0 = time.perf_counter()
        try:
            return self.engine.generate(prompts, generation)
        finally:
            self.gen_seconds += time.perf_counter() - t0

    @torch.no_grad()
    def rollout(self, examples: list[dict], k: int | None = None, generation=None) -> Rollout:
        """`k` responses per prompt (stage.group_size by default) with `generation` (the
        stage's sampling settings by default); conversations of several turns with an
        environment or tools when the stage names one (rlhf_cli.multiturn)."""
        k = self.cfg.stage.group_size if k is None else k
        rows = [ex for ex in examples for _ in range(k)]  # group-contiguous
        generation = generation or self.generation
        self.sync_seconds = self.engine.sync()  # (vllm) the policy's weights, if they changed
        self.gen_seconds = 0.0
        if self.make_env is None:
            replies = self._generate([ex["prompt_ids"] for ex in rows], generation)
            responses = [r.ids for r in replies]
            return make_rollout(
                rows,
                responses,
                [[True] * len(ids) for ids in responses],
                [r.ended for r in replies],
                self.tokenizer.pad_token_id,
                self.device,
                logps=[r.logps for r in replies] if replies[0].logps is not None else None,
            )
        episodes = sample_episodes(
            lambda contexts: self._generate(contexts, generation),
            rows,
            self.make_env,
            self.renderer,
            self.tokenizer,
            self.cfg.stage.max_turns,
            max_new_tokens=int(generation.max_new_tokens),
            max_context=self.engine.max_context,
            max_prompt_length=self.cfg.data.max_prompt_length,
        )
        # An environment that wrote the first message: that is the episode's prompt.
        rows = [
            ex
            if e.prompt_ids is None
            else {**ex, "prompt_ids": e.prompt_ids, "prompt_text": e.prompt_text}
            for ex, e in zip(rows, episodes)
        ]
        logps = [e.logps for e in episodes]
        return make_rollout(
            rows,
            [e.ids for e in episodes],
            [e.policy for e in episodes],
            [e.ended for e in episodes],
            self.tokenizer.pad_token_id,
            self.device,
            logps=None if any(lp is None for lp in logps) else logps,
            turns=[e.messages for e in episodes],
            final_texts=[e.messages[-1]["content"] if e.messages else "" for e in episodes],
            final_ids=[e.last_reply for e in episodes],
            env_rewards=torch.tensor([e.reward for e in episodes], device=self.device),
            context_full=torch.tensor([e.context_full for e in episodes], device=self.device),
        )


def pooled_means(columns: dict[str, list[float]]) -> dict[str, float]:
    """The mean of each column over the values of every rank (each rank holds a share of an
    evaluation's samples; every rank gets the means)."""
    parts = dist.gather_objects(columns)
    pooled = {k: [float(v) for part in parts for v in part[k]] for k in columns}
    return {k: sum(v) / max(len(v), 1) for k, v in pooled.items()}


def zero_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B / group_size,) bool: the groups (group_size consecutive responses of one prompt)
    whose rewards are all equal."""
    groups = rewards.reshape(-1, group_size)
    return groups.amax(-1) == groups.amin(-1)


def resolve_dirs(path: str):
    from pathlib import Path

    return [Path(path), Path(path) / "final"]
