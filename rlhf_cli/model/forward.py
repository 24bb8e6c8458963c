"""Every log-prob path: the decoder's hidden states (packed, shared prompt, FSDP), the LM
head in chunks (HEAD_CHUNK), labelled and response log-probs."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from rlhf_cli.core.errors import UserError
from rlhf_cli.data.batches import PreferenceBatch, pack_bins, pack_rows, row_count
from rlhf_cli.losses import IGNORE_INDEX, token_logps


def decoder(model):
    """The transformer under the LM head (adapters included): hidden states without logits."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(lm, lm.base_model_prefix)


def shares_prompt(model, batch) -> bool:
    """Whether `batch` carries the shared-prompt layout and the model can run it: the prompt's
    KV cache must come back, which gradient checkpointing turns off, and the responses'
    backward must reach the prompt pass through it, which FSDP cannot follow (it gathers a
    layer's weights for the backward of the outputs it saw, and the cache is not among them:
    the prompt pass's backward found them freed)."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers < 5.x: the old name
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    return "prompt_ids" in batch and not checkpointing and not is_fsdp(model)


def is_fsdp(model) -> bool:
    """Whether FSDP (dist.strategy=fsdp) shards `model`'s weights."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def shared_prompt_hidden(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of every response row with its prompt run once: the prompts (left-padded)
    go through the decoder, their KV cache is gathered row by row, and the responses attend to
    it at positions that continue each prompt. Returns the last prompt token's hidden state per
    row (N, H) and the responses' (N, R, H): what one forward over prompt + response gives at
    those positions, without running the prompt once per response."""
    dec = decoder(model)
    prompt_mask = batch["prompt_mask"]
    prompt = dec(
        input_ids=batch["prompt_ids"],
        attention_mask=prompt_mask,
        position_ids=(prompt_mask.cumsum(1) - 1).clamp(min=0),
        use_cache=True,
    )
    cache, rows = prompt.past_key_values, batch["row_example"]
    if cache is None:
        raise UserError("the model returned no KV cache: set train.shared_prompt=false")
    cache.reorder_cache(rows)  # (B, ...) -> (N, ...), differentiable
    response_mask = batch["response_mask"]
    start = prompt_mask.sum(1)[rows]
    positions = start[:, None] + torch.arange(response_mask.shape[1], device=start.device)
    # transformers 5.2x renamed the argument past_key_values -> cache (the old name warns).
    name = "cache" if "cache" in inspect.signature(dec.forward).parameters else "past_key_values"
    out = dec(
        input_ids=batch["response_ids"],
        attention_mask=torch.cat([prompt_mask[rows], response_mask], dim=1),
        position_ids=positions,
        use_cache=True,
        **{name: cache},
    )
    return prompt.last_hidden_state[:, -1][rows], out.last_hidden_state


def _softcap(config):
    cap = getattr(config, "final_logit_softcapping", None)
    return (lambda x: torch.tanh(x / cap) * cap) if cap else None


def _times(attr: str):
    return lambda config: lambda x: x * getattr(config, attr)


def _divided(attr: str):
    return lambda config: lambda x: x / getattr(config, attr)


# What a family's causal-LM forward does to lm_head(hidden) before it returns the logits, by
# config.model_type (read from transformers' modeling files; tests compare each with
# model(...).logits on a tiny config). A family in neither table takes its log-probs from the
# model's own forward (own_logits), whatever it does.
PLAIN_HEAD = {
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "phi",
    "gemma", "olmo", "olmo2", "starcoder2", "smollm3",
}  # fmt: skip


LOGIT_TRANSFORMS = {
    "gemma2": _softcap,  # tanh(x / cap) * cap
    "gemma3_text": _softcap,
    "cohere": _times("logit_scale"),
    "cohere2": _times("logit_scale"),
    "granite": _divided("logits_scaling"),
    "granitemoe": _divided("logits_scaling"),
    "granitemoeshared": _divided("logits_scaling"),
    "granitemoehybrid": _divided("logits_scaling"),
    "falcon_h1": _times("lm_head_multiplier"),
}


def own_logits(model) -> bool:
    """True when the LM head's output must come from the model's own forward (a family whose
    logit transform this module does not know)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type not in PLAIN_HEAD and model_type not in LOGIT_TRANSFORMS


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The logits a known family's forward returns for these hidden states: the LM head, then
    the family's final transform (soft-capping, logit scales)."""
    logits = model.get_output_embeddings()(hidden)
    make = LOGIT_TRANSFORMS.get(model.config.model_type)
    transform = make(model.config) if make is not None else None
    return transform(logits) if transform is not None else logits


