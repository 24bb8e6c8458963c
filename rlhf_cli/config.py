"""Typed config schemas, registered in Hydra's ConfigStore and validated before any model loads.

Every field has one docstring (shown by `rlhf train --help`). The YAML groups in `conf/` name
these schemas in their defaults lists, so a typo'd key or a wrong type fails at composition,
and `__post_init__` rejects impossible values with a message naming the key.
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from rlhf_cli.core.errors import UserError, first_line


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key and how to fix it."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{key}={value!r} is not one of: {', '.join(choices)}")


def _positive(key: str, value: float) -> None:
    _check(value > 0, f"{key} must be > 0, got {value}")


def _non_negative(key: str, value: float) -> None:
    _check(value >= 0, f"{key} must be >= 0, got {value}")


# ---------------------------------------------------------------------------------------------
# stage


@dataclass
class StageConfig:
    name: str = MISSING
    """Which stage runs: sft, rm, dpo, kto, ppo, grpo, rloo, reinforce, rs (`stage=<name>`)."""


@dataclass
class SftConfig(StageConfig):
    name: str = "sft"
    """Supervised fine-tuning: next-token loss on the responses."""
    completion_only: bool = True
    """Train on response tokens only (prompt and user turns masked); false trains on all tokens."""
    train_on_turns: str = "all"
    """For multi-turn chats: train every assistant turn (`all`) or only the `last`."""

    def __post_init__(self) -> None:
        _choice("stage.train_on_turns", self.train_on_turns, ("all", "last"))


@dataclass
class RmConfig(StageConfig):
    name: str = "rm"
    """Reward model: a scalar head on the LM, trained on preference pairs (Bradley-Terry)."""
    center_coef: float = 0.0
    """Weight of the centering term c * (r_chosen + r_rejected)^2 (about 0.01 keeps rewards near 0)."""
    use_margin: bool = True
    """Subtract the data's per-pair margin column (Llama 2) when it has one."""

    def __post_init__(self) -> None:
        _non_negative("stage.center_coef", self.center_coef)


@dataclass
class DpoConfig(StageConfig):
    name: str = "dpo"
    """Direct preference optimization against a frozen reference policy."""
    beta: float | None = None
    """Strength of the KL constraint: smaller beta lets the policy move further from the
    reference (SimPO: the scale of the length-normalised reward). null = the loss type's
    default: 0.1, or 2.0 for simpo."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO), ipo, hinge (RSO), or the reference-free orpo and simpo (no reference
    forward). Ranked data (K > 2 responses) uses Plackett-Luce (sigmoid only)."""
    label_smoothing: float = 0.0
    """cDPO: the probability that a preference label is flipped (sigmoid only, < 0.5)."""
    rpo_alpha: float = 0.0
    """Weight of a length-normalised NLL term on the chosen response (RPO; with simpo it is
    CPO-SimPO; orpo has the term already); 0 = off."""
    length_normalize: bool = False
    """Use per-token average log-probs instead of sums (IPO always does)."""
    orpo_lambda: float = 0.1
    """ORPO: weight of the odds-ratio term beside the NLL of the chosen response (Hong et al.)."""
    simpo_gamma: float = 0.5
    """SimPO: the target reward margin gamma (Meng et al.)."""
    dropout: bool = False
    """Keep dropout (peft.dropout, the model's own) in the policy's forward. Off by default, as
    in TRL and the reference DPO code: the policy and the reference would otherwise compute
    different functions, and the step-0 loss would not be log 2."""

    def __post_init__(self) -> None:
        _choice("stage.loss_type", self.loss_type, ("sigmoid", "ipo", "hinge", "orpo", "simpo"))
        if self.beta is None:
            self.beta = 2.0 if self.loss_type == "simpo" else 0.1
        _positive("stage.beta", self.beta)
        _non_negative("stage.orpo_lambda", self.orpo_lambda)
        _check(
            not (self.loss_type == "orpo" and self.rpo_alpha),
            "stage.rpo_alpha adds an NLL term on the chosen response, which ORPO has already: "
            "set stage.rpo_alpha=0",
        )
        _check(
            0 <= self.label_smoothing < 0.5,
            f"stage.label_smoothing must be in [0, 0.5), got {self.label_smoothing}",
        )
        _check(
            self.label_smoothing == 0 or self.loss_type == "sigmoid",
            f"stage.label_smoothing applies to loss_type=sigmoid only (got {self.loss_type})",
        )
        _non_negative("stage.rpo_alpha", self.rpo_alpha)


@dataclass
class KtoConfig(StageConfig):
    name: str = "kto"
    """Kahneman-Tversky optimization (Ethayarajh et al. 2024): unpaired desirable/undesirable
    completions against a frozen reference; paired data is split into one of each."""
    beta: float = 0.1
    """Scale of the implicit reward beta * (logp_pi - logp_ref) inside the sigmoid."""
    desirable_weight: float = 1.0
    """w_d: weight of the desirable examples' losses."""
    undesirable_weight: float = 1.0
    """w_u: weight of the undesirable examples' losses; keep w_d n_d / (w_u n_u) in [1, 4/3]
    (the paper's range; a warning says when the data is outside it)."""
    dropout: bool = False
    """Keep dropout in the policy's forward (off by default, as for dpo)."""

    def __post_init__(self) -> None:
        _positive("stage.beta", self.beta)
        _positive("stage.desirable_weight", self.desirable_weight)
        _positive("stage.undesirable_weight", self.undesirable_weight)


REFERENCE_FREE = ("orpo", "simpo")  # DPO-stage losses without a reference policy


