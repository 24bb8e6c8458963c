"""Data parallelism over torchrun: one process per device, the standard torch.distributed
process group (nccl on CUDA, gloo on CPU).

Every rank holds the whole model (with LoRA, its own 4-bit base) and a 1/N shard of each step's
examples. Micro-batch losses are divided by the weight (tokens, pairs) of the WHOLE global step,
summed over every rank; after the step's backward passes the trainable gradients are summed
across ranks in one flat all-reduce. So N ranks x micro-batch b x accumulation k make exactly
the update of 1 rank x b*N x k (tested), with one gradient synchronisation per optimizer step.
Rank 0 alone prints, writes metrics and checkpoints.

dist.strategy=fsdp (torch FSDP2, fully_shard) shards the weights, gradients and optimizer state
across ranks instead (each decoder layer, the decoder and the LM head are units; tied embeddings
stay whole on every rank); checkpoints are gathered into the same full-weight format as a single
device's. A 4-bit base shards as it is: bitsandbytes' packed NF4 bytes are a uint8 parameter
that FSDP2 splits along its first dimension, while each layer's quantization constants stay
whole on the module, where bitsandbytes finds them again for the gathered weight
(fix_4bit_weight_quant_state_from_module). Under FSDP every forward is a collective: the
stages keep the ranks in step (generation with synced_gpus, stand-in batches for a rank with
fewer examples).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True inside a torchrun worker (even before the process group exists)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(timeout_s: float = 1800.0) -> None:
    """Join torchrun's process group (no-op for a single process); a collective that waits
    longer than `timeout_s` for the other ranks fails."""
    if not launched() or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def local_device(name: str) -> torch.device | None:
    """The CUDA device of this rank under torchrun (device=auto/cuda), else None."""
    if launched() and name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return None


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (returns the tensor); CPU tensors work with nccl too."""
    if world_size() == 1:
        return tensor
    device = _comm_device()
    if tensor.device == device:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return tensor.copy_(moved)


def all_reduce_max(value: float) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value of `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, on every rank, in rank order."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def is_sharded(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def sync_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over ranks: one flat all-reduce. FSDP-sharded parameters
    are skipped: FSDP reduce-scatters (sums) their gradients itself."""
    params = [p for p in params if not is_sharded(p)]
    if world_size() == 1 or not params:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if len(grads) != len(params):  # every rank must send the same layout
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
    flat = all_reduce_sum(torch.cat([g.reshape(-1).float() for g in grads]))
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g).to(g.dtype))
        offset += n


def broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
    """Start every rank from rank 0's trainable weights (as DDP does)."""
    if world_size() == 1:
        return
    device = _comm_device()
    for p in params:
        data = p.data.to(device)
        dist.broadcast(data, src=0)
        p.data.copy_(data)


def grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the gradients, sharded (FSDP) or not."""
    local = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None:
            continue
        if is_sharded(p.grad):
            local += p.grad.to_local().double().pow(2).sum().cpu()
        else:
            replicated += p.grad.double().pow(2).sum().cpu()
    return (all_reduce_sum(local) + replicated).sqrt()


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ for a mix of FSDP-sharded and plain parameters; returns the norm."""
    if not any(is_sharded(p) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = grad_norm(params)
    scale = max_norm / (float(norm) + 1e-6)
    if scale < 1:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


def local_bytes(t: torch.Tensor) -> int:
    """The bytes this rank holds of `t` (its shard, when FSDP shards it)."""
    t = t.to_local() if is_sharded(t) else t
    return t.numel() * t.element_size()


def footprint(module: torch.nn.Module, optimizer) -> dict[str, float]:
    """What this rank holds of the run's static memory, in MiB: the weights (every parameter,
    a sharded one by its shard, with the 4-bit bases' quantization constants, which stay whole
    on every rank), the gradients as they stand (call it before they are freed) and the
    optimizer's moments."""
    weights = sum(local_bytes(p) for p in module.parameters())
    seen: set[int] = set()
    for m in module.modules():
        state = getattr(m, "quant_state", None)
        if state is not None and id(state) not in seen and hasattr(state, "as_dict"):
            seen.add(id(state))
            weights += sum(
                v.numel() * v.element_size()
                for v in state.as_dict(packed=True).values()
                if torch.is_tensor(v)
            )
    grads = sum(local_bytes(p.grad) for p in module.parameters() if p.grad is not None)
    optim = sum(  # the moments (a step counter per tensor aside: a few bytes)
        local_bytes(v)
        for st in optimizer.state.values()
        for v in st.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    mib = 2.0**20
    return {
        "memory/weights_mib": weights / mib,
        "memory/grads_mib": grads / mib,
        "memory/optimizer_mib": optim / mib,
    }


def fsdp_wrap(model) -> None:
    """Shard a (PEFT) causal LM with FSDP2: every decoder layer, the decoder, the LM head, then
    the whole. Gradients are summed, not averaged: the loss is already divided by the weight of
    the global step.

    An LM head tied to the input embeddings is one parameter in two modules, and the stages call
    the decoder and the head apart (the head on response positions only), so no one FSDP unit
    can own both: sharding it would give the decoder a new sharded parameter and leave the head
    the old one (two matrices from then on, each with half the gradient). It stays out of the
    sharding instead, whole on every rank as in ddp, its gradient summed by sync_gradients."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(lm, lm.base_model_prefix)
    head = lm.get_output_embeddings()
    embedding = body.get_input_embeddings().weight
    tied = head is not None and head.weight is embedding
    ignored = {embedding} if tied else None
    for layer in body.layers:
        fully_shard(layer)
    fully_shard(body, ignored_params=ignored)
    if head is not None and not tied:
        fully_shard(head)
    fully_shard(lm, ignored_params=ignored)
    for module in lm.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM


def full_trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable weights gathered whole, on CPU (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def optimized_modules(model, extras: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """One module that holds every parameter the optimizer updates: the model, and the extra
    modules (a reward head) beside it, whose optimizer state is keyed by their names."""
    return torch.nn.ModuleDict({"model": model, **extras}) if extras else model


def full_optimizer_state(owner: torch.nn.Module, optimizer) -> dict:
    """The optimizer state gathered whole, keyed by parameter names under `owner`
    (optimized_modules): a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(owner, optimizer, options=options)


def load_full_state(model, owner: torch.nn.Module, optimizer, weights: dict, optim_state: dict):
    """Every rank loads the whole state and keeps its shard: the model's trainable `weights`,
    and the optimizer state saved by full_optimizer_state(owner, ...)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(owner, optimizer, optim_state, options=options)


def shard(items: list, r: int | None = None, n: int | None = None) -> list:
    """This rank's contiguous 1/N of a global batch (len(items) divisible by N)."""
    r, n = rank() if r is None else r, world_size() if n is None else n
    size = len(items) // n
    return items[r * size : (r + 1) * size]


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