# Label positions per LM-head chunk: the float32 logits that exist at once are at most
# HEAD_CHUNK x vocab (1024 x 49k = 200 MB for SmolLM2), whatever the batch.
HEAD_CHUNK = 1024


class _FrozenHeadLogps(torch.autograd.Function):
    """log p(target_i) = z_i[t_i] - logsumexp(z_i), z_i = W h_i + b, for a frozen head, a chunk
    of rows at a time. The gradient needs no logits: d logp_i / d h_i = W^T (onehot(t_i) -
    softmax(z_i)), an (n, H) tensor computed in the forward from each chunk's logits, so the
    backward only scales it by the incoming gradient (as Liger's fused linear cross-entropy does
    for a scalar loss; here per row, since DPO's loss is not a sum of log-probs)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grads = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # The weight (and bias) in the compute dtype under autocast, cast once for all chunks:
        # autocast caches no cast of a frozen weight, so F.linear would cast it again per chunk.
        device = hidden.device.type
        w, b = weight, bias
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            # One (chunk, vocab) float32 buffer, worked in place: the logits, shifted by their
            # max, exponentiated, then (for the gradient) onehot - softmax.
            z = F.linear(hidden[start:end], w, b).float()
            t = targets[start:end]
            z.sub_(z.amax(dim=-1, keepdim=True))
            picked = z.gather(1, t[:, None]).squeeze(1)
            total = z.exp_().sum(dim=-1)
            out[start:end] = picked - total.log()
            if grads is not None:
                g = z.div_(total[:, None]).neg_()
                g[torch.arange(end - start, device=g.device), t] += 1
                grads[start:end] = g.to(w.dtype) @ w
        ctx.save_for_backward(grads)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grads,) = ctx.saved_tensors
        grad_hidden = None
        if grads is not None:
            grad_hidden = grads * grad_out[:, None].to(grads.dtype)
        return grad_hidden, None, None, None, None


def head_logps(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under the model's LM head (and its family's logit transform) for rows of
    hidden states (n, H) -> (n,) float32, HEAD_CHUNK rows at a time: no (n, vocab) logits are
    ever kept. A frozen plain head (LoRA's usual case) gets its gradient computed in the forward
    (_FrozenHeadLogps); a trained head or a logit transform recomputes each chunk's logits in the
    backward (activation checkpointing), one chunk at a time."""
    from torch.utils.checkpoint import checkpoint

    head = model.get_output_embeddings()
    plain = (
        type(head) is torch.nn.Linear
        and not head.weight.requires_grad
        and (head.bias is None or not head.bias.requires_grad)
        and model.config.model_type not in LOGIT_TRANSFORMS
    )
    if plain:
        return _FrozenHeadLogps.apply(hidden, head.weight, head.bias, targets, HEAD_CHUNK)

    def chunk_logps(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(lm_logits(model, h).float(), t, reduction="none")

    pieces = [hidden.new_zeros(0, dtype=torch.float32)]
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        h, t = hidden[start : start + HEAD_CHUNK], targets[start : start + HEAD_CHUNK]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(chunk_logps, h, t, use_reentrant=False))
        else:
            pieces.append(chunk_logps(h, t))
    return torch.cat(pieces)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """The keyword arguments of a forward over a batch's rows: with the attention mask of a
    padded batch, or, for packed rows (data.pack_rows), with their position ids and no mask:
    the model then limits attention to each sequence (transformers builds a block-diagonal
    causal mask from position ids that restart at 0, or runs flash-attention's varlen kernel),
    and no KV cache (a cache turns that detection off)."""
    if "sequence" in batch:
        return {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "attention_mask": None,
            "use_cache": False,
        }
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def segments(sequence: torch.Tensor) -> list[list[tuple[int, int]]]:
    """The [start, end) column ranges of each row's sequences in a packed batch."""
    out = []
    for row in sequence.tolist():
        runs: list[tuple[int, int]] = []
        for t, j in enumerate(row):
            if j < 0:
                continue
            if runs and row[runs[-1][0]] == j and runs[-1][1] == t:
                runs[-1] = (runs[-1][0], t + 1)
            else:
                runs.append((t, t + 1))
        out.append(runs)
    return out