@dataclass
class SamplingConfig(StageConfig):
    """How the stages that sample their own data (online stages, rs) generate and score."""

    max_new_tokens: int = 32
    """Longest sampled response."""
    temperature: float = 1.0
    """Sampling temperature (the online stages compute log-probs at the same temperature; rs
    evaluates greedily)."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 samples the full distribution."""
    top_k: int = 0
    """Sample among the k likeliest tokens only; 0 = all of them."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p x the likeliest one's probability; 0 = none.
    (top_p, top_k and min_p shape the sampling only: the online stages' log-probs are those of
    the whole distribution at the temperature, as the policy's own.)"""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of a response that never emits EOS (rs: before selecting)."""

    def __post_init__(self) -> None:
        _check(
            self.max_new_tokens >= 1,
            f"stage.max_new_tokens must be >= 1, got {self.max_new_tokens}",
        )
        _positive("stage.temperature", self.temperature)
        _check(0 < self.top_p <= 1, f"stage.top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, f"stage.top_k must be >= 0 (0 = off), got {self.top_k}")
        _check(0 <= self.min_p < 1, f"stage.min_p must be in [0, 1), got {self.min_p}")
        _non_negative("stage.missing_eos_penalty", self.missing_eos_penalty)


@dataclass
class OnlineConfig(SamplingConfig):
    """What the online stages (ppo, grpo, rloo) share: rollouts, clipping, the KL to the reference."""

    rollout_batch_size: int = 16
    """Prompts per step; each gets group_size sampled responses."""
    group_size: int = 1
    """Responses sampled per prompt (the group of GRPO/RLOO; >= 2 there)."""
    epochs: int = 1
    """Optimisation passes over each rollout batch."""
    minibatch_size: int = 16
    """Sequences per optimizer update (accumulated in train.micro_batch_size pieces; capped at
    the rollout batch)."""
    clip_eps: float = 0.2
    """PPO ratio clipping: the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high]."""
    clip_eps_high: float | None = None
    """The upper clip range (DAPO's clip-higher, e.g. 0.28 with clip_eps=0.2); null = clip_eps."""
    importance_level: str = "token"
    """token: one importance ratio per token (PPO, GRPO); sequence: one per response, exp of
    the mean token log-ratio, clipped per response (GSPO)."""
    loss_agg: str = "token_mean"
    """How the policy loss averages a minibatch: token_mean (every token counts once; DAPO),
    seq_mean_token_mean (mean over responses of each one's token mean; GRPO as published) or
    seq_sum_norm (sum / (responses x max_new_tokens); Dr. GRPO, with scale_rewards=false)."""
    mask_truncated: bool = False
    """Leave responses cut off at max_new_tokens (no EOS) out of the policy loss (DAPO's
    overlong filtering); see also missing_eos_penalty."""
    kl_coef: float = 0.05
    """Weight of the KL to the reference (in the reward for ppo/rloo, in the loss for grpo)."""
    kl_estimator: str = "k1"
    """Per-token KL estimator: k1 = log pi - log ref, k2 = (log pi - log ref)^2 / 2, or k3 =
    ref/pi - 1 - log(ref/pi) (non-negative, low variance). In a reward (ppo, rloo, reinforce)
    each estimates KL(pi || ref); as a loss term (grpo) what counts is the gradient: k2's is
    that of KL(pi || ref), k3's that of KL(ref || pi), k1's is 0 in expectation (refused)."""
    normalize_rewards: bool = False
    """Standardise scores with running mean/std before computing advantages."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal (nothing to learn from) and sample further
    prompts until the batch holds rollout_batch_size groups (DAPO). Each step draws
    rollout_batch_size x dynamic_sampling_max_tries prompts and samples them one
    rollout_batch_size at a time; a batch still short after the last try is filled with
    dropped groups (zero advantage), counted in dynamic/filled."""
    dynamic_sampling_max_tries: int = 3
    """Rollout batches one step may sample with dynamic_sampling (the bound on its cost)."""
    env: str | None = None
    """Multi-turn rollouts with an environment: `package.module:Name`, built once per sampled
    response (with env_kwargs), with reset(row) and step(text) -> (observation, reward, done);
    its rewards, summed over the episode, are a reward term (`env`). See rlhf_cli.multiturn.
    `trl:package.module:Name`: a class written for TRL's environment_factory (reset(**row), its
    public methods the tools, get_reward())."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the environment: +stage.env_kwargs.uses=2."""
    tools: list[str] = field(default_factory=list)
    """Multi-turn rollouts with tools: [package.module:function, ...]; a reply that calls them
    (<tool_call>{"name": ..., "arguments": {...}}</tool_call>) gets their results as a tool
    message, a reply without a call is the final answer."""
    max_turns: int = 4
    """With env or tools: the most replies the policy makes in one episode (stage.max_new_tokens
    is the limit of each reply)."""
    tool_timeout_s: float = 10.0
    """With tools: the seconds a tool call may run; a call still running then is abandoned and
    the policy is told it timed out."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.dynamic_sampling_max_tries >= 1,
            f"stage.dynamic_sampling_max_tries must be >= 1, got {self.dynamic_sampling_max_tries}",
        )
        _check(
            not self.dynamic_sampling or self.group_size >= 2,
            f"stage.dynamic_sampling drops groups whose rewards are all equal: it needs "
            f"stage.group_size >= 2, got {self.group_size}",
        )
        for key in ("rollout_batch_size", "group_size", "epochs", "minibatch_size"):
            value = getattr(self, key)
            _check(value >= 1, f"stage.{key} must be >= 1, got {value}")
        _check(0 < self.clip_eps < 1, f"stage.clip_eps must be in (0, 1), got {self.clip_eps}")
        _check(
            self.clip_eps_high is None or self.clip_eps_high >= self.clip_eps,
            f"stage.clip_eps_high={self.clip_eps_high} must be >= stage.clip_eps={self.clip_eps} "
            "(clip-higher widens the upper range), or null",
        )
        _choice("stage.importance_level", self.importance_level, ("token", "sequence"))
        # = losses.LOSS_AGGREGATIONS (not imported: the config loads without torch)
        _choice(
            "stage.loss_agg", self.loss_agg, ("token_mean", "seq_mean_token_mean", "seq_sum_norm")
        )
        _non_negative("stage.kl_coef", self.kl_coef)
        _choice("stage.kl_estimator", self.kl_estimator, ("k1", "k2", "k3"))
        _check(self.max_turns >= 1, f"stage.max_turns must be >= 1, got {self.max_turns}")
        _positive("stage.tool_timeout_s", self.tool_timeout_s)
        _check(
            not (self.env and self.tools),
            "stage.env and stage.tools both set: an environment calls its own tools (give it "
            "them through stage.env_kwargs), or name the tools alone",
        )
        _check(
            not self.env_kwargs or bool(self.env),
            "stage.env_kwargs without stage.env: name the environment",
        )

    @property
    def multi_turn(self) -> bool:
        """Episodes of several turns with an environment or tools."""
        return bool(self.env or self.tools)

    def notes(self) -> list[str]:
        """Settings that are valid but probably not what was meant (printed as warnings)."""
        notes = []
        if self.importance_level == "sequence" and self.loss_agg != "seq_mean_token_mean":
            notes.append(
                f"stage.importance_level=sequence with stage.loss_agg={self.loss_agg} weights "
                "each response's sequence-level term by its length: GSPO as published "
                "averages one term per response, stage.loss_agg=seq_mean_token_mean"
            )
        return notes


@dataclass
class PpoConfig(OnlineConfig):
    name: str = "ppo"
    """PPO with a value head, GAE and a per-token KL penalty in the reward."""
    epochs: int = 4
    """Optimisation passes over each rollout batch."""
    minibatch_size: int = 8
    """Sequences per optimizer update."""
    gamma: float = 1.0
    """Discount of GAE."""
    gae_lambda: float = 0.95
    """GAE lambda: 0 = one-step TD, 1 = Monte-Carlo returns minus the value."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    value_clip: float = 0.2
    """Clipping range of the value around its rollout-time estimate."""
    whiten_advantages: bool = True
    """Standardise advantages over the rollout batch."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards kl_target (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target KL (nats per sequence) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (in sequences) of the adaptive controller."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 < self.gamma <= 1, f"stage.gamma must be in (0, 1], got {self.gamma}")
        _check(
            0 <= self.gae_lambda <= 1, f"stage.gae_lambda must be in [0, 1], got {self.gae_lambda}"
        )
        _non_negative("stage.vf_coef", self.vf_coef)
        _positive("stage.value_clip", self.value_clip)
        _positive("stage.kl_target", self.kl_target)
        _check(self.kl_horizon >= 1, f"stage.kl_horizon must be >= 1, got {self.kl_horizon}")


@dataclass
class GrpoConfig(OnlineConfig):
    name: str = "grpo"
    """GRPO: group-normalised advantages, no value model, KL (k3) in the loss."""
    group_size: int = 4
    """Responses sampled per prompt."""
    kl_coef: float = 0.04
    """Weight (beta) of the KL to the reference in the loss."""
    kl_estimator: str = "k3"
    """Per-token KL estimator in the loss: k3 (its gradient is that of KL(ref || pi), as in
    the GRPO paper) or k2 (that of KL(pi || ref)); k1 is refused: as a loss term its expected
    gradient is 0, so it would regularise nothing."""
    minibatch_size: int = 64
    """Sequences per optimizer update."""
    scale_rewards: bool = True
    """Divide by the group's std (GRPO); false keeps only the mean baseline (Dr. GRPO)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.group_size >= 2, f"stage.group_size must be >= 2 for grpo, got {self.group_size}"
        )
        _check(
            self.kl_estimator != "k1",
            "stage.kl_estimator=k1 in grpo's loss has zero expected gradient (no KL "
            "regularisation at all): use k3 (the default; the gradient of KL(ref || pi)) or k2 "
            "(the gradient of KL(pi || ref))",
        )


