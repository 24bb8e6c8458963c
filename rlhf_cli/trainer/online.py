"""What the online stages (ppo, grpo, rloo, reinforce) share: sampling rollouts (through the
rollout engine, rlhf_cli.rollout), scoring them, reference log-probs, and the clipped-update
loop over minibatches.

One step = take `rollout_batch_size` prompts, sample `group_size` responses each, score them,
compute advantages (the stage's own rule), then `epochs` passes of minibatch updates.

Memory: with LoRA every role shares ONE base model: the policy is the trained adapter, the
reference is the same base with the adapter disabled (or a frozen copy of the starting
adapter), the value head (ppo) sits on the policy's last hidden states, and a reward model
trained from the same base is loaded as a second, frozen adapter with its own head.
"""

from __future__ import annotations

import time

import torch

from rlhf_cli.core import distributed as dist
from rlhf_cli.core.errors import RewardError, UserError
from rlhf_cli.core.progress import console
from rlhf_cli.data.examples import Renderer
from rlhf_cli.losses import (
    adaptive_kl_coef,
    aggregate_loss,
    aggregate_weight,
    kl_penalty,
    masked_mean,
    pass_ks,
    policy_token_losses,
    prompt_pass_at_k,
    tis_weights,
    truncated_logps,
)
from rlhf_cli.model.forward import (
    decoder,
    is_fsdp,
    lm_logits,
    own_logits,
    packed_hidden,
    position_ids,
)
from rlhf_cli.model.heads import ScalarHead
from rlhf_cli.model.load import (
    adapter_switched,
    autocast,
    disable_dropout,
    eval_mode,
    set_eval,
    setup_reference,
)
from rlhf_cli.multiturn import env_factory
from rlhf_cli.rollout.batch import Rollout, join_groups
from rlhf_cli.rollout.engine import generation_config
from rlhf_cli.rollout.sampler import Sampler, pooled_means, zero_std
from rlhf_cli.trainer.loop import Stage, Updater, stop_point

