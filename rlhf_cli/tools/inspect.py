"""`rlhf data inspect`: what a stage will train on, before it trains. The same overrides as
`rlhf train` (stage, model, data); loads the tokenizer only (no model), builds the examples
exactly as training does, and shows the first `n`: the prompt and other masked tokens apart
from the trained ones (colours in a terminal, markers otherwise), token counts, the dropped
rows with their reasons, and warnings for the mistakes that spoil a run silently. Writes
nothing; exit 0."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from rlhf_cli.compose import compose_checked
from rlhf_cli.core.quiet import quiet_libraries
from rlhf_cli.data.batches import pack_bins
from rlhf_cli.data.examples import Renderer, load_datasets
from rlhf_cli.losses import IGNORE_INDEX
from rlhf_cli.model.load import load_tokenizer
from rlhf_cli.multiturn import stage_tools
from rlhf_cli.stages import stage_class
from rlhf_cli.trainer.state import epoch_order, grouped_by_length

console = Console(soft_wrap=True)  # stdout: the report is the command's output


TRAINED, MASKED = "green", "dim"


def inspect_data(overrides: list[str], n: int = 3) -> list[str]:
    """Print the report; returns the warnings (also printed)."""

    quiet_libraries()
    cfg = compose_checked(overrides)
    tokenizer = load_tokenizer(cfg.model)
    kind = stage_class(cfg.stage.name).data_kind
    train, evals, reports = load_datasets(
        cfg.data,
        tokenizer,
        kind,
        cfg.train.seed,
        completion_only=getattr(cfg.stage, "completion_only", True),
        only_last_turn=getattr(cfg.stage, "train_on_turns", "all") == "last",
        tools=stage_tools(cfg.stage),
    )
    plain = not console.is_terminal
    console.print(
        f"stage={cfg.stage.name} reads {kind} examples; model {cfg.model.name_or_path}; "
        f"data.max_prompt_length={cfg.data.max_prompt_length}, data.max_length={cfg.data.max_length}"
    )
    for report in reports:
        console.print("data: " + report.line(), markup=False)
    console.print(f"{len(train)} train / {len(evals)} eval examples")
    legend = "[[trained]] and plain (masked) text" if plain else "trained in green, masked dimmed"
    console.print(f"\nthe first {min(n, len(train))} training examples ({legend}):", markup=False)
    for i, ex in enumerate(train[:n]):
        console.print(f"\n--- example {i + 1}: " + counts(ex), markup=False)
        for title, pieces in segments(ex, tokenizer):
            if title:
                console.print(f"[bold]{title}[/]" if not plain else title, markup=not plain)
            show(pieces, plain)
    if train and kind != "prompt":
        console.print("\n" + batch_layout(train, cfg), markup=False)
    warnings = check(train, reports, tokenizer, cfg)
    if warnings:
        console.print()
    for w in warnings:
        console.print(f"[yellow]warning:[/] {w}", soft_wrap=True)
    if not warnings:
        console.print("\nno warnings")
    return warnings


LAYOUT_STEPS = 200  # batch_layout looks at the first this many steps of the first epoch


def batch_layout(train: list[dict], cfg) -> str:
    """How the first epoch's micro-batches (up to LAYOUT_STEPS steps, in training order) lay
    out: the share of forward positions that are padding when each row is padded to the
    batch's longest (train.pad_to_multiple_of), and packed (train.packing: rows, examples
    and tokens a row), in the order data.group_by_length sets (and in the other one)."""

    t = cfg.train
    size = t.micro_batch_size * t.grad_accum
    multiple, limit = t.pad_to_multiple_of, cfg.data.max_length

    def rows_of(ex: dict) -> list[int]:  # the lengths of an example's rows
        if "input_ids" in ex:
            return [len(ex["input_ids"])]
        return [len(ex["prompt_ids"]) + len(r) for r in ex["responses_ids"]]

    def up(n: int) -> int:
        return -(-n // multiple) * multiple

    steps = min(len(train) // size, LAYOUT_STEPS)
    used = steps * size or len(train)  # less than a step: what there is

    def figures(order: list[int]) -> tuple[float, float, int, int, int]:
        tokens = padded = packed = rows = 0
        for start in range(0, used, t.micro_batch_size):
            batch = [rows_of(train[i]) for i in order[start : start + t.micro_batch_size]]
            lengths = [n for ex in batch for n in ex]
            tokens += sum(lengths)
            padded += len(lengths) * up(max(lengths))
            units = [sum(ex) for ex in batch]
            bins = pack_bins(units, limit, multiple)
            packed += len(bins) * up(max(sum(units[i] for i in b) for b in bins))
            rows += len(bins)
        return 1 - tokens / padded, 1 - tokens / packed, rows, tokens, padded

    order = epoch_order(len(train), 0, t.seed, t.shuffle)
    lengths = [sum(rows_of(ex)) for ex in train]
    grouped = grouped_by_length(order, lengths, size, 0, t.seed)
    plain, by_length = figures(order), figures(grouped)
    micro = -(-used // t.micro_batch_size)
    on = cfg.data.group_by_length
    first, second = (by_length, plain) if on else (plain, by_length)
    pad, packed, rows, tokens, _ = first
    return (
        f"batches ({micro} micro-batches of {t.micro_batch_size}, the first {steps} steps; "
        if steps
        else f"batches (the {used} examples, less than a step of {size}; "
    ) + (
        f"data.group_by_length={str(on).lower()}): padding {pad:.0%} of the positions; "
        f"train.packing=true: {packed:.0%} ({rows / micro:.1f} rows a micro-batch, "
        f"{used / rows:.1f} examples and {tokens / rows:.0f} tokens a "
        f"row of up to data.max_length={limit}); data.group_by_length={str(not on).lower()}: "
        f"padding {second[0]:.0%}, packed {second[1]:.0%}"
    )


def counts(ex: dict[str, Any]) -> str:
    if "labels" in ex:
        trained = sum(label != IGNORE_INDEX for label in ex["labels"])
        return f"{len(ex['input_ids'])} tokens, {trained} trained"
    responses = ex.get("responses_ids", [])
    sizes = ", ".join(str(len(r)) for r in responses)
    return f"prompt {len(ex['prompt_ids'])} tokens" + (f"; responses {sizes}" if sizes else "")


def segments(ex: dict[str, Any], tokenizer) -> list[tuple[str, list[tuple[str, bool]]]]:
    """[(title, [(text, trained), ...])] of one example, by kind."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    if "labels" in ex:  # sft: runs of masked / trained tokens
        runs: list[tuple[str, bool]] = []
        ids, flags = ex["input_ids"], [label != IGNORE_INDEX for label in ex["labels"]]
        start = 0
        for j in range(1, len(ids) + 1):
            if j == len(ids) or flags[j] != flags[start]:
                runs.append((decode(ids[start:j]), flags[start]))
                start = j
        return [("", runs)]
    prompt = [(decode(ex["prompt_ids"]), False)]
    responses = ex.get("responses_ids", [])
    if not responses:  # an online stage samples its own responses
        return [("prompt (the stage samples the responses)", prompt)]
    if "desirable" in ex:
        label = "desirable" if ex["desirable"] else "undesirable"
        return [(f"prompt + {label} response", [*prompt, (decode(responses[0]), True)])]
    names = ["chosen", "rejected"] if len(responses) == 2 else [f"rank {k}" for k in range(1, 99)]
    out = [("prompt", prompt)]
    for name, r in zip(names, responses):
        out.append((name, [(decode(r), True)]))
    return out