def packed_states(model, batch: dict) -> torch.Tensor:
    """The decoder's hidden states (R, T, H) of packed rows (data.pack_rows). The same
    numbers three ways (train.packing_attention): `varlen` and `mask`, one forward over the
    rows, whose attention keeps each sequence to itself by their position ids (the model's
    attention implementation: varlen_attention, SDPA with the block-diagonal mask
    transformers builds, or flash-attention's varlen kernel); `slices` (batch["slices"]), one
    forward per sequence, its states written back into its row (zeros on padding): no mask,
    but small matmuls (slower on a CPU: docs/packing.md)."""
    dec = decoder(model)
    if not batch.get("slices"):
        return dec(**model_inputs(batch)).last_hidden_state
    ids, width = batch["input_ids"], batch["input_ids"].shape[1]
    rows = []
    for r, runs in enumerate(segments(batch["sequence"])):
        parts = [
            dec(input_ids=ids[r : r + 1, a:b], use_cache=False).last_hidden_state[0]
            for a, b in runs
        ]
        parts.append(parts[0].new_zeros(width - runs[-1][1], parts[0].shape[-1]))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def packed_hidden(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    limit: int,
    multiple: int = 1,
    slices: bool = False,
) -> torch.Tensor:
    """The decoder's hidden states (B, T, H) of a padded batch (padding anywhere: left,
    right, between), computed with its tokens packed (data.pack_bins into rows of up to
    `limit` tokens, data.pack_rows): each row's tokens at positions 0, 1, ... as the padded
    forward gives them with position ids that skip padding; zeros at padding."""

    keep = attention_mask.bool()
    lengths = keep.sum(1).tolist()
    seqs = [input_ids[b][keep[b]].tolist() for b in range(input_ids.shape[0])]
    packed = pack_rows(seqs, seqs, pack_bins(lengths, limit, multiple), 0, multiple)
    packed = {k: v.to(input_ids.device) for k, v in packed.items()}
    hidden = packed_states(model, {**packed, "slices": slices})
    starts = packed["last"] - torch.tensor(lengths, device=input_ids.device) + 1
    index = torch.cat([torch.arange(int(s), int(s) + n) for s, n in zip(starts, lengths)])
    out = hidden.new_zeros(*input_ids.shape, hidden.shape[-1])
    out[keep] = hidden.flatten(0, 1)[index.to(input_ids.device)]
    return out


def labelled_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the labelled tokens only, and the row each comes from: (n,), (n,).

    The LM head runs only at the positions that predict a label (never on prompt or padding),
    followed by the family's logit transform (lm_logits), HEAD_CHUNK positions at a time
    (head_logps), so neither (B, T, V) nor (labels, V) logits exist. A family whose transform is
    unknown takes the model's own forward instead.
    """

    targets = batch["labels"][:, 1:]
    # The row (sequence) each label belongs to: packed rows hold several.
    rows = batch["sequence"][:, 1:] if "sequence" in batch else None
    if own_logits(model):
        logits = model(**model_inputs(batch)).logits
        logps, mask = token_logps(logits, batch["labels"], IGNORE_INDEX)
        return logps[mask], (mask.nonzero()[:, 0] if rows is None else rows[mask])
    if shares_prompt(model, batch):
        # Response token j is predicted by response position j - 1, the first by the prompt's
        # last position; every response token is a label.
        last_prompt, hidden = shared_prompt_hidden(model, batch)
        hidden = torch.cat([last_prompt[:, None], hidden[:, :-1]], dim=1)
        targets, keep = batch["response_ids"], batch["response_mask"].bool()
    else:
        if rows is not None:
            hidden = packed_states(model, batch)[:, :-1]
        else:
            hidden = decoder(model)(**model_inputs(batch)).last_hidden_state[:, :-1]
        keep = targets != IGNORE_INDEX
        if rows is not None:
            return head_logps(model, hidden[keep], targets[keep]), rows[keep]
    return head_logps(model, hidden[keep], targets[keep]), keep.nonzero()[:, 0]


def response_logps(model, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs, response token counts) of every row: shapes (N,), (N,). The same as
    losses.sequence_logps on the full logits, with the LM head on response positions only."""
    logps, rows = labelled_logps(model, batch)
    n = row_count(batch)
    sums = torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)
    counts = torch.bincount(rows, minlength=n).clamp(min=1)
    return sums, counts


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as generate() used them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)