@dataclass
class RlooConfig(OnlineConfig):
    name: str = "rloo"
    """RLOO: leave-one-out baseline over the group, sequence-level KL penalty in the reward."""
    group_size: int = 4
    """Responses sampled per prompt."""
    minibatch_size: int = 64
    """Sequences per optimizer update."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.group_size >= 2, f"stage.group_size must be >= 2 for rloo, got {self.group_size}"
        )


@dataclass
class ReinforceConfig(OnlineConfig):
    name: str = "reinforce"
    """REINFORCE with a baseline: A = R - b, R penalised by the sequence KL (as rloo)."""
    baseline: str = "moving"
    """moving: a running mean of past rewards (baseline_decay); batch: the batch's mean."""
    baseline_decay: float = 0.9
    """With baseline=moving: b <- decay b + (1 - decay) mean(R) after each batch."""
    minibatch_size: int = 1024
    """Sequences per optimizer update (capped at the rollout batch: one update per rollout,
    so the loss is plain REINFORCE)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("stage.baseline", self.baseline, ("moving", "batch"))
        _check(
            0 <= self.baseline_decay < 1,
            f"stage.baseline_decay must be in [0, 1), got {self.baseline_decay}",
        )


@dataclass
class RsConfig(SamplingConfig):
    name: str = "rs"
    """Rejection sampling (best-of-n, the Llama 2 recipe): each round samples n completions per
    prompt from the current policy, scores them (reward.model or reward.fn), keeps the best,
    and fine-tunes on them with the SFT loss. The length of the run is rounds x the steps of a
    round (train.max_steps is not used)."""
    n: int = 8
    """Completions sampled per prompt (10-30 is typical on a GPU)."""
    rounds: int = 2
    """Sample-select-train rounds; each samples from the policy the previous one trained."""
    prompts_per_round: int | None = None
    """Prompts sampled in each round (null: every training prompt; else the next ones of a
    seeded shuffle, so rounds see different prompts)."""
    select: str = "best"
    """best: keep the best completion of each prompt; top: keep the top_fraction of all the
    round's completions (some prompts give several, others none)."""
    top_fraction: float = 0.1
    """With select=top: the fraction of the round's completions that is kept."""
    epochs: int = 1
    """SFT passes over the kept completions in each round."""
    rollout_batch_size: int = 16
    """Prompts per generation batch (each with n completions); the unit of mid-round resume."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("n", "rounds", "epochs", "rollout_batch_size"):
            value = getattr(self, key)
            _check(value >= 1, f"stage.{key} must be >= 1, got {value}")
        _check(
            self.prompts_per_round is None or self.prompts_per_round >= 1,
            f"stage.prompts_per_round must be >= 1 or null, got {self.prompts_per_round}",
        )
        _choice("stage.select", self.select, ("best", "top"))
        _check(
            0 < self.top_fraction <= 1,
            f"stage.top_fraction must be in (0, 1], got {self.top_fraction}",
        )


@dataclass
class RewardConfig:
    """Where the rewards of the online stages and of rs come from: a reward model or a Python function."""

    model: str | None = None
    """A reward model trained by stage=rm (its run directory or final/)."""
    fn: str | None = None
    """A function `package.module:function(prompts, responses, **kwargs) -> list[float]`; the
    module is imported (the current directory first) and the function run on every batch."""
    fns: list[str] = field(default_factory=list)
    """Several functions, summed with `weights`: reward.fns=[pkg.mod:f,pkg.mod:g]; with
    reward.model set too, the reward model is one more term."""
    weights: list[float] = field(default_factory=list)
    """One weight per term, in order: the functions (fn or fns), then reward.model; empty = 1
    each. Each term is logged as rewards/<name> (mean and std)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the functions, added with a leading +: +reward.kwargs.chars=aeiou
    (each function gets those it accepts)."""
    batch_size: int = 16
    """Sequences per reward-model forward."""


@dataclass
class DistConfig:
    """How several processes (torchrun) share the work."""

    strategy: str = "ddp"
    """ddp: every rank holds the model, gradients are summed; fsdp: the weights (a 4-bit or
    unquantized base, its adapters), gradients and optimizer state are sharded (FSDP2)."""

    timeout_s: float = 1800.0
    """Seconds a rank waits in a collective for the others before the run fails with an
    error (a hung or dead rank) instead of waiting for ever."""

    def __post_init__(self) -> None:
        _choice("dist.strategy", self.strategy, ("ddp", "fsdp"))
        _positive("dist.timeout_s", self.timeout_s)


@dataclass
class RolloutConfig:
    """Who generates the responses of the online stages and rs (and of rlhf sample / eval)."""

    engine: str = "hf"
    """hf: transformers' generate on the training model itself. vllm: a vLLM engine in the
    training process (one per rank under torchrun) holding the policy's merged weights, reloaded
    after every update (install it with `make install VLLM=1` or pip install -e ".[vllm]")."""
    tis_cap: float | None = 2.0
    """vllm: truncated importance sampling. Each token's policy loss is weighted by
    min(pi_old / pi_engine, tis_cap): the trainer's log-prob over the engine's, for the tokens
    the engine sampled (the two kernels differ slightly); null = no correction."""
    dtype: str = "auto"
    """vllm: the engine's weights: auto = bfloat16 on CUDA, float32 on CPU (bf16 on a CPU
    without bf16 units is slow), or float32, bfloat16, float16."""
    kv_cache_gib: float | None = None
    """vllm: GiB for the engine's KV cache; null = 0.5 on CPU, and on CUDA the share
    gpu_memory_utilization leaves."""
    gpu_memory_utilization: float = 0.3
    """vllm on CUDA: the share of the GPU's memory the engine may take (weights + KV cache);
    training uses the rest."""
    sleep: bool = True
    """vllm on CUDA: after each step's rollouts (all turns and dynamic-sampling tries), the
    engine sleeps at level 2 (weights and KV cache freed) so the update gets that memory back;
    the updated weights are loaded into it before the next rollout anyway."""
    max_model_len: int = 4096
    """vllm: the longest prompt + response the engine holds (capped at the model's context)."""

    def __post_init__(self) -> None:
        _choice("rollout.engine", self.engine, ("hf", "vllm"))
        _check(
            self.tis_cap is None or self.tis_cap >= 1,
            f"rollout.tis_cap must be >= 1 (or null: no correction), got {self.tis_cap}",
        )
        _choice("rollout.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _check(
            self.kv_cache_gib is None or self.kv_cache_gib > 0,
            f"rollout.kv_cache_gib must be > 0 (or null), got {self.kv_cache_gib}",
        )
        _check(
            0 < self.gpu_memory_utilization < 1,
            f"rollout.gpu_memory_utilization must be in (0, 1), got {self.gpu_memory_utilization}",
        )
        _check(
            self.max_model_len >= 16,
            f"rollout.max_model_len must be >= 16, got {self.max_model_len}",
        )


@dataclass
class RefConfig:
    """The frozen reference policy of DPO (and of the online stages)."""

    model: str | None = None
    """A separate reference model (hub id or directory); null = the policy's own base, with the
    adapter disabled, or the starting adapter (model.adapter) kept frozen."""
    precompute: bool = False
    """Compute reference log-probs once before training (cached in the run directory); each step
    then runs the policy only."""


# ---------------------------------------------------------------------------------------------
# model, peft, quant


@dataclass
class ModelConfig:
    name_or_path: str = "tiny"
    """Hub id (e.g. meta-llama/Llama-2-7b-hf), a local model directory, or `tiny` (built locally)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the checkpoint. Off unless you trust its author."""
    dtype: str = "auto"
    """Dtype of the non-quantized weights: auto (bf16 for a frozen LoRA base when the run
    computes in bf16, i.e. train.precision=bf16, or auto on CUDA; fp32 otherwise), float32,
    bfloat16, float16."""
    adapter: str | None = None
    """A LoRA adapter directory (e.g. runs/sft/<time>/final) to start from instead of a fresh one."""
    chat_template: str | None = None
    """Jinja chat template (or a path to a .jinja file) to use instead of the tokenizer's."""
    attn_implementation: str | None = None
    """Attention kernel passed to transformers (sdpa, eager, flash_attention_2); null = default."""

    def __post_init__(self) -> None:
        _check(bool(self.name_or_path), "model.name_or_path is empty: name a hub id or a path")
        _choice("model.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))


@dataclass
class PeftConfig:
    method: str = "lora"
    """`lora` (adapters on a frozen base) or `full` (train every weight; needs quant=none)."""
    r: int = 16
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt, e.g. [q_proj,v_proj]; [all-linear] adapts every linear layer."""
    modules_to_save: list[str] = field(default_factory=list)
    """Extra modules trained in full and saved with the adapter (e.g. [lm_head])."""

    def __post_init__(self) -> None:
        _choice("peft.method", self.method, ("lora", "full"))
        _check(self.r >= 1, f"peft.r must be >= 1, got {self.r}")
        _positive("peft.alpha", self.alpha)
        _check(0 <= self.dropout < 1, f"peft.dropout must be in [0, 1), got {self.dropout}")
        _check(len(self.target_modules) > 0, "peft.target_modules is empty: use [all-linear]")


@dataclass
class QuantConfig:
    mode: str = "nf4"
    """Base-weight quantization (bitsandbytes): nf4 or fp4 (4-bit), int8, or none."""
    double_quant: bool = True
    """4-bit: also quantize the quantization constants (saves ~0.4 bit per weight)."""
    compute_dtype: str = "auto"
    """4-bit: dtype the dequantized weights are multiplied in. auto: bfloat16 where the device
    multiplies it natively (CUDA GPUs with bf16, CPUs with AVX-512 BF16 or AMX), float32
    elsewhere (a CPU without bf16 units multiplies bf16 several times slower than fp32)."""

    def __post_init__(self) -> None:
        _choice("quant.mode", self.mode, ("nf4", "fp4", "int8", "none"))
        _choice(
            "quant.compute_dtype", self.compute_dtype, ("auto", "bfloat16", "float16", "float32")
        )


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class ColumnsConfig:
    """Where each field lives in the dataset (e.g. `data.columns.prompt=question`)."""

    prompt: str = "prompt"
    """Prompt column (string, or list of messages)."""
    completion: str = "completion"
    """Response column for SFT (string, or list of messages)."""
    chosen: str = "chosen"
    """Preferred response (string, list of messages, or an Anthropic-HH style transcript)."""
    rejected: str = "rejected"
    """Dispreferred response (same forms as chosen)."""
    messages: str = "messages"
    """Conversation column: a list of {role, content} messages."""
    responses: str = "responses"
    """Ranked responses, best first (K >= 2), for rm/dpo with Plackett-Luce."""
    text: str = "text"
    """Plain text column (language modelling on the whole text)."""
    margin: str = "margin"
    """Optional per-pair margin for the reward model."""
    label: str = "label"
    """Unpaired feedback (kto): true for a desirable completion, false for an undesirable one."""
    seed: str = "seed"
    """A row that only seeds an environment (online stages with stage.env): its reset() writes
    the first message; the members of a group share the row, so their seed."""


@dataclass
class ReasoningGymConfig:
    """The rows of data.path=reasoning_gym:TASK[+TASK...] (the reasoning-gym extra)."""

    size: int = 1000
    """Rows to generate (a mixture draws each row's task by the weights)."""
    seed: int = 0
    """The generators' seed: the same seed gives the same rows."""
    weights: list[float] | None = None
    """A mixture's weight per task, in the order of data.path (null: equal weights)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Each task's generator settings, e.g. +data.reasoning_gym.config.leg_counting.max_animals=5."""

    def __post_init__(self) -> None:
        _check(self.size >= 1, f"data.reasoning_gym.size must be >= 1, got {self.size}")
        _check(
            all(w > 0 for w in self.weights or []),
            f"data.reasoning_gym.weights must be positive, got {self.weights}",
        )


@dataclass
class DataConfig:
    path: str = "builtin:sft"
    """A local .jsonl/.json/.csv/.parquet file, a hub dataset name, builtin:<name> (shipped),
    reasoning_gym:TASK[+TASK...] (rows generated by reasoning-gym, with answer and metadata), or
    episodes:N (N rows {seed: 0..N-1} for an environment that writes its own first message)."""
    name: str | None = None
    """Hub dataset configuration name (the second argument of datasets.load_dataset)."""
    split: str = "train"
    """Split to train on (hub datasets; for local files `train` is the whole file)."""
    eval_path: str | None = None
    """Separate evaluation data (same forms as path); null = hold out eval_size of path."""
    eval_split: str | None = None
    """Split of eval_path (or of path) to evaluate on."""
    eval_size: float = 0.0
    """Held out for evaluation when no eval data is named: a fraction (<1) or a row count (>=1)."""
    format: str = "auto"
    """auto, prompt_completion, messages, preference, ranked, hh, text, unpaired (prompt,
    completion, label) or seed (rows that seed an environment); auto detects it."""
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    """Column mapping."""
    max_length: int = 512
    """Longest prompt+response in tokens; longer responses are truncated on the right."""
    max_prompt_length: int = 256
    """Longest prompt in tokens; longer prompts are truncated on the left (their end is kept)."""
    max_samples: int | None = None
    """Use only the first N rows (after loading, before shuffling)."""
    on_bad_row: str = "drop"
    """What to do with an empty or malformed row: drop (and count it) or error."""
    group_by_length: bool = False
    """Batch examples of similar length together (offline stages): each epoch's shuffled order
    is cut into chunks of 50 steps, each chunk sorted by length (longest first), so a
    micro-batch pads little; the step order stays seeded (exact resume). Steps then differ in
    length: the first steps of a chunk hold its longest examples."""
    reasoning_gym: ReasoningGymConfig = field(default_factory=ReasoningGymConfig)
    """The generated rows of data.path=reasoning_gym:... (size, seed, weights, config)."""

    def __post_init__(self) -> None:
        _check(bool(self.path), "data.path is empty: name a file, a hub dataset or builtin:sft")
        _choice(
            "data.format",
            self.format,
            (
                "auto",
                "prompt_completion",
                "messages",
                "preference",
                "ranked",
                "hh",
                "text",
                "unpaired",
                "seed",
            ),
        )
        _check(self.max_length >= 2, f"data.max_length must be >= 2, got {self.max_length}")
        _check(
            self.max_prompt_length >= 1,
            f"data.max_prompt_length must be >= 1, got {self.max_prompt_length}",
        )
        _check(
            self.max_length > self.max_prompt_length,
            f"data.max_length={self.max_length} must be greater than "
            f"data.max_prompt_length={self.max_prompt_length}: raise data.max_length "
            "or lower data.max_prompt_length",
        )
        _non_negative("data.eval_size", self.eval_size)
        _check(
            self.eval_size < 1 or float(self.eval_size).is_integer(),
            f"data.eval_size={self.eval_size}: use a fraction below 1 or a whole row count",
        )
        _check(
            self.max_samples is None or self.max_samples >= 1,
            f"data.max_samples must be >= 1 or null, got {self.max_samples}",
        )
        _choice("data.on_bad_row", self.on_bad_row, ("drop", "error"))


# ---------------------------------------------------------------------------------------------
# optimisation and the loop


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw (torch, fused/foreach where available), adamw8bit or paged_adamw8bit (bitsandbytes)."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas [beta1, beta2]."""
    eps: float = 1e-8
    """Adam epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    scheduler: str = "cosine"
    """Learning-rate schedule after warmup: cosine, linear or constant."""
    warmup_steps: int = 0
    """Linear warmup steps (takes precedence over warmup_ratio when > 0)."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the total steps."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of lr (cosine and linear)."""

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ("adamw", "adamw8bit", "paged_adamw8bit"))
        _positive("optim.lr", self.lr)
        _non_negative("optim.weight_decay", self.weight_decay)
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}",
        )
        _positive("optim.eps", self.eps)
        _non_negative("optim.max_grad_norm", self.max_grad_norm)
        _choice("optim.scheduler", self.scheduler, ("cosine", "linear", "constant"))
        _non_negative("optim.warmup_steps", self.warmup_steps)
        _check(
            0 <= self.warmup_ratio < 1,
            f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}",
        )
        _check(
            0 <= self.min_lr_ratio <= 1,
            f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}",
        )


def stop_rule(train: TrainConfig) -> tuple[bool, str, str, float] | None:
    """train.stop_metric with stop_above / stop_below -> (an eval figure?, metric, ">=" or
    "<=", target), or None."""
    if not train.stop_metric:
        return None
    metric = train.stop_metric
    on_eval = metric.startswith("eval/")
    if train.stop_above is not None:
        return on_eval, metric.removeprefix("eval/"), ">=", float(train.stop_above)
    return on_eval, metric.removeprefix("eval/"), "<=", float(train.stop_below)


def rule_met(rule: tuple[bool, str, str, float], figures: dict) -> float | None:
    """The metric's value when the rule holds for these figures, else None."""
    _, metric, op, target = rule
    value = figures.get(metric)
    if not isinstance(value, int | float):
        return None
    return float(value) if (value >= target if op == ">=" else value <= target) else None


@dataclass
class TrainConfig:
    max_steps: int = 60
    """Optimizer steps to run (each = micro_batch_size x grad_accum examples)."""
    epochs: float | None = None
    """If set, run this many passes over the data instead of max_steps."""
    micro_batch_size: int = 8
    """Examples per forward/backward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is the exact big-batch loss."""
    eval_every: int = 0
    """Evaluate every N steps (and at the end); 0 = only at the end, if there is eval data."""
    eval_on_start: bool = False
    """Also evaluate before the first step (logged as step 0): the starting policy's figures."""
    eval_batches: int | None = None
    """Cap on eval micro-batches per evaluation; null = the whole eval set."""
    eval_n: int | None = None
    """Online stages: responses sampled per eval prompt (null: stage.group_size). When set, the
    eval also logs pass@k for k = 1, 2, 4, ... n (Chen et al.'s unbiased estimator; `score` is
    mean@n), and both per task when the rows have a `task` column (reasoning_gym mixtures)."""
    eval_pass_score: float = 1.0
    """Online stages: the score at or above which a sampled response passes (for pass@k)."""
    stop_metric: str | None = None
    """End the run early once this metric reaches train.stop_above (or falls to
    train.stop_below): eval/pass@1 (an evaluation's figure) or score, loss (a training step's).
    Checked after every step and evaluation; the run is then saved and summarised as done."""
    stop_above: float | None = None
    """With train.stop_metric: stop once it is >= this."""
    stop_below: float | None = None
    """With train.stop_metric: stop once it is <= this."""
    log_every: int = 1
    """Write metrics every N steps."""
    save_every: int = 50
    """Write a checkpoint every N steps (and always at the end); 0 = only at the end."""
    keep_last: int = 2
    """How many step checkpoints to keep (older ones are deleted)."""
    seed: int = 42
    """Seed for initialisation, data order and dropout."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU), bf16 (autocast on any device) or fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% slower."""
    shared_prompt: bool = True
    """rm/dpo: run each prompt once for all its responses (they attend to its KV cache) instead
    of once per response; same numbers, fewer tokens. Off under gradient checkpointing."""
    pad_to_multiple_of: int = 8
    """Pad each batch to its longest row rounded up to a multiple of this (1 = the longest row).
    Fewer distinct shapes: CPU bf16 kernels (oneDNN) compile and keep one kernel per shape, and
    memory grew with every new length (1.19 -> 0.74 GB peak on the small benchmark model);
    GPU tensor cores prefer multiples of 8. Padding is masked: the numbers do not change."""
    packing: bool = False
    """Pack each micro-batch's examples into rows of up to data.max_length tokens (best fit
    decreasing; a preference pair stays in one row) instead of padding every example to the
    longest: attention stays within each example (position ids restart per example), the loss
    and every log-prob are the unpacked ones, so only the padding's compute goes. sft, rm, dpo
    (and its variants), kto and rs, and the online stages' log-prob and update passes; it
    replaces the train.shared_prompt layout."""
    packing_attention: str = "varlen"
    """How packed rows keep each example to itself: varlen (one forward over the rows whose
    attention runs SDPA on each example alone: no mask, no attention work across examples; a
    model on flash-attention keeps its own varlen kernel), mask (one forward over the rows with
    the block-diagonal mask transformers builds from their position ids) or slices (one
    forward per example: no mask, but small matmuls; not under FSDP). varlen was the fastest
    on a CPU (docs/packing.md)."""
    max_nonfinite: int = 5
    """Stop with an error after this many consecutive steps with a non-finite loss or gradient."""
    shuffle: bool = True
    """Shuffle the training data every epoch (deterministically from seed)."""

    def __post_init__(self) -> None:
        _check(self.max_steps >= 1, f"train.max_steps must be >= 1, got {self.max_steps}")
        _check(
            self.epochs is None or self.epochs > 0,
            f"train.epochs must be > 0 or null, got {self.epochs}",
        )
        _check(
            self.micro_batch_size >= 1,
            f"train.micro_batch_size must be >= 1, got {self.micro_batch_size}",
        )
        _check(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _non_negative("train.eval_every", self.eval_every)
        _check(
            not self.stop_metric or (self.stop_above is None) != (self.stop_below is None),
            f"train.stop_metric={self.stop_metric} needs one target: train.stop_above=<value> "
            "(a score, pass@k) or train.stop_below=<value> (a loss)",
        )
        _check(
            bool(self.stop_metric) or (self.stop_above is None and self.stop_below is None),
            "train.stop_above / train.stop_below need train.stop_metric=<metric> "
            "(e.g. eval/pass@1, score, loss)",
        )
        _check(
            self.stop_metric is None or self.stop_metric.removeprefix("eval/") != "",
            "train.stop_metric=eval/ names no metric: e.g. eval/pass@1",
        )
        _check(
            self.eval_n is None or self.eval_n >= 1,
            f"train.eval_n must be >= 1 (or null for stage.group_size), got {self.eval_n}",
        )
        _check(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _non_negative("train.save_every", self.save_every)
        _check(self.keep_last >= 1, f"train.keep_last must be >= 1, got {self.keep_last}")
        _choice("train.precision", self.precision, ("auto", "bf16", "fp32"))
        _choice("train.packing_attention", self.packing_attention, ("mask", "varlen", "slices"))
        _check(
            self.pad_to_multiple_of >= 1,
            f"train.pad_to_multiple_of must be >= 1 (1 = no rounding), got {self.pad_to_multiple_of}",
        )
        _check(
            self.max_nonfinite >= 1, f"train.max_nonfinite must be >= 1, got {self.max_nonfinite}"
        )


@dataclass
class LogConfig:
    """Experiment tracking besides metrics.jsonl (which is always written): TensorBoard event
    files in the run directory and Weights & Biases, from rank 0 only."""

    tensorboard: bool = False
    """Write TensorBoard event files into <run_dir>/tensorboard (needs the tensorboard package:
    pip install 'rlhf-cli[tensorboard]'); `tensorboard --logdir runs` shows every run."""
    wandb: bool = False
    """Log to Weights & Biases (needs wandb: pip install 'rlhf-cli[wandb]'); resume= continues
    the same W&B run."""
    project: str = "rlhf-cli"
    """The W&B project."""
    name: str | None = None
    """The W&B run name; null = the run directory's path."""
    tags: list[str] = field(default_factory=list)
    """W&B tags (the stage is always one): log.tags=[baseline,lr-sweep]."""
    wandb_mode: str | None = None
    """online, offline (files in <run_dir>/wandb, `wandb sync` later) or disabled; null =
    wandb's own choice (the WANDB_MODE variable, else online)."""
    samples: int = 4
    """Online stages: how many prompt/response/reward rows of each logged step go to TensorBoard
    and W&B as text (0 = none)."""

    def __post_init__(self) -> None:
        if self.wandb_mode is not None:
            _choice("log.wandb_mode", self.wandb_mode, ("online", "offline", "disabled"))
        _non_negative("log.samples", self.samples)


@dataclass
class Config:
    stage: StageConfig = MISSING
    """The training stage (a config group: stage=sft)."""
    model: ModelConfig = MISSING
    """The model to train (a config group: model=tiny, model=llama2-7b, ...)."""
    data: DataConfig = MISSING
    """The data (a config group; override fields like data.path=my.jsonl)."""
    peft: PeftConfig = MISSING
    """Adapters (a config group: peft=lora or peft=full)."""
    quant: QuantConfig = MISSING
    """Base quantization (a config group: quant=nf4, quant=int8, quant=none)."""
    optim: OptimConfig = MISSING
    """Optimizer and schedule (a config group: optim=adamw, optim=adamw8bit)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    ref: RefConfig = field(default_factory=RefConfig)
    """The frozen reference policy (dpo, ppo, grpo, rloo)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """The reward of the online stages (ppo, grpo, rloo) and of rejection sampling (rs)."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Multi-process training under torchrun."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """The generation engine of the online stages and rs (rollout.engine=hf or vllm)."""
    log: LogConfig = field(default_factory=LogConfig)
    """Experiment tracking: TensorBoard and Weights & Biases (metrics.jsonl is always written)."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N."""
    run_dir: str = MISSING
    """Where the run writes config.yaml, metrics.jsonl, checkpoints/ and final/."""
    resume: str | None = None
    """null (start fresh), auto (the newest whole checkpoint of run_dir; for a default
    timestamped run_dir, of the latest run of this stage), or a checkpoint / run directory
    (another run's is forked into run_dir)."""
    resume_force: bool = False
    """Resume although the config (beyond max_steps, epochs, logging and saving), the model's
    weights or the training data changed since the checkpoint; the optimizer then takes the new
    optim.* values."""

    def __post_init__(self) -> None:
        _check(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            f"device={self.device!r} is not one of: auto, cpu, cuda, cuda:N",
        )
        _check(
            not (self.peft.method == "full" and self.quant.mode != "none"),
            f"peft=full cannot train a quantized base (quant.mode={self.quant.mode}): "
            "add quant=none",
        )
        if self.dist.strategy == "fsdp":
            self._check_fsdp()
        if self.rollout.engine == "vllm":
            self._check_vllm()
        if isinstance(self.stage, KtoConfig):
            _check(
                self.train.micro_batch_size * self.train.grad_accum >= 2,
                "stage=kto estimates its reference point from mismatched pairs of each step "
                "(prompt i with completion i+1): a step of one example would pair it with "
                "itself; set train.micro_batch_size or train.grad_accum so a step has >= 2",
            )
        if isinstance(self.stage, DpoConfig) and self.stage.loss_type in REFERENCE_FREE:
            _check(
                not self.ref.precompute and not self.ref.model,
                f"stage.loss_type={self.stage.loss_type} uses no reference model: drop "
                "ref.precompute / ref.model",
            )
        if isinstance(self.stage, SamplingConfig):
            self._check_reward()
        _check(
            not (self.peft.method == "full" and self.model.adapter),
            "model.adapter is a LoRA adapter but peft=full: use peft=lora or drop model.adapter",
        )

    def _check_fsdp(self) -> None:
        """What dist.strategy=fsdp cannot shard or run."""
        _check(
            self.train.packing_attention != "slices",
            "train.packing_attention=slices runs a forward per example, and FSDP gathers "
            "the weights in every forward (the ranks would wait on each other): use "
            "train.packing_attention=varlen or mask with dist.strategy=fsdp",
        )
        _check(
            self.quant.mode != "int8",
            "dist.strategy=fsdp shards a 4-bit (quant=nf4, fp4) or unquantized (quant=none) "
            "base; bitsandbytes' 8-bit weights lose their scales when sharded: use quant=nf4, "
            "or dist.strategy=ddp with quant=int8",
        )
        _check(
            not self.optim.name.endswith("adamw8bit"),
            f"optim={self.optim.name} cannot step FSDP's sharded parameters (bitsandbytes' 8-bit "
            "update has no rule for DTensors): use optim=adamw with dist.strategy=fsdp (it "
            "shards the optimizer state already), or dist.strategy=ddp",
        )
        _check(
            not getattr(self.stage, "multi_turn", False),
            "dist.strategy=fsdp gathers the weights for every generated token, so the ranks "
            "must generate in step; conversations of several turns end after different "
            "numbers of replies on each rank: run stage.multi_turn with dist.strategy=ddp",
        )

    def _check_vllm(self) -> None:
        """rollout.engine=vllm: a stage that samples, not under FSDP."""
        _check(
            isinstance(self.stage, SamplingConfig),
            f"rollout.engine=vllm: stage={self.stage.name} does not sample (the online "
            "stages ppo, grpo, rloo, reinforce and rs do): drop rollout.engine",
        )
        _check(
            self.dist.strategy != "fsdp",
            "rollout.engine=vllm loads the merged policy into each rank's engine, which a "
            "sharded (FSDP) policy cannot give without gathering it whole: use "
            "dist.strategy=ddp with rollout.engine=vllm, or rollout.engine=hf with fsdp",
        )

    def _check_reward(self) -> None:
        """A sampling stage's reward: one given, functions named module:function, a weight per
        term."""
        r = self.reward
        _check(
            not (r.fn and r.fns),
            "reward.fn and reward.fns both set: put every function in reward.fns",
        )
        _check(
            bool(r.model or r.fn or r.fns or getattr(self.stage, "env", None)),
            f"stage={self.stage.name} needs a reward: reward.model=<rm run>, "
            "reward.fn=package.module:function, reward.fns=[...] or stage.env",
        )
        for spec in [r.fn] if r.fn else r.fns:
            key = "reward.fn" if r.fn else "reward.fns"
            _check(
                isinstance(spec, str) and ":" in spec,
                f"{key}: {spec!r} must look like package.module:function",
            )
        terms = len(r.fns) + bool(r.fn) + bool(r.model)
        _check(
            not r.weights or len(r.weights) == terms,
            f"reward.weights has {len(r.weights)} values for {terms} reward terms (the "
            "functions, then reward.model): give one per term, or none for 1 each",
        )


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore; the YAML groups extend them by name."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="stage", name="sft_schema", node=SftConfig)
    cs.store(group="stage", name="rm_schema", node=RmConfig)
    cs.store(group="stage", name="dpo_schema", node=DpoConfig)
    cs.store(group="stage", name="kto_schema", node=KtoConfig)
    cs.store(group="stage", name="ppo_schema", node=PpoConfig)
    cs.store(group="stage", name="grpo_schema", node=GrpoConfig)
    cs.store(group="stage", name="rloo_schema", node=RlooConfig)
    cs.store(group="stage", name="reinforce_schema", node=ReinforceConfig)
    cs.store(group="stage", name="rs_schema", node=RsConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="peft", name="peft_schema", node=PeftConfig)
    cs.store(group="quant", name="quant_schema", node=QuantConfig)
    cs.store(group="optim", name="optim_schema", node=OptimConfig)


STAGE_SCHEMAS: dict[str, type[StageConfig]] = {
    "sft": SftConfig,
    "rm": RmConfig,
    "dpo": DpoConfig,
    "kto": KtoConfig,
    "ppo": PpoConfig,
    "grpo": GrpoConfig,
    "rloo": RlooConfig,
    "reinforce": ReinforceConfig,
    "rs": RsConfig,
}
GROUP_SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "peft": PeftConfig,
    "quant": QuantConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "ref": RefConfig,
    "reward": RewardConfig,
    "dist": DistConfig,
    "log": LogConfig,
}


_REMOTE_CODE = {"allowed": False}


def allow_remote_code(allowed: bool) -> None:
    """Whether models named by saved configs (runs given to sample/eval/merge/score,
    reward.model, ref=) may run their repository's code: only when the command line says so
    (model.trust_remote_code=true for train, trust_remote_code=true for the other commands),
    never because a run's config.yaml says so."""
    _REMOTE_CODE["allowed"] = bool(allowed)


def remote_code_allowed() -> bool:
    return _REMOTE_CODE["allowed"]


def load_saved_config(path) -> Config:
    """The Config a run saved (its config.yaml), validated against today's schemas; its
    model.trust_remote_code is the command line's (allow_remote_code), not the file's."""
    from omegaconf import OmegaConf

    try:
        saved = OmegaConf.load(path)
        if not isinstance(saved, DictConfig):
            raise ValueError("not a YAML mapping")
        saved.pop("hydra", None)
        name = saved.get("stage", {}).get("name")
        if name not in STAGE_SCHEMAS:
            raise ConfigError(
                f"{path}: stage.name={name!r} is not one of {', '.join(STAGE_SCHEMAS)}"
            )
        schema = OmegaConf.structured(Config)
        schema.stage = OmegaConf.structured(STAGE_SCHEMAS[name])
        cfg: Config = OmegaConf.to_object(OmegaConf.merge(schema, saved))  # type: ignore[assignment]
    except ConfigError:
        raise
    except Exception as err:  # YAML or schema errors: the file is damaged or from elsewhere
        first = first_line(err)
        raise ConfigError(
            f"{path}: not a config this version of rlhf-cli can read ({first}); was it edited "
            "by hand or written by another version?"
        ) from err
    cfg.model.trust_remote_code = remote_code_allowed()
    return cfg


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (and its bases), for --help."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not is_dataclass(klass):
            continue
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type, prefix: str) -> list[tuple[str, Any, str]]:
    """(key, default, doc) rows for every field of a schema, nested dataclasses flattened."""
    rows = []
    docs = field_docs(cls)
    for f in fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if is_dataclass(f.type if isinstance(f.type, type) else None):
            rows += describe(f.type, key)
            continue
        default = f.default
        if f.default_factory is not field().default_factory:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        if is_dataclass(default):
            rows += describe(type(default), key)
            continue
        rows.append((key, "???" if default is MISSING else default, docs.get(f.name, "")))
    return rows


def config_dir() -> Path:
    """conf/ next to the package in a source checkout, rlhf_cli/conf inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no conf/config.yaml next to {here}: is the install complete?")
