"""`rlhf score RM DATA`: score a data file with a reward model trained by `stage=rm`.

Preference data (prompt/chosen/rejected, ranked, HH) gets a score per response and the pairwise
accuracy; prompt/completion or messages data gets one score per row."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from rlhf_cli.core.errors import DataError
from rlhf_cli.core.progress import console, summary_table
from rlhf_cli.core.quiet import quiet_libraries
from rlhf_cli.data.batches import collate_preference, move
from rlhf_cli.data.examples import Renderer, build_examples
from rlhf_cli.data.rows import detect_format, load_rows
from rlhf_cli.model.heads import load_reward_model, sequence_scores
from rlhf_cli.model.load import autocast, autocast_dtype, resolve_device


@torch.no_grad()
def score_file(
    rm: str, data: str, out: str | None = None, batch_size: int = 8, device: str = "auto"
) -> dict:
    quiet_libraries()
    dev = resolve_device(device)
    model, head, tokenizer, cfg = load_reward_model(rm, dev)
    amp = autocast_dtype(cfg.train.precision, dev)
    data_cfg = replace(cfg.data, path=data, eval_size=0.0, max_samples=None, format="auto")
    stats: Counter = Counter()
    rows = load_rows(data, name=None, split="train", on_bad_row="drop", stats=stats)
    if not rows:
        raise DataError(f"{data}: no rows to score")
    fmt = detect_format(set().union(*(r.keys() for r in rows)), data_cfg, rows[0])
    pairs = fmt in ("preference", "ranked", "hh")
    renderer = Renderer(tokenizer)
    if pairs:
        examples, report = build_examples(rows, data, data_cfg, renderer, "preference", stats)
    else:
        sft, report = build_examples(
            rows, data, data_cfg, renderer, "sft", stats, completion_only=False
        )
        examples = [
            {"prompt_ids": [], "responses_ids": [ex["input_ids"]], "margin": None} for ex in sft
        ]
    console.print("data: " + report.line())
    results = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = move(collate_preference(chunk, tokenizer.pad_token_id, tokenizer.eos_token_id), dev)
        with autocast(amp, dev):
            scores = sequence_scores(model, head, batch).float().cpu()
        for b, ex in enumerate(chunk):
            results.append(
                [float(scores[batch["index"][b, k]]) for k in range(len(ex["responses_ids"]))]
            )
    summary: dict = {"reward model": str(rm), "rows scored": len(results)}
    if pairs:
        summary["mean chosen"] = sum(r[0] for r in results) / len(results)
        summary["mean rejected"] = sum(r[-1] for r in results) / len(results)
        summary["accuracy"] = sum(r[0] > r[-1] for r in results) / len(results)
    else:
        summary["mean score"] = sum(r[0] for r in results) / len(results)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with Path(out).open("w") as fh:
            for r in results:
                fh.write(json.dumps({"scores": r} if pairs else {"score": r[0]}) + "\n")
        summary["written to"] = out
    summary_table(f"rlhf score {data}", summary)
    return summary
