"""Packing on a CPU: training tokens/s of padded, grouped and packed batches (`make
bench-packing`; offline).

SmolLM2-135M-Instruct (its offline copy, `rlhf fetch-model smollm2-135m`), LoRA r=16 on every
linear layer, fp32, unquantized base, one thread per core of this machine. Data: rows whose
response lengths vary as real instruction data's do, log-uniform from 4 to 400 tokens (a word
to a page; median ~40), responses built from the shipped texts, rendered with the model's chat
template, data.max_length=512.

Modes, each over the same examples (STEPS micro-batches of 8, forward + backward of the
stage's loss; dpo: pairs whose chosen and rejected lengths are drawn apart, the reference
forward included):
- padded: each micro-batch padded to its longest row (train.pad_to_multiple_of=8), the default
  (dpo: with its shared-prompt layout, the default)
- grouped: padded, the examples in data.group_by_length's order (same examples, other
  micro-batches)
- packed, mask: train.packing=true, train.packing_attention=mask: one forward over the packed
  rows, SDPA with the block-diagonal mask transformers builds from the position ids
- packed, varlen: train.packing_attention=varlen: one forward over the packed rows whose
  attention runs SDPA on each example alone (no mask, no attention across examples)
- packed, slices: train.packing_attention=slices: one forward per example (no mask, no padding)
- packed, flex: the mask path with attn_implementation=flex_attention (a compiled document
  mask), where it runs here

Interleaved: every repeat runs each mode once (A B C ... A B C ...), the matmul peak measured
before and after; tokens/s = real tokens (no padding) over the time, median over repeats.

    python scripts/bench_packing.py [--repeats 3] [--steps 4] [--out runs/bench-packing.md]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

from bench_common import matmul_peak_gflops  # noqa: E402

MICRO = 8


def words_from_shipped() -> list[str]:
    from rlhf_cli.data.rows import builtin_path

    text = " ".join(
        json.loads(line).get("completion", "")
        for line in builtin_path("sft").read_text().split("\n")
        if line
    )
    return text.split()


def make_rows(n: int, seed: int, pairs: bool) -> list[dict]:
    rng = random.Random(seed)
    words = words_from_shipped()

    def answer() -> str:
        k = int(math.exp(rng.uniform(math.log(3), math.log(300))))  # ~1.3 tokens a word
        start = rng.randrange(len(words))
        return " ".join(words[(start + i) % len(words)] for i in range(k))

    rows = []
    for i in range(n):
        prompt = f"Question {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))
        if pairs:
            rows.append({"prompt": prompt, "chosen": answer(), "rejected": answer()})
        else:
            rows.append({"prompt": prompt, "completion": answer()})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-packing.md")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--only", default="", help="run only the modes whose name contains this")
    args = ap.parse_args()

    import torch

    from rlhf_cli.compose import compose_checked
    from rlhf_cli.core.quiet import quiet_libraries
    from rlhf_cli.data.batches import move, real_tokens
    from rlhf_cli.data.examples import load_datasets
    from rlhf_cli.model.kernels import register_varlen
    from rlhf_cli.model.load import load_model, load_tokenizer, resolve_device
    from rlhf_cli.stages import stage_class

    quiet_libraries()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    n = MICRO * args.steps
    for name, pairs in (("sft", False), ("pairs", True)):
        (tmp / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in make_rows(n, 0, pairs))
        )

    def compose(stage: str, *extra: str):
        data = tmp / ("sft.jsonl" if stage == "sft" else "pairs.jsonl")
        return compose_checked(
            [
                f"stage={stage}",
                "model=smollm2-135m",
                "quant=none",
                f"data.path={data}",
                "data.eval_size=0",
                "data.max_length=512",
                f"train.micro_batch_size={MICRO}",
                "peft.dropout=0",
                "ref.precompute=false",
                *extra,
            ]
        )

    device = resolve_device("cpu")
    base = compose("sft")
    tokenizer = load_tokenizer(base.model)
    model = load_model(base, device, tokenizer)
    model.train()

    def examples_of(cfg, kind: str) -> list:
        train, _, _ = load_datasets(cfg.data, tokenizer, kind, 0)
        return train

    sft_examples = examples_of(base, "sft")
    pair_cfg = compose("dpo")
    pair_examples = examples_of(pair_cfg, "preference")

    def stage_for(stage: str, *extra: str):
        cfg = compose(stage, *extra)
        return stage_class(stage)(cfg, model, tokenizer, device, None)

    def grouped(examples: list) -> list:
        from rlhf_cli.data.batches import example_length
        from rlhf_cli.trainer.state import grouped_by_length

        order = list(range(len(examples)))
        lengths = [example_length(ex) for ex in examples]
        return [examples[i] for i in grouped_by_length(order, lengths, MICRO, 0, 42)]

    mask, slices = "train.packing_attention=mask", "train.packing_attention=slices"
    varlen = "train.packing_attention=varlen"
    modes: dict[str, tuple] = {
        "sft padded": (stage_for("sft"), sft_examples, MICRO),
        "sft grouped": (stage_for("sft"), grouped(sft_examples), MICRO),
        "sft packed, mask": (stage_for("sft", "train.packing=true", mask), sft_examples, MICRO),
        "sft packed, varlen": (stage_for("sft", "train.packing=true", varlen), sft_examples, MICRO),
        "sft packed, slices": (stage_for("sft", "train.packing=true", slices), sft_examples, MICRO),
        "dpo padded, shared prompt": (stage_for("dpo"), pair_examples, MICRO),
        "dpo packed, mask": (stage_for("dpo", "train.packing=true", mask), pair_examples, MICRO),
        "dpo packed, varlen": (
            stage_for("dpo", "train.packing=true", varlen),
            pair_examples,
            MICRO,
        ),
        "dpo packed, slices": (
            stage_for("dpo", "train.packing=true", slices),
            pair_examples,
            MICRO,
        ),
    }

    def run(stage, examples: list, size: int) -> tuple[float, int, int]:
        tokens = positions = 0
        t0 = time.perf_counter()
        for i in range(0, len(examples), size):
            batch = stage.collate(examples[i : i + size])
            tokens += real_tokens(batch)
            positions += batch["input_ids"].numel()
            if hasattr(stage, "begin_step"):
                stage.begin_step(examples[i : i + size])
            loss, _ = stage.loss(move(batch, device))
            loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, tokens, positions

    modes = {k: v for k, v in modes.items() if args.only in k}
    flex_error = None
    if not args.no_flex:
        try:
            model.set_attn_implementation("flex_attention")
            stage = modes["sft packed, mask"][0]
            run(stage, sft_examples[:MICRO], MICRO)  # compiles
            modes["sft packed, flex"] = (stage, sft_examples, MICRO)
        except Exception as err:  # noqa: BLE001 - reported in the table
            flex_error = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        finally:
            model.set_attn_implementation("sdpa")

    def attention(name: str) -> str:
        if name.endswith("flex"):
            return "flex_attention"
        return register_varlen() if name.endswith("varlen") else "sdpa"

    for name, (stage, examples, size) in modes.items():  # warm-up: one micro-batch each
        model.set_attn_implementation(attention(name))
        run(stage, examples[:size], size)
        model.set_attn_implementation("sdpa")

    results: dict[str, list[float]] = {name: [] for name in modes}
    shape: dict[str, tuple[int, int]] = {}
    peaks = [matmul_peak_gflops("fp32", "cpu")]
    for r in range(args.repeats):
        for name, (stage, examples, size) in modes.items():
            model.set_attn_implementation(attention(name))
            seconds, tokens, positions = run(stage, examples, size)
            model.set_attn_implementation("sdpa")
            results[name].append(tokens / seconds)
            shape[name] = (tokens, positions)
            print(f"repeat {r + 1} {name}: {tokens / seconds:.0f} tokens/s", flush=True)
        peaks.append(matmul_peak_gflops("fp32", "cpu"))

    lines = [
        "# Packing on a CPU: SmolLM2-135M-Instruct, LoRA, fp32, forward + backward",
        "",
        f"{args.steps} micro-batches of {MICRO}, response lengths log-uniform 4-400 tokens; "
        f"median of {args.repeats} interleaved repeats; matmul peak "
        + " / ".join(f"{p:.0f}" for p in peaks)
        + " GFLOP/s (before, after each repeat); torch "
        + torch.__version__,
        "",
        "| mode | real tokens | forward positions | padding | tokens/s | vs padded |",
        "|---|---|---|---|---|---|",
    ]
    for name in modes:
        tokens, positions = shape[name]
        rate = statistics.median(results[name])
        key = "sft padded" if name.startswith("sft") else "dpo padded, shared prompt"
        ref = statistics.median(results[key]) if key in results else float("nan")
        lines.append(
            f"| {name} | {tokens} | {positions} | {1 - tokens / positions:.0%} | "
            f"{rate:.0f} | {rate / ref:.2f}x |"
        )
    if flex_error:
        lines += ["", f"packed, flex did not run here: {flex_error}"]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
