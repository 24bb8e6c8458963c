"""Every loss and estimator the stages use, as pure functions on tensors.

Nothing here knows about models, trainers or configs: each function takes tensors and
returns tensors (per example where that makes sense, so the caller chooses the
reduction and the metrics). Equations follow ``ALGORITHMS.md``; notation: ``h`` is the
DPO log-ratio margin, ``beta`` the KL strength, ``A`` an advantage, ``R`` a return.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# Tokens per logsumexp chunk: bounds the float32 temporaries to CHUNK_TOKENS x vocab.
CHUNK_TOKENS = 256


# --------------------------------------------------------------------------- log-probs


def _chunk_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(label) = logit[label] - logsumexp(logits), in float32 for one chunk."""
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_logps(
    logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Per-token log-probabilities of the label tokens.

    ``logits`` (B, T, V) and ``labels`` (B, T) are aligned with ``input_ids``; position
    t predicts token t+1, so ``logits[:, :-1]`` is scored against ``labels[:, 1:]``.
    ``log p(y_t) = z[y_t] - logsumexp(z)``, computed chunk by chunk (upcast to float32
    per chunk) so no full log-softmax copy of the logits is ever made. For low-precision
    logits that need a gradient, each chunk is recomputed in backward instead of keeping
    its float32 copy alive.

    Returns ``(logps, mask)``, both (B, T-1): float32 log-probs with 0 where the label
    is ``ignore_index``, and the boolean mask of scored positions.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ")
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    safe_labels = labels.masked_fill(~mask, 0)  # ignore_index would break gather
    recompute = logits.requires_grad and logits.dtype != torch.float32
    rows = []
    for b in range(logits.shape[0]):
        pieces = [logits.new_zeros(0, dtype=torch.float32)]
        for start in range(0, logits.shape[1], CHUNK_TOKENS):
            x = logits[b, start : start + CHUNK_TOKENS]
            y = safe_labels[b, start : start + CHUNK_TOKENS]
            if recompute:
                pieces.append(checkpoint(_chunk_logps, x, y, use_reentrant=False))
            else:
                pieces.append(_chunk_logps(x, y))
        rows.append(torch.cat(pieces))
    logps = torch.stack(rows) if rows else logits.new_zeros(labels.shape, dtype=torch.float32)
    return torch.where(mask, logps, 0.0), mask


def sequence_logps(
    logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, average: bool = False
) -> Tensor:
    """``logp(y|x) = sum_t log p(y_t | x, y_<t)`` over the label tokens, shape (B,).

    With ``average=True`` the sum is divided by the number of label tokens (the
    length-normalised log-prob used by IPO and the RPO NLL term).
    """
    logps, mask = token_logps(logits, labels, ignore_index)
    total = logps.sum(-1)
    if average:
        total = total / mask.sum(-1).clamp(min=1)
    return total


def nll_sum(
    logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """SFT: ``(-sum_t log p(y_t), n_tokens)`` over every label token of the batch.

    Returning the sum and the count (int64) separately lets the training loop divide
    by the token count of the whole accumulated (or data-parallel) batch, which gives
    exactly the big-batch mean; a mean of per-micro-batch means would not.
    """
    logps, mask = token_logps(logits, labels, ignore_index)
    return -logps.sum(), mask.sum()


# --------------------------------------------------------------------------- DPO


def _dpo_sigmoid(h: Tensor, beta: float, eps: float) -> Tensor:
    """DPO / cDPO: ``-(1-eps) log sigma(beta*h) - eps log sigma(-beta*h)``."""
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def _dpo_ipo(h: Tensor, beta: float, eps: float) -> Tensor:
    """IPO: ``(h - 1/(2*beta))^2``; meant for length-normalised log-probs."""
    return (h - 1 / (2 * beta)) ** 2


def _dpo_hinge(h: Tensor, beta: float, eps: float) -> Tensor:
    """Hinge (RSO / SLiC): ``max(0, 1 - beta*h)``."""
    return torch.relu(1 - beta * h)


DPO_LOSSES: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "sigmoid": _dpo_sigmoid,
    "ipo": _dpo_ipo,
    "hinge": _dpo_hinge,
}


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference loss on ``h = (pi_w - ref_w) - (pi_l - ref_l)`` (all (B,)).

    ``loss_type`` picks the variant from ``DPO_LOSSES`` (sigmoid, ipo, hinge); the
    sigmoid loss with ``label_smoothing = eps > 0`` is cDPO. With pi == pi_ref the
    sigmoid loss is log 2. Returns ``(losses, chosen_rewards, rejected_rewards)``, the
    rewards being the detached implicit rewards ``r_hat = beta * (logp_pi - logp_ref)``.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {sorted(DPO_LOSSES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing only applies to loss_type 'sigmoid', not {loss_type!r}")
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    losses = DPO_LOSSES[loss_type](chosen_logratio - rejected_logratio, beta, label_smoothing)
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate everywhere (Maechler 2012): log(-expm1(x)) near 0,
    log1p(-exp(x)) far from it.

    Each branch gets only inputs where it is finite: torch.where takes the gradient of both
    branches, and a branch that is inf where it is not selected makes 0 * inf = NaN. Near 0 the
    input is capped at -tiny (the smallest normal float of the dtype), so x = 0 gives
    log(tiny) (-87.3 in float32) with gradient 0 instead of -inf: an ORPO mean log-prob of
    exactly 0 (a confident model) leaves a finite loss and gradient."""
    near = x > -math.log(2)
    tiny = torch.finfo(x.dtype).tiny
    near_zero = torch.log(-torch.expm1(torch.where(near, x.clamp(max=-tiny), -1.0)))
    far = torch.log1p(-torch.exp(torch.where(near, -1.0, x)))
    return torch.where(near, near_zero, far)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """Per-example KTO loss (Ethayarajh et al. 2024) on unpaired completions, all (B,).

    ``r = logp_pi - logp_ref``; ``kl`` is the reference point z0 (detached here, clamped at 0),
    which the stage estimates from mismatched prompt/completion pairs. Desirable:
    ``w_d * (1 - sigmoid(beta * (r - z0)))``; undesirable: ``w_u * (1 - sigmoid(beta * (z0 - r)))``.
    With pi == pi_ref and z0 = 0 every loss is w / 2.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    z0 = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device)
    z0 = z0.detach().clamp(min=0)
    r = policy_logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(desirable.bool(), good, bad)


def orpo_loss(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, *, lam: float) -> Tensor:
    """Per-pair odds-ratio term of ORPO (Hong et al. 2024), ``lam * -log sigmoid(log_odds)``,
    with ``log_odds = (c - r) - (log(1 - e^c) - log(1 - e^r))`` on mean log-probs per response
    token (c, r <= 0). The stage adds the NLL of the chosen response. No reference model."""
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (
        log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps)
    )
    return -lam * F.logsigmoid(log_odds)


def simpo_loss(
    chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, *, beta: float, gamma: float
) -> Tensor:
    """Per-pair SimPO loss (Meng et al. 2024): ``-log sigmoid(beta * (c - r) - gamma)`` on mean
    log-probs per response token; ``gamma`` is a target reward margin. No reference model."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return -F.logsigmoid(beta * (chosen_avg_logps - rejected_avg_logps) - gamma)


# --------------------------------------------------------------------------- reward model


def reward_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: Tensor | None = None,
    center_coef: float = 0.0,
) -> Tensor:
    """Bradley-Terry loss per pair: ``-log sigma(r_w - r_l - m) + c * (r_w + r_l)^2``.

    ``margin`` (B,) is the optional per-pair margin ``m`` (Llama 2); ``center_coef`` is
    ``c``, the centering term that keeps rewards near zero. Returns (B,).
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return losses


def plackett_luce_loss(scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """Plackett-Luce ranking loss ``-sum_{k=1..K-1} [s_k - logsumexp(s_k, ..., s_K)]``.

    ``scores`` (B, K) are ordered best first; K = 2 is Bradley-Terry. For rankings of
    different lengths pass ``mask`` (B, K), True on valid entries, valid entries first.
    The k = K term is always 0, so summing it too changes nothing. Returns (B,).
    """
    scores = scores.float()
    if mask is not None:
        # A very negative (finite, so gradients stay finite) score drops out of logsumexp.
        scores = scores.masked_fill(~mask.bool(), torch.finfo(scores.dtype).min)
    suffix_lse = torch.logcumsumexp(scores.flip(-1), dim=-1).flip(-1)
    terms = scores - suffix_lse
    if mask is not None:
        terms = torch.where(mask.bool(), terms, 0.0)
    return -terms.sum(-1)


# --------------------------------------------------------------------------- online RL


def _kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return logp - ref_logp


def _kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return 0.5 * (logp - ref_logp) ** 2


def _kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - 1 - log_ratio


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": _kl_k1,
    "k2": _kl_k2,
    "k3": _kl_k3,
}


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3).

    k1 = ``logp - ref_logp`` (unbiased, can be negative); k2 = ``0.5 (logp - ref_logp)^2``
    (biased, >= 0); k3 = ``exp(r) - 1 - r`` with ``r = ref_logp - logp`` (unbiased, >= 0,
    the GRPO loss term). All are 0 where the two log-probs agree.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logp, ref_logp)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where the 0/1 ``mask`` is set (0 if none are).

    Masked entries are excluded with ``where``, so NaN/inf there cannot leak in.
    """
    keep = mask.bool()
    total = torch.where(keep, x, 0.0)
    count = keep.sum() if dim is None else keep.sum(dim)
    total = total.sum() if dim is None else total.sum(dim)
    return total / count.clamp(min=1)


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` with mean and (biased) variance over the mask.

    ``shift_mean=False`` adds the mean back (scale only), as PPO does for rewards.
    Positions outside the mask are set to 0. ``all_reduce`` (a sum over processes) makes the
    moments those of every rank's batch together, so N ranks whiten as one process would.
    """
    keep = mask.bool()
    values = torch.where(keep, x, 0.0).double()
    moments = torch.stack([keep.sum().double(), values.sum(), (values**2).sum()])
    if all_reduce is not None:
        moments = all_reduce(moments)
    count = moments[0].clamp(min=1)
    mean = moments[1] / count
    var = (moments[2] / count - mean**2).clamp(min=0)
    whitened = (x.double() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(keep, whitened.to(x.dtype), 0.0)


@torch.no_grad()
def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the valid tokens of (B, T) tensors.

    ``delta_t = r_t + gamma V_{t+1} - V_t``; ``A_t = delta_t + gamma lam A_{t+1}``;
    ``returns = A + V``. ``V_{t+1}`` and ``A_{t+1}`` are those of the next *valid*
    token, both 0 after the last one; masked positions are skipped (advantage 0).
    Computed without gradient: these are targets.
    """
    keep = mask.bool()
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        next_value = torch.where(keep[:, t], values[:, t], next_value)
        next_adv = torch.where(keep[:, t], adv, next_adv)
        advantages[:, t] = torch.where(keep[:, t], adv, 0.0)
    return advantages, advantages + values


def _grpo_advantages(r: Tensor, eps: float) -> Tensor:
    # torch.std is the unbiased (n - 1) estimator, as in the GRPO reference code.
    return (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + eps)


def _rloo_advantages(r: Tensor, eps: float) -> Tensor:
    k = r.shape[-1]
    leave_one_out_mean = (r.sum(-1, keepdim=True) - r) / (k - 1)
    return r - leave_one_out_mean


def _mean_baseline_advantages(r: Tensor, eps: float) -> Tensor:
    # Dr. GRPO (Liu et al. 2025): the group mean as baseline, no division by the std.
    return r - r.mean(-1, keepdim=True)


GROUP_ADVANTAGES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "grpo": _grpo_advantages,
    "rloo": _rloo_advantages,
    "mean": _mean_baseline_advantages,
}


def group_advantages(
    rewards: Tensor, group_size: int, kind: str = "grpo", eps: float = 1e-4
) -> Tensor:
    """Group-baseline advantages for (N*K,) rewards laid out group by group.

    GRPO: ``A_i = (R_i - mean(R)) / (std(R) + eps)`` with the unbiased (n - 1) std of
    the group (``torch.std`` default). RLOO: ``A_i = R_i - mean_{j != i} R_j``.
    Returns (N*K,).
    """
    if kind not in GROUP_ADVANTAGES:
        raise ValueError(f"unknown kind {kind!r}; choose one of {sorted(GROUP_ADVANTAGES)}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(
            f"group_size must be >= 2 and divide the {rewards.numel()} rewards, got {group_size}"
        )
    grouped = rewards.reshape(-1, group_size)
    return GROUP_ADVANTAGES[kind](grouped, eps).reshape(rewards.shape)


def policy_token_losses(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
    importance_level: str = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO clipped surrogate ``max(-A ratio, -A clip(ratio, 1-eps, 1+eps_high))``.

    ``ratio = exp(logp - old_logp)`` per token, or with ``importance_level="sequence"``
    (GSPO, Zheng et al. 2025) one ratio per response, ``exp`` of the mean token log-ratio
    over the mask, clipped per response (its gradient reaches every token). ``clip_eps_high``
    (DAPO's clip-higher) defaults to ``clip_eps``. ``advantages`` is per token (B, T) or per
    sequence (B,). Returns ``(losses (B, T), stats)``: aggregate the losses with
    ``aggregate_loss``. Stats (detached, means over the mask): ``clipfrac`` (share of tokens
    whose clipped term is active, i.e. gets no gradient) and ``approx_kl``
    (``0.5 (logp - old_logp)^2`` per token).
    """
    if importance_level not in ("token", "sequence"):
        raise ValueError(f"importance_level must be token or sequence, got {importance_level!r}")
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    token_log_ratio = logp - old_logp.detach()
    log_ratio = token_log_ratio
    if importance_level == "sequence":
        log_ratio = masked_mean(token_log_ratio, mask, dim=-1).unsqueeze(-1).expand_as(logp)
    ratio = torch.exp(log_ratio)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + high)
    losses = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * token_log_ratio**2, mask),
        }
    return losses, stats


LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_sum_norm")


def tis_weights(
    old_logps: Tensor, engine_logps: Tensor, mask: Tensor, cap: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance sampling (TIS; verl's `tis_imp_ratio_cap`, TRL's
    `vllm_importance_sampling_cap`): the tokens were sampled by a rollout engine whose
    log-probs (`engine_logps`, mu) differ slightly from the trainer's (`old_logps`, pi_old) of
    the same policy; the policy loss of each token is weighted by

        w = min(pi_old / mu, cap) = min(exp(old_logps - engine_logps), cap)

    (no gradient: both are fixed numbers of the rollout). Returns (B, R) weights (1 outside
    `mask`) and the mismatch's statistics over the masked tokens: |old - engine| mean and max,
    and the share of tokens whose ratio the cap truncated."""
    keep = mask.bool()
    diff = (old_logps - engine_logps).detach().float()
    ratio = torch.exp(diff)
    weights = torch.where(keep, ratio.clamp(max=cap), 1.0)
    gap = torch.where(keep, diff.abs(), 0.0)
    stats = {
        "logprob_diff_mean": masked_mean(diff.abs(), keep),
        "logprob_diff_max": gap.max() if gap.numel() else gap.sum(),
        "tis_clipped": masked_mean((ratio > cap).float(), keep),
        "tis_weight_mean": masked_mean(weights, keep),
    }
    return weights, stats


def truncated_logps(
    logits: Tensor, tokens: Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> Tensor:
    """log-probs of `tokens` under the distribution a vLLM engine samples from when it truncates:
    `logits` (..., V) already divided by the temperature, then, in vLLM's order, min_p (drop the
    tokens whose probability is below min_p x the likeliest one's), top_k (keep the k largest
    logits, ties at the k-th kept), top_p (drop the least likely tokens while their cumulative
    probability stays <= 1 - top_p; the likeliest is always kept), renormalised over what is
    left. This is what vLLM's `processed_logprobs` report for a sampled token, so the ratio of
    the two compares like with like (TIS under truncated sampling). A token outside the kept set
    gets -inf. top_k 0, top_p 1 and min_p 0 are off."""
    z = logits.float()
    neg = float("-inf")
    if min_p > 0:
        probs = z.softmax(-1)
        z = z.masked_fill(probs < probs.amax(-1, keepdim=True) * min_p, neg)
    if 0 < top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, neg)
    if top_p < 1:
        ordered, index = z.sort(-1)  # ascending, as vLLM's
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[..., -1] = False
        z = z.masked_fill(torch.zeros_like(drop).scatter(-1, index, drop), neg)
    return z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1)


def aggregate_loss(
    losses: Tensor, mask: Tensor, mode: str, max_new_tokens: int = 1
) -> tuple[Tensor, Tensor]:
    """``(total, weight)``: a minibatch's loss is the sum of its pieces' totals over the sum of
    their weights, so micro-batches and ranks add up to the big-batch loss in every mode.

    - ``token_mean`` (DAPO): every token of the minibatch counts once: sum / tokens.
    - ``seq_mean_token_mean`` (GRPO as published): each response's token mean, averaged
      over responses.
    - ``seq_sum_norm`` (Dr. GRPO): sum / (responses x max_new_tokens), a constant divisor.

    Responses without a masked-in token (all masked out) count in no weight.
    """
    keep = mask.bool()
    masked = torch.where(keep, losses, 0.0)
    weight = aggregate_weight(mask, mode, max_new_tokens)
    if mode == "seq_mean_token_mean":
        return (masked.sum(-1) / keep.sum(-1).clamp(min=1)).sum(), weight
    return masked.sum(), weight


def aggregate_weight(mask: Tensor, mode: str, max_new_tokens: int = 1) -> Tensor:
    """The weight ``aggregate_loss`` gives a (B, T) mask: its tokens (token_mean), its
    responses with a masked-in token (seq_mean_token_mean), or those x max_new_tokens
    (seq_sum_norm)."""
    tokens = mask.bool().sum(-1)
    if mode == "token_mean":
        return tokens.sum()
    if mode == "seq_mean_token_mean":
        return (tokens > 0).sum()
    if mode == "seq_sum_norm":
        return (tokens > 0).sum() * max_new_tokens
    raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {mode!r}")


def clipped_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
    importance_level: str = "token",
    loss_agg: str = "token_mean",
    max_new_tokens: int = 1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate of one whole minibatch: ``policy_token_losses`` aggregated by
    ``aggregate_loss`` (by default the mean over every masked-in token)."""
    losses, stats = policy_token_losses(
        logp, old_logp, advantages, mask, clip_eps, clip_eps_high, importance_level
    )
    total, weight = aggregate_loss(losses, mask, loss_agg, max_new_tokens)
    return total / weight.clamp(min=1), stats


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, Tensor]:
    """``0.5 mean(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2))`` over the mask.

    Returns ``(loss, clipfrac)``, clipfrac being the detached share of tokens where the
    clipped error is the larger one.
    """
    old_values = old_values.detach()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    clipfrac = masked_mean((err_clipped > err).float(), mask).detach()
    return loss, clipfrac


def adaptive_kl_coef(
    coef: float, current_kl: float, target: float, horizon: float, n_steps: int
) -> float:
    """Ziegler et al. adaptive KL controller, one update after ``n_steps`` samples.

    ``error = clip(KL / target - 1, -0.2, 0.2)``; ``coef *= 1 + error * n_steps / horizon``.
    """
    error = min(max(float(current_kl) / target - 1, -0.2), 0.2)
    return coef * (1 + error * n_steps / horizon)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k responses drawn without replacement from n
    samples, c of which pass, passes: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021's unbiased
    pass@k; 1 when fewer than k fail)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(n: int) -> list[int]:
    """The k of pass@k an evaluation of n samples per prompt reports: 1, 2, 4, ... and n."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else [*ks, n]


def prompt_pass_at_k(n: int, c: int, task: str | None = None) -> dict[str, float]:
    """One prompt's pass@k for each k of pass_ks(n), keyed pass@k (and pass@k/<task> too when
    the prompt names its task): the values an evaluation averages over its prompts."""
    out = {}
    for k in pass_ks(n):
        out[f"pass@{k}"] = pass_at_k(n, c, k)
        if task is not None:
            out[f"pass@{k}/{task}"] = out[f"pass@{k}"]
    return out