# Response positions whose float32 logits exist at once in OnlineStage.forward (whole rows of
# them): 1024 x vocabulary x 4 bytes, 200 MB for a 49k vocabulary, instead of the whole batch.
LOGIT_TOKENS = 1024


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
        if count == 0:  # every reward of the step was non-finite
            return
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
        # Response tokens one sample may hold (seq_sum_norm's constant divisor): every reply's.
        self.token_budget = s.max_new_tokens * (s.max_turns if s.multi_turn else 1)
        for note in s.notes():
            console.print(f"[yellow]warning:[/] {note}")
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
        self.generation = generation_config(
            tokenizer, s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.min_p
        )
        self.make_env = env_factory(s)
        if self.make_env is not None:
            self.renderer = Renderer(tokenizer)
        self.setup_engine()

    def forward(
        self,
        model,
        batch: dict[str, torch.Tensor],
        prompt_len: int,
        with_values: bool = False,
        with_entropy: bool = False,
        truncated: bool = False,
    ):
        """(response log-probs (B, R), values (B, R) or None, entropies (B, R) or None) at the
        sampling temperature; with `truncated`, a fourth: the log-probs under the truncated
        distribution the vLLM engine sampled from (stage.top_k/top_p/min_p in vLLM's order,
        losses.truncated_logps), what its reported log-probs are compared with for TIS. Only
        the response positions go through the LM head (and the family's logit transform,
        model.forward.lm_logits), whole rows of up to LOGIT_TOKENS positions at a time, so the
        float32 logits of the whole batch never exist at once; a family whose transform is unknown runs its own forward (and its logits are whole). The entropy (no
        gradient) is H = logsumexp(z) - sum softmax(z) z."""
        inputs = dict(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=position_ids(batch["attention_mask"]),
        )
        # Position P-1+j predicts response token j (and holds the value of the state before it).
        window = slice(prompt_len - 1, -1)
        if own_logits(model):
            out = model(**inputs, output_hidden_states=True)
            states = out.hidden_states[-1][:, window]

            def head(rows: slice) -> torch.Tensor:
                return out.logits[rows, window]
        else:
            if self.pack:  # train.packing: the same states, without the padding's compute
                mask, multiple = batch["attention_mask"], self.cfg.train.pad_to_multiple_of
                hidden = packed_hidden(
                    model, batch["input_ids"], mask, self.pack, multiple, self.slices
                )
            else:
                hidden = decoder(model)(**inputs).last_hidden_state
            states = hidden[:, window]

            def head(rows: slice) -> torch.Tensor:
                return lm_logits(model, states[rows])

        response = batch["input_ids"][:, prompt_len:]
        s = self.cfg.stage
        logps, entropies, behaviour = [], [], []
        step = max(1, LOGIT_TOKENS // max(1, response.shape[1]))
        for start in range(0, states.shape[0], step):
            rows = slice(start, start + step)
            logits = head(rows).float() / s.temperature
            # log softmax at the sampled token only: gather minus logsumexp (no (B, R, V) copy).
            picked = logits.gather(-1, response[rows].unsqueeze(-1)).squeeze(-1)
            lse = torch.logsumexp(logits, -1)
            logps.append(picked - lse)
            if with_entropy:
                with torch.no_grad():
                    probs = torch.softmax(logits, -1)
                    entropies.append(lse - (probs * logits).sum(-1))
            if truncated:
                with torch.no_grad():
                    behaviour.append(
                        truncated_logps(logits, response[rows], s.top_k, s.top_p, s.min_p)
                    )
        keep = batch["attention_mask"][:, prompt_len:]
        logps = torch.cat(logps) * keep
        values = self.value_head(states) if with_values and self.value_head is not None else None
        out = (logps, values, torch.cat(entropies) if with_entropy else None)
        if truncated:  # (-inf for a token outside the trainer's kept set: weight 0, clamped)
            out += (torch.where(keep.bool(), torch.cat(behaviour).clamp(min=-1e4), 0.0),)
        return out

    @torch.no_grad()
    def reference_logps(self, rollout: Rollout) -> torch.Tensor:
        batch = rollout.select(slice(None))
        if self.ref_model is not None:
            return self.forward(self.ref_model, batch, rollout.prompt_len)[0]
        with adapter_switched(self.model, self.ref_adapter):
            return self.forward(self.model, batch, rollout.prompt_len)[0]

    # -- the step ----------------------------------------------------------------------------

    def truncates(self) -> bool:
        """Whether the stage samples from a truncated distribution (top_k, top_p, min_p)."""
        s = self.cfg.stage
        return s.temperature > 0 and (s.top_k > 0 or s.top_p < 1 or s.min_p > 0)

    def examples_per_step(self) -> int:
        """rollout_batch_size prompts; with dynamic sampling, that many for each try."""
        s = self.cfg.stage
        return s.rollout_batch_size * (s.dynamic_sampling_max_tries if s.dynamic_sampling else 1)

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

    def sample(self, examples: list) -> tuple[Rollout, dict[str, torch.Tensor], dict[str, float]]:
        """This rank's rollout of the step, its reward terms, and sampling metrics.

        Plain: the step's rollout_batch_size prompts (this rank's share). With
        stage.dynamic_sampling the step's prompts come in tries of rollout_batch_size; groups
        whose rewards are all equal are set aside and the next try sampled until this rank
        has its share of groups; a batch still short after the last try is completed with
        set-aside groups (dynamic/filled). Every rank makes the same number of tries (a rank
        that is full waits), and a reward function that fails on one rank stops them all."""
        s = self.cfg.stage
        size, group = s.rollout_batch_size, s.group_size
        need = size // dist.world_size()
        parts: list[tuple[Rollout, dict[str, torch.Tensor]]] = []
        kept: list[tuple[int, int]] = []  # (part, group) with rewards that differ
        flat: list[tuple[int, int]] = []  # (part, group) whose rewards are all equal
        gen_seconds, sync_seconds, tries = 0.0, 0.0, 0
        lockstep = is_fsdp(self.model)  # every forward a collective: a full rank samples too
        for t in range(len(examples) // size):
            error = None
            if len(kept) < need or lockstep:
                full = len(kept) >= need
                try:
                    rollout = self.rollout(dist.shard(examples[t * size : (t + 1) * size]))
                    gen_seconds += self.gen_seconds
                    sync_seconds += self.sync_seconds
                    terms = self.score_terms(rollout)
                except RewardError as err:
                    error = err
                else:
                    if not full:  # (a full rank sampled in step with the others, and drops it)
                        parts.append((rollout, terms))
                        reward = self.reward(rollout, terms)[0]
                        same = (
                            zero_std(reward, group)
                            if s.dynamic_sampling
                            else torch.zeros(need, dtype=torch.bool)
                        )
                        for g, is_flat in enumerate(same.tolist()):
                            (flat if is_flat else kept).append((len(parts) - 1, g))
            tries += 1
            stop_point(self)  # a signal: after this generation, not after the whole step
            failed, short = dist.all_reduce_sum(
                torch.tensor([float(error is not None), float(len(kept) < need)])
            ).tolist()
            if failed:
                raise error or RewardError("a reward function failed on another rank (see above)")
            if not short:
                break
        picks = (kept + flat)[:need]
        sampled = torch.cat([self.reward(r, terms)[0] for r, terms in parts])
        metrics = {
            "rollout_s": gen_seconds,
            # Groups whose responses all scored the same (of every group sampled this step):
            # zero advantage, nothing learned.
            "zero_std_groups": float(zero_std(sampled, group).float().mean()) if group > 1 else 0.0,
        }
        if self.engine.name != "hf":
            metrics["rollout/sync_s"] = sync_seconds
        if s.dynamic_sampling:
            metrics["dynamic/tries"] = float(tries)
            metrics["dynamic/filled"] = sum(p in flat for p in picks) / need
        if len(parts) == 1 and picks == [(0, g) for g in range(need)]:
            rollout, terms = parts[0]
        else:
            rollout = join_groups([r for r, _ in parts], picks, group, self.tokenizer.pad_token_id)
            terms = {
                name: torch.cat([parts[p][1][name][g * group : (g + 1) * group] for p, g in picks])
                for name in parts[0][1]
            }
        return rollout, terms, metrics

    def reward(
        self, rollout: Rollout, terms: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) rewards: the weighted score minus the missing-EOS penalty, a non-finite one
        replaced by the mean of its group's finite ones (of the batch's, for group_size 1);
        and (B,) whether each was finite."""
        reward = self.combine(terms) - self.cfg.stage.missing_eos_penalty * (~rollout.ended).float()
        valid = torch.isfinite(reward)
        if valid.all():
            return reward, valid
        size = self.cfg.stage.group_size if self.cfg.stage.group_size > 1 else reward.numel()
        groups, ok = reward.view(-1, size), valid.view(-1, size)
        mean = torch.where(ok, groups, 0.0).sum(-1, keepdim=True) / ok.sum(-1, keepdim=True).clamp(
            min=1
        )
        return torch.where(ok, groups, mean).view(-1), valid

    def train_step(self, examples: list, updater: Updater) -> tuple[dict[str, float], int]:
        t0 = time.perf_counter()
        set_eval(self.model)  # generation with the KV cache, never checkpointed
        rollout, terms, sampling = self.sample(examples)
        self.engine.release()  # (vllm on CUDA) the update gets the engine's memory
        score = self.combine(terms)
        reward, valid = self.reward(rollout, terms)
        # A response whose reward is not finite leaves the loss (and the reward statistics).
        mask = rollout.mask & valid.unsqueeze(-1)
        old, reward, tis, mismatch = self.old_policy(rollout, reward, valid, mask)
        self.model.train()  # dropout is off (__init__); gradient checkpointing applies
        losses, norms, stats, weighted = self.update(rollout, old, mask, tis, updater)
        seq_kl = old["kl_tokens"].sum(-1)
        if getattr(self.cfg.stage, "adaptive_kl", False):
            s, world = self.cfg.stage, dist.world_size()
            mean_kl = float(dist.all_reduce_sum(seq_kl.mean().double())) / world
            self.kl_coef = adaptive_kl_coef(
                self.kl_coef, mean_kl, s.kl_target, s.kl_horizon, rollout.input_ids.shape[0] * world
            )
        lengths = rollout.mask.sum(-1).float()
        record = {
            "loss": sum(losses) / len(losses),
            "grad_norm": sum(norms) / len(norms),
            **finite_stats("score", score),
            "reward": float(reward[valid].mean()) if valid.any() else 0.0,
            "kl": float(seq_kl[valid].mean()) if valid.any() else 0.0,
            "kl_coef": self.kl_coef,
            "response_length": float(lengths.mean()),
            "eos_fraction": float(rollout.ended.float().mean()),
            "truncated_fraction": float((~rollout.ended).float().mean()),
            "gen_tokens_per_s": float(lengths.sum()) / max(sampling["rollout_s"], 1e-9),
            "step_s": time.perf_counter() - t0,
            **sampling,
            **mismatch,
            **stats,
        }
        if len(terms) > 1:
            for name, values in terms.items():
                record.update(finite_stats(f"rewards/{name}", values))
        if rollout.turns is not None:  # replies per conversation
            record["turns"] = sum(
                sum(m["role"] == "assistant" for m in t) for t in rollout.turns
            ) / len(rollout.turns)
            # Conversations ended because their next turn would not fit the context.
            record["context_full"] = float(rollout.context_full.float().mean())
        self.samples = self.sample_rows(rollout, score)
        # Responses whose reward was not finite (dropped from the loss), summed over ranks.
        weighted["nonfinite_rewards"] = float((~valid).sum())
        record = over_ranks(record, weighted)
        return record, int(dist.all_reduce_sum(rollout.attention_mask.sum()))

    def old_policy(
        self, rollout: Rollout, reward: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor
    ) -> tuple[dict, torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """The rollout under the policy that sampled it, before any update: `old` holds its
        log-probs and values, the reference's log-probs, the per-token KL and the advantages;
        the rewards (normalised with stage.normalize_rewards); with the vLLM engine the TIS
        weights (rollout.tis_cap, else None) and the engine/trainer mismatch metrics."""
        s = self.cfg.stage
        # With the vLLM engine and truncated sampling, its log-probs are those of the truncated
        # distribution: the trainer's are computed under the same truncation to compare.
        truncated = rollout.engine_logps is not None and self.truncates()
        with torch.no_grad(), autocast(self.amp_dtype, self.device):
            old_logps, old_values, _, *behaviour = self.forward(
                self.model,
                rollout.select(slice(None)),
                rollout.prompt_len,
                with_values=True,
                truncated=truncated,
            )
            ref_logps = self.reference_logps(rollout)
        behaviour_logps = behaviour[0] if behaviour else old_logps
        if s.normalize_rewards:
            self.moments.update(reward[valid])
            reward = (reward - self.moments.mean) / (self.moments.std + 1e-8)
        kl_tokens = kl_penalty(old_logps, ref_logps, "k1") * mask
        old = {
            "logps": old_logps,
            "values": old_values,
            "ref_logps": ref_logps,
            "kl_tokens": kl_tokens,
        }
        self.advantages(rollout, reward, old)
        # The engine's log-probs against the trainer's (rollout.engine=vllm): the mismatch,
        # and with rollout.tis_cap the weights that correct the policy loss for it.
        tis, mismatch = None, {}
        if rollout.engine_logps is not None:
            weights, tstats = tis_weights(
                behaviour_logps,
                rollout.engine_logps,
                mask,
                self.cfg.rollout.tis_cap or float("inf"),
            )
            tis = weights if self.cfg.rollout.tis_cap is not None else None
            mismatch = {f"rollout/{k}": float(v) for k, v in tstats.items()}
            if tis is None:
                mismatch.pop("rollout/tis_clipped")
                mismatch.pop("rollout/tis_weight_mean")
        return old, reward, tis, mismatch

    def update(
        self,
        rollout: Rollout,
        old: dict,
        mask: torch.Tensor,
        tis: torch.Tensor | None,
        updater: Updater,
    ) -> tuple[list[float], list[float], dict[str, float], dict[str, float]]:
        """stage.epochs passes over the rollout in minibatches, an optimizer update each: their
        losses and gradient norms, the checks of the first micro-batch (before any update), and
        the token-weighted update metrics (this rank's share: summed over ranks later)."""
        s = self.cfg.stage
        # The tokens the policy loss sees: all response tokens, or (mask_truncated) those of
        # responses that ended with EOS.
        loss_mask = mask & rollout.ended.unsqueeze(-1) if s.mask_truncated else mask
        stats: dict[str, float] = {}
        weighted: dict[str, float] = {}
        n = rollout.input_ids.shape[0]
        losses, norms = [], []
        for _ in range(s.epochs):
            order = torch.randperm(n)
            for start in range(0, n, self.local_minibatch):
                mb_idx = order[start : start + self.local_minibatch]
                # The minibatch's divisors over every rank: the policy loss's weight (tokens,
                # responses, or responses x max_new_tokens: stage.loss_agg) and its tokens.
                local = [
                    aggregate_weight(loss_mask[mb_idx], s.loss_agg, self.token_budget),
                    mask[mb_idx].sum(),
                ]
                divisors = dist.all_reduce_sum(torch.stack(local).float()).clamp(min=1)
                total = torch.zeros((), device=self.device)
                for m0 in range(0, len(mb_idx), self.cfg.train.micro_batch_size):
                    idx = mb_idx[m0 : m0 + self.cfg.train.micro_batch_size].to(self.device)
                    loss, checks, metrics = self.micro_loss(
                        rollout, old, idx, (mask, loss_mask), tis, divisors, first=not stats
                    )
                    loss.backward()
                    total += loss.detach()
                    stats = stats or checks
                    for name, value in metrics.items():
                        weighted[name] = weighted.get(name, 0.0) + value
                loss_value, norm = updater.apply(dist.all_reduce_sum(total))
                losses.append(loss_value)
                norms.append(norm)
        return losses, norms, stats, weighted

    def micro_loss(
        self,
        rollout: Rollout,
        old: dict,
        idx: torch.Tensor,
        masks: tuple[torch.Tensor, torch.Tensor],
        tis: torch.Tensor | None,
        divisors: torch.Tensor,
        first: bool,
    ) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
        """One micro-batch's part of its minibatch's loss (to backward), its update metrics
        weighted by its share of the minibatch's tokens, and on the step's first micro-batch
        the checks that are cheap here: ratio 1 and KL 0 before any update, the entropy."""
        s = self.cfg.stage
        mb_weight, mb_tokens = divisors
        m, lm = masks[0][idx], masks[1][idx]
        with autocast(self.amp_dtype, self.device):
            logps, values, entropy = self.forward(
                self.model,
                rollout.select(idx),
                rollout.prompt_len,
                with_values=True,
                with_entropy=first,
            )
        old_logps = old["logps"][idx]
        token_losses, pstats = policy_token_losses(
            logps,
            old_logps,
            old["advantages"][idx],
            lm,
            s.clip_eps,
            s.clip_eps_high,
            s.importance_level,
        )
        if tis is not None:
            token_losses = token_losses * tis[idx]
        mb = {k: v[idx] for k, v in old.items() if torch.is_tensor(v)}
        extra, estats = self.extra_loss(logps, values, mb, m)
        share = m.sum() / mb_tokens
        if extra is not None and extra.dim() == 2:  # per token: aggregated alike
            token_losses, extra = token_losses + extra, None
        policy_total, _ = aggregate_loss(token_losses, lm, s.loss_agg, self.token_budget)
        loss = policy_total / mb_weight
        if extra is not None:  # a token mean: weighted by the micro-batch's tokens
            loss = loss + extra * share
        checks = {}
        if first:
            with torch.no_grad():
                ratio = masked_mean(torch.exp(logps - old_logps), m)
            checks = {
                "policy/ratio_first": float(ratio),
                "policy/approx_kl_first": float(pstats["approx_kl"]),
                "entropy": float(masked_mean(entropy, m)),
            }
        metrics = {
            (key if "/" in key else f"policy/{key}"): float(value)
            * float(share)
            / self.updates_per_step()
            for key, value in {**pstats, **estats}.items()
        }
        return loss, checks, metrics

    def sample_rows(self, rollout: Rollout, score: torch.Tensor) -> list[dict]:
        """The first log.samples prompt/response/score rows of this rank's rollout, when a
        tracker (TensorBoard, W&B) will show them; else none."""
        log = self.cfg.log
        if not (log.tensorboard or log.wandb) or not dist.is_main():
            return []
        return [
            {
                "prompt": rollout.prompt_texts[i],
                "response": self.tokenizer.decode(rollout.responses[i], skip_special_tokens=True),
                "score": float(score[i]),
            }
            for i in range(min(log.samples, len(rollout.responses)))
        ]

    @torch.no_grad()
    def evaluate(self, examples: list) -> dict[str, float]:
        """Sample on the eval prompts: mean score, KL to the reference, length. Sampling uses
        its own seeded RNG, so evaluations compare across steps and leave training unchanged."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), eval_mode(self.model):
            torch.manual_seed(self.cfg.train.seed)
            try:
                return self._evaluate(examples)
            finally:
                self.engine.release()

    def _evaluate(self, examples: list) -> dict[str, float]:
        columns: dict[str, list] = {"score": [], "kl": [], "response_length": []}
        size = self.cfg.stage.rollout_batch_size
        n = self.cfg.train.eval_n or self.cfg.stage.group_size
        pool, lockstep = examples, is_fsdp(self.model)
        # With train.eval_n: pass@k per prompt, and per task where the rows name one (every
        # rank the same keys).
        ks = pass_ks(n) if self.cfg.train.eval_n else []
        named = {ex.get("columns", {}).get("task") for ex in pool} - {None} if ks else set()
        tasks = sorted(named)
        for k in ks:
            columns[f"pass@{k}"] = []
            columns.update({f"pass@{k}/{t}": [] for t in tasks})
        columns.update({f"score/{t}": [] for t in tasks})
        examples = examples[dist.rank() :: dist.world_size()]
        batches = int(dist.all_reduce_max(float(-(-len(examples) // size))))
        for i in range(0, batches * size, size):
            stop_point(self)  # every rank takes each stop point
            part = examples[i : i + size]
            if not part and not lockstep:
                continue
            # Under FSDP every forward is a collective: a rank out of examples runs a stand-in
            # batch in step with the others and drops its results.
            rollout = self.rollout(part or pool[:1], k=n)
            with autocast(self.amp_dtype, self.device):
                logps = self.forward(self.model, rollout.select(slice(None)), rollout.prompt_len)[0]
                ref = self.reference_logps(rollout)
            terms = self.score_terms(rollout)
            if not part:
                continue
            score = self.combine(terms)
            columns["score"] += score.tolist()
            if len(terms) > 1:
                for name, values in terms.items():
                    columns.setdefault(f"rewards/{name}", []).extend(values.tolist())
            columns["kl"] += (kl_penalty(logps, ref, "k1") * rollout.mask).sum(-1).tolist()
            columns["response_length"] += rollout.mask.sum(-1).float().tolist()
            by_prompt = score.view(len(part), n)
            passed = (by_prompt >= self.cfg.train.eval_pass_score).sum(-1).tolist()
            for ex, c, scores in zip(part, passed, by_prompt.tolist()):
                if not ks:
                    continue
                task = ex.get("columns", {}).get("task")
                for key, value in prompt_pass_at_k(n, c, task).items():
                    columns[key].append(value)
                if task is not None:
                    columns[f"score/{task}"] += scores
        return pooled_means(columns)


def finite_stats(name: str, values: torch.Tensor) -> dict[str, float]:
    """{name: mean, name_std: std} over the finite values (0 when there are none)."""
    values = values[torch.isfinite(values)].double()
    mean = float(values.mean()) if values.numel() else 0.0
    std = float(values.std()) if values.numel() > 1 else 0.0
    return {name: mean, f"{name}_std": std}


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