def show(pieces: list[tuple[str, bool]], plain: bool) -> None:
    if plain:
        console.print("".join(f"[[{t}]]" if on else t for t, on in pieces), markup=False)
        return
    from rich.text import Text

    text = Text()
    for t, on in pieces:
        text.append(t, style=TRAINED if on else MASKED)
    console.print(text)


def check(train: list[dict], reports: list, tokenizer, cfg) -> list[str]:
    """The silent mistakes: double BOS, responses without their EOS, a chat template that
    renders a conversation differently once the answer is added, most prompts truncated,
    many rows dropped."""
    warnings = []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    firsts = [ex.get("input_ids") or ex.get("prompt_ids") or [] for ex in train]
    double = sum(bos is not None and ids[:2] == [bos, bos] for ids in firsts)
    if double:
        warnings.append(
            f"{double} of {len(train)} examples start with BOS twice (the text or the template "
            "writes one and the tokenizer adds another): remove it from the text"
        )
    responses = []
    for ex in train:
        if "labels" in ex:
            trained = [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != -100]
            responses.append(trained)
        else:
            responses.extend(ex.get("responses_ids", []))
    no_eos = sum(bool(r) and eos not in r[-2:] for r in responses)
    if no_eos:
        warnings.append(
            f"{no_eos} of {len(responses)} trained responses do not end with the EOS the model "
            f"stops on ({tokenizer.eos_token!r}; cut at data.max_length={cfg.data.max_length}?): "
            "the model learns not to stop; raise data.max_length"
        )
    renderer = Renderer(tokenizer)
    probe = [{"role": "user", "content": "Hi?"}]
    head = renderer.chat(probe, add_generation_prompt=True)
    full = renderer.chat([*probe, {"role": "assistant", "content": "Hello."}])
    if not full.startswith(head):
        warnings.append(
            "the chat template renders the prompt differently for generation (with the "
            "generation prompt) than inside a whole conversation: training and sampling see "
            "other texts; fix model.chat_template"
        )
    for report in reports:
        if report.kept and report.truncated / report.kept > 0.5:
            warnings.append(
                f"{report.source}: {report.truncated} of {report.kept} rows are truncated: raise "
                "data.max_length / data.max_prompt_length"
            )
        dropped = sum(report.dropped.values())
        if report.rows and dropped / report.rows > 0.1:
            warnings.append(f"{report.source}: {dropped} of {report.rows} rows are dropped")
    return warnings
