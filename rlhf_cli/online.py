"""What the online stages (ppo, grpo, rloo) share: sampling rollouts with the KV cache, scoring
them, reference log-probs, and the clipped-update loop over minibatches.

One step = take `rollout_batch_size` prompts, sample `group_size` responses each, score them,
compute advantages (the stage's own rule), then `epochs` passes of minibatch updates.

Memory: with LoRA every role shares ONE base model: the policy is the trained adapter, the
reference is the same base with the adapter disabled (or a frozen copy of the starting
adapter), the value head (ppo) sits on the policy's last hidden states, and a reward model
trained from the same base is loaded as a second, frozen adapter with its own head.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_cli import distributed as dist
from rlhf_cli.errors import UserError
from rlhf_cli.loop import Stage, Updater
from rlhf_cli.losses import (
    adaptive_kl_coef,
    aggregate_loss,
    aggregate_weight,
    kl_penalty,
    masked_mean,
    policy_token_losses,
)
from rlhf_cli.models import (
    ScalarHead,
    adapter_switched,
    add_frozen_adapter,
    autocast,
    decoder,
    disable_dropout,
    eval_mode,
    generate_ids,
    generation_config,
    lm_logits,
    own_logits,
    set_eval,
    setup_reference,
)
from rlhf_cli.progress import console
from rlhf_cli.rewards import load_reward_fn

REWARD_ADAPTER = "reward"


@dataclass
class Rollout:
    """A batch of sampled responses; (B, R) tensors are aligned to the response tokens."""

    input_ids: torch.Tensor  # (B, P + R) left-padded prompt, then the response
    attention_mask: torch.Tensor  # (B, P + R): 0 on prompt padding and after the first EOS
    prompt_len: int  # P
    mask: torch.Tensor  # (B, R) bool: response tokens up to and including the first EOS
    ended: torch.Tensor  # (B,) bool: the response emitted EOS
    prompts: list[list[int]]
    prompt_texts: list[str]
    responses: list[list[int]]  # the response tokens (up to and including EOS)

    def select(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx]}


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as generate() used them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


class RunningMoments:
    """Running mean/std of scores (Chan et al. parallel update), for reward normalisation."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        """Add a batch: the scores of every rank, so the moments agree on all ranks."""
        x = x.double()
        sums = torch.stack(
            [torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device), x.sum(), (x**2).sum()]
        )
        count, total, squares = dist.all_reduce_sum(sums).tolist()
        n, mean = int(count), total / count
        m2 = max(squares - count * mean**2, 0.0)
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / max(self.count - 1, 1)) ** 0.5

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


class Sampler:
    """Sampling responses with the KV cache and scoring them with `reward.model` or
    `reward.fn`: what the online stages and rejection sampling (rs) share. Needs `cfg`,
    `model`, `tokenizer`, `device`, `amp_dtype` (a Stage's) and `self.generation`."""

    name: str
    cfg: Any
    model: Any
    tokenizer: Any
    device: torch.device
    amp_dtype: Any
    generation: Any

    # -- rewards -----------------------------------------------------------------------------

    def _setup_reward(self) -> None:
        from rlhf_cli.stages.rm import HEAD, load_reward_model

        r = self.cfg.reward
        self.reward_fn = load_reward_fn(r.fn) if r.fn else None
        self.reward_model = self.reward_head = self.reward_tokenizer = None
        self.reward_adapter: str | None = None
        if r.model is None:
            return
        from rlhf_cli.config import load_saved_config

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
    def scores(self, rollout: Rollout) -> torch.Tensor:
        """(B,) one score per response."""
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in rollout.responses]
        if self.reward_fn is not None:
            values = self.reward_fn(rollout.prompt_texts, texts, **dict(self.cfg.reward.kwargs))
            if len(values) != len(texts):
                raise UserError(
                    f"reward.fn={self.cfg.reward.fn} returned {len(values)} scores for "
                    f"{len(texts)} responses"
                )
            return torch.tensor([float(v) for v in values], device=self.device)
        return self._model_scores(rollout)

    def _model_scores(self, rollout: Rollout) -> torch.Tensor:
        from rlhf_cli.stages.rm import score_examples, scoring_examples

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

    @torch.no_grad()
    def rollout(self, examples: list[dict], k: int | None = None, generation=None) -> Rollout:
        """`k` responses per prompt (stage.group_size by default) with `generation` (the
        stage's sampling settings by default)."""
        k = self.cfg.stage.group_size if k is None else k
        prompts = [ex["prompt_ids"] for ex in examples for _ in range(k)]  # group-contiguous
        texts = [ex["prompt_text"] for ex in examples for _ in range(k)]
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        attn = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device
        )
        self.model.config.use_cache = True
        t0 = time.perf_counter()
        with autocast(self.amp_dtype, self.device):
            out = generate_ids(self.model, ids, attn, generation or self.generation)
        self.gen_seconds = time.perf_counter() - t0
        self.model.config.use_cache = False
        response = out[:, width:]
        is_eos = response == self.tokenizer.eos_token_id
        # Keep tokens up to and including the first EOS.
        mask = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
        response = torch.where(mask, response, torch.full_like(response, pad))
        responses = [row[m].tolist() for row, m in zip(response, mask)]
        return Rollout(
            input_ids=torch.cat([ids, response], dim=1),
            attention_mask=torch.cat([attn, mask.long()], dim=1),
            prompt_len=width,
            mask=mask,
            ended=is_eos.any(-1),
            prompts=prompts,
            prompt_texts=texts,
            responses=responses,
        )


