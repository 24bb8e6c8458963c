"""Kernels under the model: varlen SDPA attention over packed rows, a dropout that skips its
mask when p is 0, and a leaner LoRA forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_cli.core.errors import UserError

VARLEN = "sdpa_varlen"  # the attention of train.packing_attention=varlen


def varlen_bounds(position_ids: torch.Tensor) -> torch.Tensor:
    """Where each sequence of packed rows starts in their flattened positions, and the end
    (cumulative lengths, as flash-attention's varlen kernel takes them): a sequence starts
    wherever its position id is 0 (data.pack_rows restarts them per sequence and per run of
    padding), and wherever the ids do not count on from the previous one or a row begins (a
    first sequence that does not start at 0, a caller's own positions), so no sequence crosses
    a row's end."""
    width = position_ids.shape[-1]
    flat = position_ids.reshape(-1)
    new = torch.ones_like(flat, dtype=torch.bool)
    new[1:] = (flat[1:] == 0) | (flat[1:] != flat[:-1] + 1)
    new[::width] = True
    starts = new.nonzero().flatten()
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([starts, end]).to(torch.int32)


def varlen_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
):
    """SDPA one sequence at a time inside one forward over packed rows: the projections and
    MLPs run on the whole rows (large matmuls), attention on each sequence alone (causal, no
    mask: no work across sequences, no (T, T) mask in any layer): flash-attention's varlen on
    a CPU. The bounds come from cu_seq_lens_q where a caller passes them, else from the
    position ids (varlen_bounds); any other call (padded rows, generation) is plain SDPA with
    its mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None and attention_mask is None and query.shape[2] > 1:
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and bool((position_ids[..., 1:] == 0).any()):
            bounds = varlen_bounds(position_ids.expand(query.shape[0], -1))
    if bounds is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    window = kwargs.get("sliding_window")
    if kwargs.get("softcap") is not None or (window and int(torch.diff(bounds).max()) > window):
        raise UserError(
            "train.packing_attention=varlen runs plain causal attention on each example: this "
            "model soft-caps its attention scores or has an example longer than its sliding "
            "window; use train.packing_attention=mask"
        )
    rows, heads, width, dim = query.shape
    # (R, H, T, D) -> (R*T, H, D): token-major, so each sequence is one contiguous slice.
    q, k, v = (
        x.transpose(1, 2).reshape(rows * width, x.shape[1], dim) for x in (query, key, value)
    )
    gqa = k.shape[1] != heads
    p = dropout if module.training else 0.0
    out = []
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        # (1, H, L, D): SDPA takes its flash kernel on 4-D inputs only (on a CPU, 3-D ones
        # fall back to the math path, which keeps the (H, L, L) probabilities).
        o = F.scaled_dot_product_attention(
            *(x[a:b].transpose(0, 1)[None] for x in (q, k, v)),
            dropout_p=p,
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        )
        out.append(o[0].transpose(0, 1))
    return torch.cat(out).reshape(rows, width, heads, dim), None


def varlen_mask(*args, attention_mask=None, **kwargs):
    """The mask of VARLEN: none for packed rows (they come without one: varlen_attention
    keeps each sequence to itself), SDPA's for every other batch."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and kwargs.get("q_length", 0) > 1:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen() -> str:
    """Make VARLEN an attention implementation transformers knows (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, varlen_mask)
    return VARLEN


class _Masked(torch.autograd.Function):
    """x * keep * scale, saving only the boolean mask for the backward."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale), None, None


def dropout_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(keep mask, 1 / keep probability): each element kept with probability 1 - p, p rounded
    to a multiple of 2^-16. Four 16-bit draws come from each 64-bit random word: a quarter of
    the generator calls of torch's dropout, whose per-element Bernoulli draw is the slowest part
    of a LoRA step on a CPU (a quarter of the whole step with dropout on 7 linears per layer)."""
    k = round(p * 65536)
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    keep = words.view(torch.int16)[:n].view(shape) >= k - 32768
    return keep, 65536 / (65536 - k)


class FastDropout(torch.nn.Module):
    """Inverted dropout like torch.nn.Dropout (same expectation, independent per element),
    with the mask from dropout_mask: the LoRA input dropout of every adapted layer."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep, scale = dropout_mask(x.shape, self.p, x.device)
        return _Masked.apply(x, keep, scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _OutsideAutocast:
    """True outside torch.autocast, false inside: the value of a LoRA layer's
    `cast_input_dtype_enabled`, which peft reads as a bool before each adapter forward."""

    def __bool__(self) -> bool:
        return not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"))


def lean_lora(model):
    """Swap peft's LoRA dropout modules (torch.nn.Dropout) for FastDropout, same p, and keep
    a LoRA layer's input in its own dtype under autocast. peft casts the (bf16) input to the
    adapter's fp32 before dropout and lora_A, where autocast casts it straight back to bf16: two
    copies of every adapted activation and a dropout at twice the bytes, for the same numbers.
    Outside autocast the cast stays (an fp32 adapter on a bf16 base needs it)."""
    outside = _OutsideAutocast()
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = outside
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, layer in list(dropouts.items()):
                if isinstance(layer, torch.nn.Dropout) and layer.p > 0:
                    dropouts[name] = FastDropout(layer.p)
    return model
