"""The training state beside the model: data position and order, optimizer and schedule,
fingerprints of model and data, stop signals, seeding."""

from __future__ import annotations

import math
import os
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_cli.config import OptimConfig
from rlhf_cli.core import distributed as dist
from rlhf_cli.core.errors import UserError
from rlhf_cli.core.progress import console


@dataclass
class Position:
    """Where the loop stands: optimizer steps done, and the next example of the epoch."""

    step: int = 0
    epoch: int = 0
    offset: int = 0
    skipped: int = 0  # steps skipped for a non-finite loss or gradient, in total
    streak: int = 0  # ... in a row
    tokens: int = 0


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


GROUP_STEPS = 50  # data.group_by_length sorts chunks of this many steps' examples


def grouped_by_length(
    order: list[int], lengths: list[int], size: int, epoch: int, seed: int
) -> list[int]:
    """`order` (an epoch's) with each chunk of GROUP_STEPS steps of `size` examples sorted by
    length, longest first (ties: as in `order`), then that chunk's steps in a seeded order:
    each step (and micro-batch) holds examples of similar length, and a chunk's longest
    examples are not always its first step. A tail shorter than a step stays as it is."""
    chunk = size * GROUP_STEPS
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7)
    out: list[int] = []
    full = len(order) // size * size
    for start in range(0, full, chunk):
        part = sorted(order[start : min(start + chunk, full)], key=lambda i: -lengths[i])
        steps = [part[k : k + size] for k in range(0, len(part), size)]
        for s in torch.randperm(len(steps), generator=g).tolist():
            out += steps[s]
    return out + order[full:]


def next_examples(
    examples: list,
    pos: Position,
    size: int,
    seed: int,
    shuffle: bool,
    lengths: list[int] | None = None,
) -> list:
    """The next `size` examples; an epoch's incomplete tail is skipped so every step is full.
    With `lengths` (data.group_by_length), the epoch's order is grouped_by_length."""
    if pos.offset + size > len(examples):
        pos.epoch, pos.offset = pos.epoch + 1, 0
    order = epoch_order(len(examples), pos.epoch, seed, shuffle)
    if lengths is not None:
        order = grouped_by_length(order, lengths, size, pos.epoch, seed)
    picked = [examples[i] for i in order[pos.offset : pos.offset + size]]
    pos.offset += size
    return picked


def make_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW) over `params`. Under FSDP, sharded parameters and
    those kept whole on every rank (a reward head, tied embeddings) go in two groups: the
    foreach kernels take no mix of DTensors and plain tensors."""
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    sharded = [p for p in params if dist.is_sharded(p)]
    groups: list = params
    if sharded and len(sharded) < len(params):
        groups = [{"params": sharded}, {"params": [p for p in params if not dist.is_sharded(p)]}]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, foreach=True, **kw)
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if cfg.name == "adamw8bit" else bnb.optim.PagedAdamW8bit
    return cls(groups, **kw)


def lr_lambda(cfg: OptimConfig, total_steps: int):
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if cfg.scheduler == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return factor


def model_fingerprint(model) -> str:
    """A hash of a sample of every frozen (base) weight: 256 values at its start and 256 in
    its middle. Another model with the same shapes gives another hash."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        values = p.detach()
        values = (values.to_local() if hasattr(values, "to_local") else values).reshape(-1)
        mid = values.numel() // 2
        digest.update(name.encode())
        for part in (values[:256], values[mid : mid + 256]):
            digest.update(part.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def data_fingerprint(examples: list) -> dict[str, Any]:
    """The training examples' count and a hash of their tokens (after every data option)."""
    import hashlib
    import pickle

    digest = hashlib.sha256()
    for ex in examples:
        digest.update(pickle.dumps(ex, protocol=4))
    return {"rows": len(examples), "sha256": digest.hexdigest()[:16]}


def check_fingerprint(saved: dict | None, now: dict, ckpt: Path, force: bool) -> None:
    """Refuse to resume on another model or other data (unless `force`); say what differs."""
    if saved is None:  # a checkpoint from before fingerprints
        return
    changes = []
    if saved["model"] != now["model"]:
        changes.append("the model's weights differ")
    if saved["data"] != now["data"]:
        old, new = saved["data"], now["data"]
        changes.append(
            f"the training data differ ({old['rows']} -> {new['rows']} examples"
            + (", same count, other contents" if old["rows"] == new["rows"] else "")
            + ")"
        )
    if not changes:
        return
    if not force:
        raise UserError(
            f"{ckpt}: {' and '.join(changes)} from the checkpoint's: resume with the same model "
            "and data, or add resume_force=true to continue anyway"
        )
    console.print(f"[yellow]warning:[/] resume_force: {' and '.join(changes)}")


def take_optim_settings(optimizer, scheduler, cfg: OptimConfig) -> None:
    """After loading a checkpoint: the optimizer's lr, betas, eps and weight decay from the
    config (they may have changed with resume_force), the schedule continued at its step."""
    for group in optimizer.param_groups:
        group["betas"], group["eps"] = tuple(cfg.betas), cfg.eps
        group["weight_decay"] = cfg.weight_decay
        group["initial_lr"] = cfg.lr
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    lrs = [b * f(scheduler.last_epoch) for b, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


class StopRequested(Exception):
    """Raised by a stage's long work between steps when a signal asked the run to stop; the
    loop saves a checkpoint at the current step and exits as for a signal."""


class StopFlag:
    """SIGINT/SIGTERM ask the loop to save and stop at the end of the current step; a second
    SIGINT interrupts at once."""

    def __init__(self):
        self.signum: int | None = None
        self.saving = False  # a second Ctrl-C waits for the save to finish
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread (e.g. under a test runner thread)
                pass
        return self

    def handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            if self.saving:
                os.write(2, b"\nCtrl-C: finishing the checkpoint first\n")
                return
            raise KeyboardInterrupt
        self.signum = signum
        if dist.is_main():  # at once, not when the step ends (a step may take minutes)
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            again = "; Ctrl-C again stops at once, unsaved" if signum == signal.SIGINT else ""
            message = f"\n{name}: stopping after this step, with a checkpoint{again}\n"
            os.write(2, message.encode())

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