class OnlineStage(Sampler, Stage):
    """Rollout -> score -> advantages -> clipped updates. Subclasses define `advantages` and
    may add loss terms (`extra_loss`)."""

    data_kind = "prompt"
    uses_value_head = False

    def __init__(self, cfg, model, tokenizer, device, amp_dtype):
        super().__init__(cfg, model, tokenizer, device, amp_dtype)
        s = cfg.stage
        world = dist.world_size()
        # A minibatch larger than the rollout batch is the whole batch; each rank takes 1/N.
        self.minibatch_size = min(s.minibatch_size, s.rollout_batch_size * s.group_size)
        if s.rollout_batch_size % world or self.minibatch_size % world:
            raise UserError(
                f"stage.rollout_batch_size={s.rollout_batch_size} and stage.minibatch_size="
                f"{self.minibatch_size} are global: both must divide by the {world} ranks"
            )
        self.local_minibatch = self.minibatch_size // world
        self.kl_coef = float(s.kl_coef)
        self.moments = RunningMoments()
        self.value_head = (
            ScalarHead(model.config.hidden_size).to(device) if self.uses_value_head else None
        )
        self.ref_model, self.ref_adapter, ref_source = setup_reference(cfg, model, device)
        console.print(f"{self.name}: reference = {ref_source}")
        self._setup_reward()
        # Rollouts, scoring and updates see the same function (no dropout anywhere), so the
        # first update's ratio is exactly 1; updates run in train mode all the same, so that
        # gradient checkpointing (active in train mode only) takes effect.
        disable_dropout(model)
        self.generation = generation_config(tokenizer, s.max_new_tokens, s.temperature, s.top_p)

    def forward(
        self, model, batch: dict[str, torch.Tensor], prompt_len: int, with_values: bool = False
    ):
        """(response log-probs (B, R), values (B, R) or None, logits (B, R, V)) at the sampling
        temperature. Only the response positions go through the LM head (and the family's logit
        transform, models.lm_logits); a family whose transform is unknown runs its own forward."""
        inputs = dict(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=position_ids(batch["attention_mask"]),
        )
        # Position P-1+j predicts response token j (and holds the value of the state before it).
        window = slice(prompt_len - 1, -1)
        if own_logits(model):
            out = model(**inputs, output_hidden_states=True)
            states, logits = out.hidden_states[-1][:, window], out.logits[:, window]
        else:
            states = decoder(model)(**inputs).last_hidden_state[:, window]
            logits = lm_logits(model, states)
        logits = logits.float() / self.cfg.stage.temperature
        response = batch["input_ids"][:, prompt_len:]
        # log softmax at the sampled token only: gather minus logsumexp (no (B, R, V) copy).
        picked = logits.gather(-1, response.unsqueeze(-1)).squeeze(-1)
        logps = (picked - torch.logsumexp(logits, -1)) * batch["attention_mask"][:, prompt_len:]
        values = self.value_head(states) if with_values and self.value_head is not None else None
        return logps, values, logits

    @torch.no_grad()
    def reference_logps(self, rollout: Rollout) -> torch.Tensor:
        batch = rollout.select(slice(None))
        if self.ref_model is not None:
            return self.forward(self.ref_model, batch, rollout.prompt_len)[0]
        with adapter_switched(self.model, self.ref_adapter):
            return self.forward(self.model, batch, rollout.prompt_len)[0]

    # -- the step ----------------------------------------------------------------------------

    def examples_per_step(self) -> int:
        return self.cfg.stage.rollout_batch_size

    def updates_per_step(self) -> int:
        s = self.cfg.stage
        n = s.rollout_batch_size * s.group_size
        return s.epochs * -(-n // self.minibatch_size)

    def extra_modules(self) -> dict[str, torch.nn.Module]:
        return {"value_head": self.value_head} if self.value_head is not None else {}

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl_coef, "moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.kl_coef = state["kl_coef"]
            self.moments.load_state_dict(state["moments"])

    def advantages(self, rollout: Rollout, rewards: torch.Tensor, old: dict) -> dict:
        """Stage-specific: fill `old` with "advantages" (B,) or (B, R) (and "returns")."""
        raise NotImplementedError

    def extra_loss(self, logps, values, mb: dict, mask) -> tuple[torch.Tensor | None, dict]:
        """Stage-specific loss terms beside the clipped policy loss: per-token terms (B, R)
        added to the policy's token losses and aggregated with them (GRPO's KL), or a scalar
        (a token mean over the micro-batch: PPO's value loss), and their metrics."""
        return None, {}

    def train_step(self, examples: list, updater: Updater) -> tuple[dict[str, float], int]:
        s = self.cfg.stage
        t0 = time.perf_counter()
        set_eval(self.model)  # generation with the KV cache, never checkpointed
        rollout = self.rollout(dist.shard(examples))  # this rank's share of the prompts
        mask = rollout.mask
        with torch.no_grad(), autocast(self.amp_dtype, self.device):
            old_logps, old_values, _ = self.forward(
                self.model, rollout.select(slice(None)), rollout.prompt_len, with_values=True
            )
            ref_logps = self.reference_logps(rollout)
        score = self.scores(rollout)
        reward = score - s.missing_eos_penalty * (~rollout.ended).float()
        if s.normalize_rewards:
            self.moments.update(reward)
            reward = (reward - self.moments.mean) / (self.moments.std + 1e-8)
        kl_tokens = kl_penalty(old_logps, ref_logps, "k1") * mask
        old = {
            "logps": old_logps,
            "values": old_values,
            "ref_logps": ref_logps,
            "kl_tokens": kl_tokens,
        }
        self.advantages(rollout, reward, old)
        seq_kl = kl_tokens.sum(-1)

        self.model.train()  # dropout is off (__init__); gradient checkpointing applies
        # The tokens the policy loss sees: all response tokens, or (mask_truncated) those of
        # responses that ended with EOS.
        loss_mask = mask & rollout.ended.unsqueeze(-1) if s.mask_truncated else mask
        stats: dict[str, float] = {}
        # Token-weighted update metrics: each rank adds its share of the global minibatch's
        # tokens, so they are summed over ranks (not averaged) below.
        weighted: dict[str, float] = {}
        n = rollout.input_ids.shape[0]
        first = True
        losses, norms = [], []
        for _ in range(s.epochs):
            order = torch.randperm(n)
            for start in range(0, n, self.local_minibatch):
                mb_idx = order[start : start + self.local_minibatch]
                # The minibatch's divisors over every rank: the policy loss's weight (tokens,
                # responses, or responses x max_new_tokens: stage.loss_agg) and its tokens.
                local = [
                    aggregate_weight(loss_mask[mb_idx], s.loss_agg, s.max_new_tokens),
                    mask[mb_idx].sum(),
                ]
                mb_weight, mb_tokens = dist.all_reduce_sum(torch.stack(local).float()).clamp(min=1)
                total = torch.zeros((), device=self.device)
                for m0 in range(0, len(mb_idx), self.cfg.train.micro_batch_size):
                    idx = mb_idx[m0 : m0 + self.cfg.train.micro_batch_size].to(self.device)
                    m, lm = mask[idx], loss_mask[idx]
                    with autocast(self.amp_dtype, self.device):
                        logps, values, logits = self.forward(
                            self.model, rollout.select(idx), rollout.prompt_len, with_values=True
                        )
                    adv = old["advantages"][idx]
                    token_losses, pstats = policy_token_losses(
                        logps,
                        old_logps[idx],
                        adv,
                        lm,
                        s.clip_eps,
                        s.clip_eps_high,
                        s.importance_level,
                    )
                    mb = {k: v[idx] for k, v in old.items() if torch.is_tensor(v)}
                    extra, estats = self.extra_loss(logps, values, mb, m)
                    share = m.sum() / mb_tokens
                    if extra is not None and extra.dim() == 2:  # per token: aggregated alike
                        token_losses, extra = token_losses + extra, None
                    policy_total, _ = aggregate_loss(token_losses, lm, s.loss_agg, s.max_new_tokens)
                    loss = policy_total / mb_weight
                    if extra is not None:  # a token mean: weighted by the micro-batch's tokens
                        loss = loss + extra * share
                    loss.backward()
                    total += loss.detach()
                    if first:  # KL 0 / ratio 1 before any update: a check that is cheap here
                        with torch.no_grad():
                            ratio = masked_mean(torch.exp(logps - old_logps[idx]), m)
                            probs = torch.softmax(logits, -1)
                            entropy = masked_mean(
                                -(probs * torch.log_softmax(logits, -1)).sum(-1), m
                            )
                        stats["policy/ratio_first"] = float(ratio)
                        stats["policy/approx_kl_first"] = float(pstats["approx_kl"])
                        stats["entropy"] = float(entropy)
                        first = False
                    for key, value in {**pstats, **estats}.items():
                        name = key if "/" in key else f"policy/{key}"
                        weighted[name] = (
                            weighted.get(name, 0.0)
                            + float(value) * float(share) / self.updates_per_step()
                        )
                loss_value, norm = updater.apply(dist.all_reduce_sum(total))
                losses.append(loss_value)
                norms.append(norm)
        if getattr(s, "adaptive_kl", False):
            world = dist.world_size()
            mean_kl = float(dist.all_reduce_sum(seq_kl.mean().double())) / world
            self.kl_coef = adaptive_kl_coef(
                self.kl_coef, mean_kl, s.kl_target, s.kl_horizon, n * world
            )
        lengths = mask.sum(-1).float()
        record = {
            "loss": sum(losses) / len(losses),
            "grad_norm": sum(norms) / len(norms),
            "score": float(score.mean()),
            "score_std": float(score.std()) if n > 1 else 0.0,
            "reward": float(reward.mean()),
            "kl": float(seq_kl.mean()),
            "kl_coef": self.kl_coef,
            "response_length": float(lengths.mean()),
            "eos_fraction": float(rollout.ended.float().mean()),
            # Groups whose responses all scored the same: zero advantage, nothing learned.
            "zero_std_groups": float(zero_std_fraction(score, s.group_size)),
            "gen_tokens_per_s": float(lengths.sum()) / max(self.gen_seconds, 1e-9),
            "rollout_s": self.gen_seconds,
            "step_s": time.perf_counter() - t0,
            **stats,
        }
        record = over_ranks(record, weighted)
        return record, int(dist.all_reduce_sum(rollout.attention_mask.sum()))

    @torch.no_grad()
    def evaluate(self, examples: list) -> dict[str, float]:
        """Sample on the eval prompts: mean score, KL to the reference, length. Sampling uses
        its own seeded RNG, so evaluations compare across steps and leave training unchanged."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), eval_mode(self.model):
            torch.manual_seed(self.cfg.train.seed)
            return self._evaluate(examples)

    def _evaluate(self, examples: list) -> dict[str, float]:
        scores, kls, lengths = [], [], []
        size = self.cfg.stage.rollout_batch_size
        examples = examples[dist.rank() :: dist.world_size()]
        for i in range(0, len(examples), size):
            rollout = self.rollout(examples[i : i + size])
            with autocast(self.amp_dtype, self.device):
                logps = self.forward(self.model, rollout.select(slice(None)), rollout.prompt_len)[0]
                ref = self.reference_logps(rollout)
            scores.append(self.scores(rollout))
            kls.append((kl_penalty(logps, ref, "k1") * rollout.mask).sum(-1))
            lengths.append(rollout.mask.sum(-1).float())
        columns = ("score", scores), ("kl", kls), ("response_length", lengths)
        return pooled_means({k: torch.cat(x).tolist() if x else [] for k, x in columns})


def pooled_means(columns: dict[str, list[float]]) -> dict[str, float]:
    """The mean of each column over the values of every rank (each rank holds a share of an
    evaluation's samples; every rank gets the means)."""
    parts = dist.gather_objects(columns)
    pooled = {k: [float(v) for part in parts for v in part[k]] for k in columns}
    return {k: sum(v) / max(len(v), 1) for k, v in pooled.items()}


def zero_std_fraction(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """The share of groups (group_size consecutive responses of one prompt) whose scores are
    all equal; 0 without groups (group_size 1)."""
    if group_size < 2:
        return torch.zeros(())
    groups = scores.reshape(-1, group_size)
    return (groups.amax(-1) == groups.amin(-1)).float().mean()


def over_ranks(averaged: dict[str, float], summed: dict[str, float]) -> dict[str, float]:
    """Metrics combined over ranks in one all-reduce: `averaged` ones are the mean of the
    ranks' values, `summed` ones (each rank's share of a global quantity) their sum. Every
    rank has the same keys."""
    if dist.world_size() == 1:
        return {**averaged, **summed}
    keys = sorted(averaged) + sorted(summed)
    values = [float(averaged[k]) for k in sorted(averaged)]
    values += [float(summed[k]) for k in sorted(summed)]
    totals = dist.all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()
    n = len(averaged)
    return dict(zip(keys, [t / dist.world_size() for t in totals[:n]] + totals[n:]))


def resolve_dirs(path: str):
    from pathlib import Path

    return [Path(path), Path(path) / "final"]
