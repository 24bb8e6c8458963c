"""`rlhf plan measure=true`: the plan's figures measured on the tiny model (allocations and
saved activations)."""

from __future__ import annotations

import random
from pathlib import Path

from rlhf_cli.config import Config
from rlhf_cli.core.errors import UserError
from rlhf_cli.core.quiet import native_stderr_silenced, quiet_libraries
from rlhf_cli.data.batches import move
from rlhf_cli.model.load import autocast, autocast_dtype, load_model, load_tokenizer, resolve_device
from rlhf_cli.stages import stage_class
from rlhf_cli.tools.plan import GIB, Plan, plan, stdout, trainable_counts
from rlhf_cli.trainer.state import make_optimizer, seed_everything

# ---------------------------------------------------------------------------------------------
# measure=true: the plan's rows against what this device holds


MEASURED_STAGES = ("sft", "rm", "dpo")


def check_measurable(cfg: Config) -> None:
    """One line when measure=true cannot run this config."""
    if cfg.stage.name not in MEASURED_STAGES:
        raise UserError(
            f"measure=true covers stage={', '.join(MEASURED_STAGES)}; stage={cfg.stage.name} "
            "is planned only"
        )
    if cfg.ref.precompute or cfg.ref.model:
        raise UserError(
            "measure=true runs the reference as the base with the adapter off: drop ref.model "
            "and ref.precompute"
        )


def synthetic_examples(
    kind: str, n: int, length: int, prompt_len: int, vocab: int, eos: int
) -> list:
    """n examples at the plan's worst case: every row data.max_length tokens long, ending with
    EOS (pairs: a `prompt_len`-token prompt, both responses filling the rest)."""
    g = random.Random(0)
    special = {eos}

    def ids(k: int) -> list[int]:
        out = []
        while len(out) < k - 1:
            t = g.randrange(3, vocab)
            if t not in special:
                out.append(t)
        return out + [eos]

    if kind == "sft":
        rows = [ids(length) for _ in range(n)]
        return [{"input_ids": r, "labels": [-100] + r[1:]} for r in rows]
    return [
        {
            "prompt_ids": ids(prompt_len),
            "responses_ids": [ids(length - prompt_len), ids(length - prompt_len)],
            "margin": None,
        }
        for _ in range(n)
    ]


def stored_bytes(tensors) -> int:
    """Bytes of the distinct storages among `tensors`."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and hasattr(t, "untyped_storage"):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def base_tensors(model):
    """The frozen weights, buffers and bitsandbytes quantization states of a model."""
    for param in model.parameters():
        if not param.requires_grad:
            yield param
            state = getattr(param, "quant_state", None)
            if state is not None:
                yield state.absmax
                yield state.code
                if getattr(state, "state2", None) is not None:
                    yield state.state2.absmax
                    yield state.state2.code
            yield getattr(param, "SCB", None)  # int8 row scales
    yield from model.buffers()


def saved_activation_bytes(fn, exclude: set[int]):
    """(what `fn` left for the backward, in bytes; its result): autograd's saved tensors,
    counted once per storage, weights excluded."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def measure(cfg: Config) -> tuple[Plan, dict[str, tuple[float, float]]]:
    """Load the model on this run's device, put one worst-case micro-batch through the stage's
    loss and one optimizer update, and return the plan with {row: (planned, measured)} bytes:
    base weights, trainable parameters, optimizer states, activations + logits (autograd's saved
    tensors), and on CUDA the peak of torch's allocator over two steps."""
    import tempfile

    import torch

    check_measurable(cfg)
    quiet_libraries()
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.device)
    p = plan(cfg, "cuda" if device.type == "cuda" else "cpu")
    amp = autocast_dtype(cfg.train.precision, device)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg, device, tokenizer)
    cls = stage_class(cfg.stage.name)
    stage = cls(cfg, model, tokenizer, device, amp)
    micro = cfg.train.micro_batch_size
    examples = synthetic_examples(
        cls.data_kind,
        micro,
        cfg.data.max_length,
        1,
        min(len(tokenizer), p.arch.vocab),
        tokenizer.eos_token_id,
    )
    with tempfile.TemporaryDirectory() as tmp:
        stage.prepare(examples, [], Path(tmp))
    extras = stage.extra_modules()
    params = [q for m in (model, *extras.values()) for q in m.parameters() if q.requires_grad]
    weights = {t.untyped_storage().data_ptr() for t in base_tensors(model) if t is not None}
    weights |= {q.untyped_storage().data_ptr() for q in params}
    optimizer = make_optimizer(params, cfg.optim)
    model.train()
    batch = move(stage.collate(examples), device)
    stage.begin_step(examples)  # KTO's reference point (no gradient: nothing kept)
    saved = 0.0
    with allocation_peak(device) as peak:
        for step in range(2):
            with autocast(amp, device):
                if step == 0:
                    saved, (loss, _) = saved_activation_bytes(lambda: stage.loss(batch), weights)
                else:
                    loss, _ = stage.loss(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
    rows = {r.name: r.bytes for r in p.rows}
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    base = list(base_tensors(model))
    if cfg.peft.method == "full":  # the trained weights are the base
        base += list(model.parameters())
    trainable = 4.0 * sum(trainable_counts(p.arch, p.settings))
    # What the two steps allocated at their peak beyond what was there before (the model),
    # against the rows that come with a step.
    step_rows = ("gradients", "optimizer states", "activations", "logits", "largest transient")
    out = {
        "base weights": (rows["base weights"], float(stored_bytes(base))),
        "trainable parameters": (trainable, float(stored_bytes(params))),
        "optimizer states": (rows["optimizer states"], float(stored_bytes(state))),
        "activations + logits": (rows["activations"] + rows.get("logits", 0.0), float(saved)),
        "step peak (allocated)": (
            sum(r.bytes for r in p.rows if r.name in step_rows),
            float(peak.bytes),
        ),
    }
    return p, out


class allocation_peak:
    """The peak of torch's allocated bytes inside the block, above the level at its start: the
    CUDA allocator's statistics, or on a CPU the profiler's allocation events (exact, unlike the
    resident memory, which keeps what the C allocator has not returned)."""

    def __init__(self, device):
        self.device, self.bytes = device, 0

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with native_stderr_silenced():  # the profiler's start/stop lines
                self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
            return
        with native_stderr_silenced():
            self.prof.__exit__(*exc)
        cpu = torch.autograd.DeviceType.CPU
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in self.prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == cpu
        )
        live = 0
        for _, n in events:
            live += n
            self.bytes = max(self.bytes, live)


def show_measured(measured: dict[str, tuple[float, float]]) -> None:
    from rich.table import Table

    console = stdout()
    table = Table(show_header=True, title="planned vs measured", title_justify="left")
    for col in ("memory", "planned GiB", "measured GiB", "measured / planned"):
        table.add_column(col, justify="left" if col == "memory" else "right")
    for name, (planned, got) in measured.items():
        ratio = f"{got / planned:.3f}" if planned else "-"
        table.add_row(name, f"{planned / GIB:.4f}", f"{got / GIB:.4f}", ratio)
    console.print(table, soft_wrap=False)
