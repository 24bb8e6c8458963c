"""Benchmark rlhf-cli against TRL: same models, data, batch and LoRA settings, side by side.

    python scripts/bench.py                                   # the full grid (long)
    python scripts/bench.py --stages dpo --sizes small --modes lora --precisions fp32 --steps 3
    python scripts/bench.py --out bench.md                    # also bench.md + bench.json

`make bench` (the toys) and `make bench-real` (SmolLM2-135M-Instruct) run it with the venv's
python (installing the `bench` extra, i.e. TRL, first).

What it does:
- `--sizes smollm2`: the real model, rlhf_cli.real's offline copy (`rlhf fetch-model
  smollm2-135m`), on the shipped question/answer pairs in the conversational format, which both
  tools render with the model's own chat template.
- Builds two random-init Llama models offline and deterministically into the cache directory
  (RLHF_CLI_CACHE or ~/.cache/rlhf_cli, subdirectories bench-*): `small` (hidden 256, 4 layers,
  vocab 2048, ~4.2M parameters) and `medium` (hidden 512, 8 layers, vocab 4096, ~30M), each with
  a ByteLevel BPE tokenizer trained on the shipped data (rlhf_cli/assets), like `model=tiny`.
  The tokenizers have NO chat template, so both tools see plain strings: ours concatenates
  prompt and response raw, TRL tokenizes prompt + response as one string. The prompt never ends
  in whitespace and each response starts with a space, so both give the same token sequence
  (<s> prompt response </s>); the script checks this on every row before it runs anything.
- Builds one preference set (prompt ~50 words, chosen/rejected ~65 words) from the shipped
  texts; SFT trains on prompt + chosen (loss on the response), RM and DPO on the pairs.
- Runs each (tool, stage, size, mode, precision) in its own subprocess, `--warmup` steps then
  `--steps` timed steps, with the same settings: 4 pairs (or 4 sequences for SFT) per step, no
  accumulation, max_length 256, LoRA r=16 alpha=32 dropout 0.05 on all linear layers, AdamW
  lr 1e-4 at a constant schedule, gradient clipping at 1.0, no eval, no checkpoints during the
  timed steps, no gradient checkpointing. QLoRA = a 4-bit NF4 base (double quantization) whose
  compute dtype follows the precision (float32 or bfloat16), for both tools.
  Variant `best` (both tools): bf16 autocast, and for DPO reference log-probs precomputed once
  (ours: ref.precompute=true; TRL: precompute_ref_log_probs=True).
- `--data spread` (`make bench-spread`): lengths spread as real instruction data's are, prompts
  of 8-50 words, each response log-uniform from 3 to 380 words (about 4 to 500 tokens, median
  ~40), rows up to 1024 tokens (none cut: checked). Variant `packed`: ours with train.packing
  (train.packing_attention=varlen), TRL at its best on such data: SFT packing=True (best-fit
  decreasing, padding-free) and padded, RM and DPO padded (TRL has no packing for them; its DPO
  padding_free is disabled in 1.16). Both tools take the rows in the file's order (ours
  train.shuffle=false, TRL a sequential sampler), so padded runs step on the same examples.
- GRPO (ours and TRL's GRPOTrainer, no vLLM): BATCH prompts x 4 samples of up to 64 new tokens
  per step (reward: rlhf_cli.rewards:length_target), KV-cache sampling with model.generate; the
  row also shows generation tokens/s (sampled tokens over the generate() time, median over the
  timed steps) and the share of the step spent generating.
- Pairs: each configuration runs as (ours, TRL) back to back between two measurements of the
  matmul peak; a pair whose peak moved by more than --peak-drift is thrown away and run again
  (at most --retries extra pairs), and the header lists every thrown pair.
- Step time = time between the ends of consecutive optimizer steps (everything the loop does per
  step: data, forward, backward, optimizer, logging), over the timed steps. Tokens = non-padding
  tokens (attention mask) of the step's batch (chosen + rejected rows for RM/DPO).
- Peak memory: the child's peak RSS (getrusage); on CUDA also torch.cuda.max_memory_allocated.
- Model FLOP/s = tokens/s x FLOPs/token, FLOPs/token = 6 N (forward + backward) plus 2 N when
  DPO runs the reference forward every step, N = parameters of the linear layers the tokens go
  through (attention + MLP, plus the LM head except for RM); attention scores are not counted.
  The fraction is of the peak torch.matmul rate measured here (2048 x 2048, fp32 or bf16).

TRL settings that differ from its defaults, to match ours: gradient_checkpointing=False,
bf16 only when asked (and then the base loaded in bf16, as ours stores a frozen base in a bf16
run; fp32 otherwise), disable_dropout=False (TRL turns dropout off for DPO/RM by default),
lr_scheduler_type=constant, logging/saving/eval off, tqdm off; in fp32 QLoRA runs its trainable
weights are cast back to fp32 (TRL makes them bf16 for quantized models, which breaks its RM
without autocast). Everything else (fused AdamW, fused LM head for DPO/SFT log-probs, its
per-step metrics, bf16 adapters in bf16 QLoRA runs) is TRL's own default behaviour.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "rlhf_cli" / "assets"
# Fixed list (not a glob), so the benchmark models do not change when other data ships.
CORPUS_FILES = ("sft.jsonl", "preference.jsonl", "chat.jsonl", "hh.jsonl", "prompts.jsonl")
RESULT_PREFIX = "BENCH_RESULT "
VERSION = 2

SIZES = {
    "small": dict(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
    "medium": dict(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
    ),
}
# Real checkpoints (rlhf_cli.real's offline copies): their own tokenizer and chat template.
REAL = {"smollm2": "smollm2-135m"}
ALL_SIZES = (*SIZES, *REAL)
STAGES = ("sft", "rm", "dpo", "grpo")
MODES = ("lora", "qlora")
PRECISIONS = ("fp32", "bf16")
TOOLS = ("ours", "trl")
VARIANTS = ("default", "best", "packed")
DATASETS = ("short", "spread")

# The shared training settings (both tools).
BATCH = 4
MAX_LENGTH = 256
MAX_PROMPT_LENGTH = 128
LORA = dict(r=16, alpha=32, dropout=0.05)
LR = 1e-4
# --data spread: lengths spread as real instruction data's are, a word to a page: prompts of
# 8-50 words, responses log-uniform from 3 to 380 words (about 4 to 500 tokens; median ~35
# words), each response of a pair drawn apart; rows up to SPREAD_MAX_LENGTH tokens.
SPREAD_PROMPT_WORDS = (8, 50)
SPREAD_RESPONSE_WORDS = (3, 380)
SPREAD_MAX_LENGTH = 1024
# TRL's packed SFT (packing=True, best-fit decreasing, padding-free) steps on this many rows of
# max_length tokens (one row: ~1000 tokens a step; ours: BATCH examples, ~600, packed): tokens/s
# compares the two, steps/s does not.
TRL_PACKED_ROWS = 1
# Ours, packed: SDPA on each example alone inside one forward (README "Packing").
PACKING_ATTENTION = "varlen"
GROUP = 4  # grpo: samples per prompt
ROLLOUT_TOKENS = 64  # grpo: longest sampled response
SEED = 42
DATA_SEED = 1234


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# assets: corpus, models, data


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps([VERSION, *parts]).encode()).hexdigest()[:12]


def _build_once(target: Path, builder) -> Path:
    """Build `target` with `builder(tmp_dir)` unless it is complete (its `.complete` marker);
    atomic and locked (rlhf_cli.tiny.build_once)."""
    from rlhf_cli.tiny import build_once

    def build(tmp: Path) -> None:
        builder(tmp)
        (tmp / ".complete").write_text("")

    return build_once(target, build, complete=lambda p: (p / ".complete").is_file())


def model_dir(size: str) -> Path:
    """The benchmark model of this size, built on first use (a real one: its offline copy)."""
    from rlhf_cli.tiny import SPECIAL_TOKENS, cache_root, corpus

    if size in REAL:
        from rlhf_cli.real import fetch

        return fetch(REAL[size])

    recipe = SIZES[size]
    texts = corpus(CORPUS_FILES)
    target = cache_root() / f"bench-{size}-{_digest(recipe, SPECIAL_TOKENS, texts)}"
    return _build_once(target, lambda out: _build_model(out, recipe, texts))


def _build_model(out: Path, recipe: dict, texts: list[str]) -> None:
    from transformers.utils import logging as hf_logging

    from rlhf_cli.tiny import build_llama

    hf_logging.disable_progress_bar()
    # No chat template: both tools treat the data as plain strings (see the module docstring).
    build_llama(out, texts, dict(recipe, max_position_embeddings=1024, seed=0), None)


def shape(size: str) -> dict:
    """The model's shape: the recipe of a toy, the config.json of a real checkpoint."""
    if size in REAL:
        return json.loads((model_dir(size) / "config.json").read_text())
    return dict(SIZES[size], tie_word_embeddings=False)


def linear_params(size: str, with_lm_head: bool) -> int:
    """Parameters of the linear layers a token goes through (for the FLOP estimate)."""
    r = shape(size)
    h, i, layers = r["hidden_size"], r["intermediate_size"], r["num_hidden_layers"]
    head_dim = r.get("head_dim") or h // r["num_attention_heads"]
    kv = r["num_key_value_heads"] * head_dim
    q = r["num_attention_heads"] * head_dim
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * i
    return layers * per_layer + (r["vocab_size"] * h if with_lm_head else 0)


def total_params(size: str) -> int:
    r = shape(size)
    h, layers = r["hidden_size"], r["num_hidden_layers"]
    norms = (2 * layers + 1) * h
    embeddings = 0 if r.get("tie_word_embeddings") else r["vocab_size"] * h
    return linear_params(size, True) + embeddings + norms


def _word_stream(texts: list[str], rng: random.Random):
    """Words of the texts, in a shuffled (seeded) order of texts, forever."""
    order = list(texts)
    while True:
        rng.shuffle(order)
        for text in order:
            yield from text.split()


def limits(dataset: str) -> tuple[int, int]:
    """(max_length, max_prompt_length) of a data set: no row of it is cut at either."""
    return (SPREAD_MAX_LENGTH if dataset == "spread" else MAX_LENGTH), MAX_PROMPT_LENGTH


def _spread_texts(n_rows: int, streams: dict) -> list[dict]:
    """n_rows prompt/chosen/rejected of --data spread's lengths (SPREAD_*_WORDS), words drawn
    from `streams` (one word iterator per field); each response starts with a space."""
    rng = random.Random(DATA_SEED + 10)
    lo, hi = (math.log(n) for n in SPREAD_RESPONSE_WORDS)

    def words(kind: str, n: int) -> str:
        return " ".join(next(streams[kind]) for _ in range(n))

    def response(kind: str) -> str:
        return " " + words(kind, int(math.exp(rng.uniform(lo, hi))))

    return [
        {
            "prompt": words("prompt", rng.randint(*SPREAD_PROMPT_WORDS)),
            "chosen": response("chosen"),
            "rejected": response("rejected"),
        }
        for _ in range(n_rows)
    ]


def _streams(prompts: list[str], good: list[str], bad: list[str]) -> dict:
    return {
        "prompt": _word_stream(prompts, random.Random(DATA_SEED + 1)),
        "chosen": _word_stream(good, random.Random(DATA_SEED + 2)),
        "rejected": _word_stream(bad, random.Random(DATA_SEED + 3)),
    }


def data_files(n_rows: int, dataset: str = "short") -> dict[str, Path]:
    """{"pairs": prompt/chosen/rejected JSONL, "sft": prompt/completion JSONL}, built once."""
    from rlhf_cli.tiny import cache_root

    rows = [
        json.loads(line)
        for name in ("preference.jsonl", "sft.jsonl")
        for line in (ASSETS / name).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    prompts = [r["prompt"] for r in rows]
    good = [r.get("chosen") or r.get("completion") for r in rows]
    bad = [r["rejected"] for r in rows if "rejected" in r]
    spread = dataset == "spread"
    extra = [SPREAD_PROMPT_WORDS, SPREAD_RESPONSE_WORDS] if spread else []
    target = cache_root() / f"bench-data-{_digest(n_rows, DATA_SEED, prompts, good, bad, *extra)}"

    def build(out: Path) -> None:
        rng = random.Random(DATA_SEED)
        streams = _streams(prompts, good, bad)

        def words(kind: str, n: int) -> str:
            return " ".join(next(streams[kind]) for _ in range(n))

        # The prompt ends on a word, each response starts with a space: no BPE merge across
        # the boundary, so raw concatenation and joint tokenization agree.
        if spread:
            pairs = _spread_texts(n_rows, streams)
        else:
            pairs = [
                {
                    "prompt": words("prompt", rng.randint(45, 55)),
                    "chosen": " " + words("chosen", rng.randint(55, 75)),
                    "rejected": " " + words("rejected", rng.randint(55, 75)),
                }
                for _ in range(n_rows)
            ]
        with (out / "pairs.jsonl").open("w", encoding="utf-8") as fh:
            for p in pairs:
                fh.write(json.dumps(p) + "\n")
        with (out / "sft.jsonl").open("w", encoding="utf-8") as fh:
            for p in pairs:
                fh.write(json.dumps({"prompt": p["prompt"], "completion": p["chosen"]}) + "\n")
        with (out / "prompts.jsonl").open("w", encoding="utf-8") as fh:
            for p in pairs:
                fh.write(json.dumps({"prompt": p["prompt"]}) + "\n")

    _build_once(target, build)
    return {name: target / f"{name}.jsonl" for name in ("pairs", "sft", "prompts")}


def real_data_files(n_rows: int, dataset: str = "short") -> dict[str, Path]:
    """The shipped short question/answer pairs (rlhf_cli/assets/preference.jsonl, cycled to
    n_rows; --data spread: rows of its lengths, words drawn from those pairs) in the
    conversational format both tools read and render with the model's own chat template:
    {"pairs": prompt/chosen/rejected, "sft": prompt/completion, "prompts": prompt}."""
    from rlhf_cli.tiny import cache_root

    source = (ASSETS / "preference.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in source.splitlines() if line.strip()]
    extra = []
    if dataset == "spread":
        extra = [SPREAD_PROMPT_WORDS, SPREAD_RESPONSE_WORDS]
        streams = _streams(*([r[k] for r in rows] for k in ("prompt", "chosen", "rejected")))
        rows = [{k: v.strip() for k, v in row.items()} for row in _spread_texts(n_rows, streams)]
    target = cache_root() / f"bench-realdata-{_digest(n_rows, source, *extra)}"

    def build(out: Path) -> None:
        def user(text):
            return [{"role": "user", "content": text}]

        def assistant(text):
            return [{"role": "assistant", "content": text}]

        picked = [rows[i % len(rows)] for i in range(n_rows)]
        files = {
            "pairs": [
                {
                    "prompt": user(r["prompt"]),
                    "chosen": assistant(r["chosen"]),
                    "rejected": assistant(r["rejected"]),
                }
                for r in picked
            ],
            "sft": [
                {"prompt": user(r["prompt"]), "completion": assistant(r["chosen"])} for r in picked
            ],
            "prompts": [{"prompt": user(r["prompt"])} for r in picked],
        }
        for name, items in files.items():
            with (out / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
                for item in items:
                    fh.write(json.dumps(item) + "\n")

    _build_once(target, build)
    return {name: target / f"{name}.jsonl" for name in ("pairs", "sft", "prompts")}


def real_lengths(model_path: Path, pairs_path: Path) -> dict:
    """Mean tokens of the rendered prompt (chat template, generation prompt) and responses."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    lengths = {"prompt": [], "chosen": [], "rejected": []}
    for line in pairs_path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        head = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        n_head = len(tok(head, add_special_tokens=False)["input_ids"])
        lengths["prompt"].append(n_head)
        for key in ("chosen", "rejected"):
            full = tok.apply_chat_template(row["prompt"] + row[key], tokenize=False)
            lengths[key].append(len(tok(full, add_special_tokens=False)["input_ids"]) - n_head)
    return _summary(lengths)


def _summary(lengths: dict[str, list[int]]) -> dict:
    """Mean tokens of each field, and the range and median of the responses'."""
    out = {k: round(statistics.mean(v), 1) for k, v in lengths.items()}
    both = lengths["chosen"] + lengths["rejected"]
    out["response"] = f"{min(both)}-{statistics.median(both):.0f}-{max(both)}"
    out["longest"] = max(p + c for p, c in zip(lengths["prompt"] * 2, both))
    return out


def check_same_tokens(model_path: Path, pairs_path: Path, max_length: int = MAX_LENGTH) -> dict:
    """Ours: tok(prompt) + tok(response, no specials) + EOS; TRL: tok(prompt + response + EOS).
    Raises if any row differs or would be cut at max_length; returns token statistics."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    assert not getattr(tok, "chat_template", None), "benchmark tokenizers must have no template"
    lengths = {"prompt": [], "chosen": [], "rejected": []}
    for line in pairs_path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        prompt_ids = tok(row["prompt"])["input_ids"]
        lengths["prompt"].append(len(prompt_ids))
        for key in ("chosen", "rejected"):
            ours = prompt_ids + tok(row[key], add_special_tokens=False)["input_ids"]
            ours.append(tok.eos_token_id)
            theirs = tok(row["prompt"] + row[key] + tok.eos_token)["input_ids"]
            if ours != theirs:
                raise RuntimeError(f"{model_path.name}: tools would see different tokens: {row}")
            lengths[key].append(len(ours) - len(prompt_ids))
            if len(ours) > max_length or len(prompt_ids) > MAX_PROMPT_LENGTH:
                raise RuntimeError(f"{model_path.name}: a row would be truncated: {len(ours)}")
    return _summary(lengths)


# ---------------------------------------------------------------------------------------------
# matmul peak


def matmul_peak_gflops(dtype_name: str, device: str, n: int = 2048, reps: int = 5) -> float:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(2):
        torch.matmul(a, b)
    sync()
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


# ---------------------------------------------------------------------------------------------
# child: one run


def _rate(begins: list[float], ends: list[float], tokens: list[int], warmup: int) -> dict:
    """Steps/s and tokens/s over the steps after `warmup`, from step begin/end timestamps."""
    n = len(ends) - warmup
    if n < 1:
        raise RuntimeError(f"only {len(ends)} steps ran, fewer than warmup+1")
    start = ends[warmup - 1] if warmup > 0 else begins[0]
    span = ends[-1] - start
    timed_tokens = sum(tokens[warmup : len(ends)])
    step_times = [e - b for b, e in zip(begins[warmup:], ends[warmup:])]
    return {
        "steps": n,
        "steps_per_s": n / span,
        "tokens_per_s": timed_tokens / span,
        "tokens_per_step": timed_tokens / n,
        "step_time_median_s": statistics.median(step_times),
    }


def _peak_memory(device: str) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": (rss if sys.platform == "darwin" else rss * 1024) / 2**20}
    if device.startswith("cuda"):
        import torch

        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_ours(spec: dict, run_dir: Path) -> dict:
    from omegaconf import OmegaConf

    import rlhf_cli.train as train_mod
    from rlhf_cli.cli import compose_checked
    from rlhf_cli.loop import Stage
    from rlhf_cli.progress import Reporter

    begins: list[float] = []
    ends: list[float] = []
    tokens: list[int] = []
    counted: dict = {}
    # Timing by wrapping, not editing, the loop: a step begins when train_step is called and
    # ends when the loop reports it (after the update, before eval/checkpoint checks).
    train_step, report_step = Stage.train_step, Reporter.step
    count_parameters = train_mod.count_parameters

    def timed_train_step(self, examples, updater):
        begins.append(time.perf_counter())
        record, n = train_step(self, examples, updater)
        tokens.append(int(n))
        return record, n

    def timed_report_step(self, step, record, log):
        report_step(self, step, record, log)
        ends.append(time.perf_counter())

    def counting(model):
        counted["trainable"], counted["total"] = count_parameters(model)
        return counted["trainable"], counted["total"]

    from rlhf_cli.online import OnlineStage

    online_step = OnlineStage.train_step

    def timed_online_step(self, examples, updater):
        begins.append(time.perf_counter())
        record, n = online_step(self, examples, updater)
        tokens.append(int(n))
        return record, n

    Stage.train_step, Reporter.step = timed_train_step, timed_report_step
    OnlineStage.train_step = timed_online_step
    train_mod.count_parameters = counting

    stage = spec["stage"]
    qlora = spec["mode"] == "qlora"
    online = []
    if stage == "grpo":
        # BATCH prompts x GROUP samples of up to ROLLOUT_TOKENS tokens, one update per step.
        online = [
            f"stage.rollout_batch_size={BATCH}",
            f"stage.group_size={GROUP}",
            f"stage.max_new_tokens={ROLLOUT_TOKENS}",
            f"stage.minibatch_size={BATCH * GROUP}",
            "reward.fn=rlhf_cli.rewards:length_target",
            f"rollout.engine={spec.get('engine', 'hf')}",
        ]
    overrides = [
        f"stage={stage}",
        *online,
        f"model.name_or_path={spec['model']}",
        f"data.path={spec['data']}",
        "data.eval_size=0",
        f"data.max_length={spec['max_length']}",
        f"data.max_prompt_length={spec['max_prompt_length']}",
        "peft=lora",
        f"peft.r={LORA['r']}",
        f"peft.alpha={LORA['alpha']}",
        f"peft.dropout={LORA['dropout']}",
        "peft.target_modules=[all-linear]",
        f"quant={'nf4' if qlora else 'none'}",
        "optim=adamw",
        f"optim.lr={LR}",
        "optim.scheduler=constant",
        "optim.warmup_ratio=0",
        "optim.warmup_steps=0",
        "optim.max_grad_norm=1.0",
        f"train.precision={spec['precision']}",
        f"train.micro_batch_size={BATCH}",
        "train.grad_accum=1",
        f"train.max_steps={spec['warmup'] + spec['steps']}",
        "train.save_every=0",
        "train.eval_every=0",
        "train.gradient_checkpointing=false",
        f"train.packing={'true' if spec['packing'] else 'false'}",
        f"train.packing_attention={PACKING_ATTENTION}",
        # The file's order (random when it was built), as TRL's runs take it: both tools step
        # on the same examples (TRL's packed SFT: the same examples, packed its own way).
        f"train.shuffle={'true' if stage == 'grpo' else 'false'}",
        f"train.seed={SEED}",
        f"device={spec['device']}",
        f"run_dir={run_dir}",
    ]
    if qlora:
        overrides += [
            "quant.double_quant=true",
            f"quant.compute_dtype={'bfloat16' if spec['precision'] == 'bf16' else 'float32'}",
        ]
    if stage == "dpo":
        overrides.append(f"ref.precompute={'true' if spec['precompute'] else 'false'}")
    cfg = compose_checked(overrides)
    t0 = time.perf_counter()
    train_mod.run(cfg, OmegaConf.to_yaml(OmegaConf.structured(cfg)), run_dir)
    out = _rate(begins, ends, tokens, spec["warmup"])
    out["setup_s"] = (begins[0] - t0) if begins else None
    out.update(counted)
    metrics = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    train_rows = [m for m in metrics if m.get("split") == "train"]
    losses = [m["loss"] for m in train_rows if "loss" in m]
    if losses:
        out["loss_first"], out["loss_last"] = losses[0], losses[-1]
    rates = [m["gen_tokens_per_s"] for m in train_rows[spec["warmup"] :] if "gen_tokens_per_s" in m]
    if rates:
        out["gen_tokens_per_s"] = statistics.median(rates)
        rollout_s = [m["rollout_s"] for m in train_rows[spec["warmup"] :]]
        out["rollout_fraction"] = statistics.median(rollout_s) * out["steps_per_s"]
        syncs = [m["rollout/sync_s"] for m in train_rows[spec["warmup"] :] if "rollout/sync_s" in m]
        if syncs:
            out["sync_s"] = statistics.median(syncs)
    return out


def run_trl(spec: dict, run_dir: Path) -> dict:
    import torch

    try:
        import trl
    except ImportError as err:
        raise RuntimeError("TRL is not installed: pip install -e '.[bench]'") from err
    from datasets import Dataset, disable_progress_bars
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, TrainerCallback
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.set_verbosity_error()
    stage, precision = spec["stage"], spec["precision"]
    bf16 = precision == "bf16"
    device = spec["device"]
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line]
    dataset = Dataset.from_list(rows)

    begins: list[float] = []
    ends: list[float] = []
    tokens: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    common = dict(
        output_dir=str(run_dir),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        max_steps=spec["warmup"] + spec["steps"],
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        gradient_checkpointing=False,
        bf16=bf16,
        fp16=False,
        use_cpu=device == "cpu",
        seed=SEED,
        max_length=spec["max_length"],
        # As ours: a bf16 run stores the frozen base in bf16 (adapters stay fp32).
        model_init_kwargs={"dtype": "bfloat16" if bf16 else "float32", "device_map": {"": device}},
        dataloader_num_workers=0,
    )
    lora = dict(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules="all-linear",
    )
    quant = None
    if spec["mode"] == "qlora":
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32,
        )
    if stage == "sft" and spec["packing"]:
        # Best-fit decreasing into rows of max_length, padding-free (TRL turns it on with bfd):
        # one flat sequence a step, position ids restarting per example.
        packed = dict(common, per_device_train_batch_size=TRL_PACKED_ROWS)
        trainer_cls = trl.SFTTrainer
        args = trl.SFTConfig(**packed, packing=True, packing_strategy="bfd")
        peft_config = LoraConfig(task_type="CAUSAL_LM", **lora)
    elif stage == "sft":
        trainer_cls, args = trl.SFTTrainer, trl.SFTConfig(**common, packing=False)
        peft_config = LoraConfig(task_type="CAUSAL_LM", **lora)
    elif stage == "rm":
        trainer_cls = trl.RewardTrainer
        args = trl.RewardConfig(**common, disable_dropout=False)
        peft_config = LoraConfig(task_type="SEQ_CLS", **lora)
    elif stage == "dpo":
        trainer_cls = trl.DPOTrainer
        # Dropout off in the policy: TRL's default, and ours (stage.dropout=false).
        args = trl.DPOConfig(
            **common,
            beta=0.1,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=bool(spec["precompute"]),
        )
        peft_config = LoraConfig(task_type="CAUSAL_LM", **lora)
    else:
        # As ours: BATCH prompts x GROUP samples of up to ROLLOUT_TOKENS tokens, one update on
        # all of them per step (no reuse: num_iterations 1), KL (k3) to the adapter-off base at
        # beta 0.04, token-mean loss (TRL's "dapo", ours token_mean), std-scaled group
        # advantages, dropout off (both tools' default), plain model.generate (no vLLM).
        trainer_cls = trl.GRPOTrainer
        grpo = {k: v for k, v in common.items() if k != "max_length"}
        grpo["per_device_train_batch_size"] = BATCH * GROUP
        args = trl.GRPOConfig(
            **grpo,
            num_generations=GROUP,
            steps_per_generation=1,
            num_iterations=1,
            max_completion_length=ROLLOUT_TOKENS,
            beta=0.04,
            loss_type="dapo",
            temperature=1.0,
            log_completions=False,
            # scripts/bench_rollout.py: vLLM in the trainer's process (colocate), its KV cache a
            # share of the device's memory (on a CPU: of the host's RAM).
            **(
                dict(
                    use_vllm=True,
                    vllm_mode="colocate",
                    vllm_gpu_memory_utilization=spec.get("vllm_memory", 0.1),
                    vllm_enable_sleep_mode=False,
                )
                if spec.get("engine") == "vllm"
                else {}
            ),
        )
        peft_config = LoraConfig(task_type="CAUSAL_LM", **lora)

    generation: dict[str, list] = {"seconds": [], "tokens": []}

    class Counted(trainer_cls):  # counts the non-padding tokens of every step's batch
        if stage != "grpo":  # (GRPO's sampler repeats each prompt for its group)

            def _get_train_sampler(self, train_dataset=None):
                # The file's order, as ours (train.shuffle=false): the same examples a step.
                data = self.train_dataset if train_dataset is None else train_dataset
                return torch.utils.data.SequentialSampler(data)

        def training_step(self, model, inputs, *a, **k):
            if stage == "grpo":  # raw prompts: the tokens are counted after generation
                return super().training_step(model, inputs, *a, **k)
            mask = inputs.get("attention_mask")
            if mask is None and "position_ids" in inputs:  # padding-free: no padding at all
                mask = torch.ones_like(inputs["input_ids"])
            elif mask is None:
                mask = inputs["input_ids"] != self.processing_class.pad_token_id
            tokens.append(int(mask.sum()))
            return super().training_step(model, inputs, *a, **k)

        if stage == "grpo":

            def _generate(self, prompts):
                t = time.perf_counter()
                out = super()._generate(prompts)
                generation["seconds"].append(time.perf_counter() - t)
                return out

            def _generate_and_score_completions(self, inputs):
                out = super()._generate_and_score_completions(inputs)
                sampled = int(out["completion_mask"].sum())
                generation["tokens"].append(sampled)
                # Prompt + response tokens, as ours counts its rollouts.
                tokens.append(int(out["prompt_mask"].sum()) + sampled)
                return out

    extra = {}
    if stage == "grpo":
        from rlhf_cli.rewards import length_target

        def length_reward(prompts, completions, **kwargs):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return length_target(prompts, texts)

        extra["reward_funcs"] = length_reward

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    t0 = time.perf_counter()
    trainer = Counted(
        model=spec["model"],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        quantization_config=quant,
        callbacks=[Timer()],
        **extra,
    )
    model = trainer.model
    if quant is not None and not bf16:
        # TRL casts the trainable weights of a quantized model to bf16 (its QLoRA recipe). In an
        # fp32 run that leaves the RM's score head in bf16 under fp32 activations (a dtype error)
        # and the adapters in another precision than ours: cast them back to fp32.
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    trainer.train()
    out = _rate(begins, ends, tokens, spec["warmup"])
    out["setup_s"] = (begins[0] - t0) if begins else None
    out.update(trainable=trainable, total=total, trl_version=trl.__version__)
    if generation["seconds"]:
        w = spec["warmup"]
        rates = [n / t for n, t in zip(generation["tokens"][w:], generation["seconds"][w:])]
        out["gen_tokens_per_s"] = statistics.median(rates)
        out["rollout_fraction"] = statistics.median(generation["seconds"][w:]) * out["steps_per_s"]
    return out


def child_main(spec: dict) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{spec['tool']}-{spec['stage']}-"))
    try:
        result = (run_ours if spec["tool"] == "ours" else run_trl)(spec, run_dir / "run")
        result.update(_peak_memory(spec["device"]))
        result["ok"] = True
    except BaseException as err:  # reported in the table row, never fatal to the benchmark
        traceback.print_exc()
        message = " ".join(str(err).split()) or type(err).__name__
        result = {"ok": False, "error": f"{type(err).__name__}: {message}"[:300]}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


# ---------------------------------------------------------------------------------------------
# parent: the grid, the subprocesses, the table


def job_key(job: dict) -> tuple:
    return (
        job["tool"],
        job["stage"],
        job["size"],
        job["mode"],
        job["precision"],
        job["precompute"],
        job["packing"],
        job["packing_pair"],
    )


def pair_key(job: dict) -> tuple:
    """The runs that form one pair (ours, TRL): a configuration and its variant. `packed`
    pairs ours packed with TRL packed where TRL packs (sft) and with TRL's padded best run
    where it does not (rm, dpo)."""
    return (job["stage"], job["size"], job["mode"], precision_label(job), job["packing_pair"])


def plan(args) -> list[dict]:
    """Every run to make, deduplicated (for sft/rm `best` is just bf16). `packed` pairs are runs
    of their own, TRL's padded ones included (its run of the pair where TRL has no packing)."""
    jobs, seen = [], set()
    for stage in args.stages:
        for size in args.sizes:
            for mode in args.modes:
                configs = []
                if "default" in args.variants:
                    configs += [(p, False, "default") for p in args.precisions]
                if "best" in args.variants:
                    configs.append(("bf16", stage == "dpo", "best"))
                if "packed" in args.variants:
                    configs += [(p, stage == "dpo", "packed") for p in args.precisions]
                for tool in args.tools:
                    for precision, precompute, variant in configs:
                        packed = variant == "packed"
                        job = dict(
                            tool=tool,
                            stage=stage,
                            size=size,
                            mode=mode,
                            precision=precision,
                            precompute=precompute,
                            packing=packed and (tool == "ours" or stage == "sft"),
                            packing_pair=packed,
                            variant=variant,
                        )
                        extra = []
                        if packed and tool == "trl" and stage == "sft":
                            # TRL at its best may be padded: both in the pair.
                            extra = [dict(job, packing=False)]
                        for j in [job, *extra]:
                            if job_key(j) not in seen:
                                seen.add(job_key(j))
                                jobs.append(j)
    return jobs


def used(jobs: list[dict]) -> set[str]:
    """The precisions the jobs run at."""
    return {job["precision"] for job in jobs}


def run_child(job: dict, args, models: dict, data: dict) -> dict:
    max_length, max_prompt_length = limits(args.data)
    spec = dict(
        job,
        model=str(models[job["size"]]),
        data=str(data[{"sft": "sft", "grpo": "prompts"}.get(job["stage"], "pairs")]),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
    )
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=args.timeout,
            env=env,
            cwd=str(REPO),
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {args.timeout}s"}
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
    if result is None:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
        result = {"ok": False, "error": f"exit {proc.returncode}: {tail[0].strip()}"[:300]}
    if not result.get("ok") and args.verbose:
        log(proc.stderr[-4000:])
    result["wall_s"] = time.perf_counter() - t0
    return result


def combine(repeats: list[dict]) -> dict:
    """One result from the repeats of a run: the median run by steps/s (its rates), the
    highest peak memory of all, and every run's steps/s. Any failure fails the row."""
    failed = [r for r in repeats if not r.get("ok")]
    if failed:
        return failed[0]
    ordered = sorted(repeats, key=lambda r: r["steps_per_s"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    for key in ("peak_rss_mb", "cuda_peak_mb"):
        if key in out:
            out[key] = max(r[key] for r in repeats)
    out["steps_per_s_runs"] = [round(r["steps_per_s"], 3) for r in repeats]
    return out


def flops_per_token(job: dict) -> int:
    n = linear_params(job["size"], with_lm_head=job["stage"] != "rm")
    if job["stage"] == "grpo":
        # Per prompt + response token: sampling (prefill or decode) 2N, reference 2N, update 6N.
        return 10 * n
    reference = job["stage"] == "dpo" and not job["precompute"]
    return (8 if reference else 6) * n


def precision_label(job: dict) -> str:
    return job["precision"] + ("+pre" if job["precompute"] else "")


def build_rows(results: list[tuple[dict, dict]], peaks: dict) -> list[dict]:
    """A row per run; ours/TRL against the TRL run of the same pair, ours/TRL best against
    TRL's fastest run (tokens/s) of the stage, size and mode: any precision, reference
    precomputed or not, padded or packed."""
    trl_runs = [(job, res) for job, res in results if job["tool"] == "trl" and res.get("ok")]
    rows = []
    for job, res in results:
        row = {
            "tool": job["tool"],
            "stage": job["stage"],
            "size": job["size"],
            "mode": job["mode"],
            "precision": precision_label(job),
            "layout": "packed" if job["packing"] else "padded",
            "variant": job["variant"],
            **{k: v for k, v in res.items()},
        }
        if res.get("ok"):
            flops = res["tokens_per_s"] * flops_per_token(job)
            row["model_gflops"] = flops / 1e9
            row["peak_fraction"] = flops / 1e9 / peaks[job["precision"]]
        if job["tool"] == "ours" and res.get("ok"):
            # The TRL run of the pair (where a pair has two: the one laid out as ours).
            pair = [(j, r) for j, r in trl_runs if pair_key(j) == pair_key(job)]
            pair.sort(key=lambda jr: jr[0]["packing"] != job["packing"])
            same = pair[0][1] if pair else None
            best = max(
                (
                    r
                    for j, r in trl_runs
                    if (j["stage"], j["size"], j["mode"])
                    == (job["stage"], job["size"], job["mode"])
                ),
                key=lambda r: r["tokens_per_s"],
                default=None,
            )
            if same:
                row["vs_trl"] = res["steps_per_s"] / same["steps_per_s"]
                row["tok_vs_trl"] = res["tokens_per_s"] / same["tokens_per_s"]
                row["rss_vs_trl"] = res["peak_rss_mb"] / same["peak_rss_mb"]
            if best:
                row["vs_trl_best"] = res["steps_per_s"] / best["steps_per_s"]
                row["tok_vs_trl_best"] = res["tokens_per_s"] / best["tokens_per_s"]
        rows.append(row)
    return rows


COLUMNS = [
    ("tool", "tool"),
    ("stage", "stage"),
    ("size", "size"),
    ("mode", "mode"),
    ("precision", "precision"),
    ("layout", "layout"),
    ("steps/s", "steps_per_s"),
    ("tokens/s", "tokens_per_s"),
    ("tok/step", "tokens_per_step"),
    ("peak RSS MB", "peak_rss_mb"),
    ("model GFLOP/s", "model_gflops"),
    ("% peak", "peak_fraction"),
    ("gen tok/s", "gen_tokens_per_s"),
    ("rollout share", "rollout_fraction"),
    ("ours/TRL", "vs_trl"),
    ("ours/TRL best", "vs_trl_best"),
    ("tok/s ours/TRL", "tok_vs_trl"),
    ("tok/s ours/TRL best", "tok_vs_trl_best"),
    ("RSS ours/TRL", "rss_vs_trl"),
    ("error", "error"),
]


def cell(key: str, value) -> str:
    if value is None:
        return ""
    if key in ("peak_fraction", "rollout_fraction"):
        return f"{100 * value:.1f}%"
    if key in ("vs_trl", "vs_trl_best", "rss_vs_trl", "tok_vs_trl", "tok_vs_trl_best"):
        return f"{value:.2f}x"
    if key in ("tokens_per_s", "tokens_per_step", "peak_rss_mb", "gen_tokens_per_s"):
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def render(rows: list[dict], header: list[str]) -> str:
    """The table as markdown (also what the terminal shows when rich is missing)."""
    show = [(title, key) for title, key in COLUMNS if any(r.get(key) is not None for r in rows)]
    lines = [*header, ""]
    lines.append("| " + " | ".join(title for title, _ in show) + " |")
    lines.append("|" + "|".join("---" for _ in show) + "|")
    for r in rows:
        lines.append("| " + " | ".join(cell(key, r.get(key)) for _, key in show) + " |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict], header: list[str]) -> None:
    show = [(title, key) for title, key in COLUMNS if any(r.get(key) is not None for r in rows)]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(render(rows, header))
        return
    console = Console(width=max(160, shutil.get_terminal_size().columns))
    for line in header:
        console.print(line, highlight=False, markup=False)
    table = Table(show_lines=False)
    for title, key in show:
        table.add_column(title, justify="left" if key in ("tool", "stage", "error") else "right")
    for r in rows:
        table.add_row(*(cell(key, r.get(key)) for _, key in show))
    console.print(table)


def machine_info(args) -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "device": args.device,
    }
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((ln.split(":", 1)[1].strip() for ln in fh if "model name" in ln), None)
        info["cpu"] = name or info["cpu"]
    except OSError:
        pass
    info["cores"] = os.cpu_count()
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    return info


def parse_args(argv: list[str] | None = None):
    def listed(choices):
        def parse(text: str) -> list[str]:
            items = [t.strip() for t in text.split(",") if t.strip()]
            bad = [t for t in items if t not in choices]
            if bad or not items:
                raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
            return items

        return parse

    p = argparse.ArgumentParser(
        description="rlhf-cli vs TRL: steps/s, tokens/s, peak memory and FLOP/s, side by side.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--stages", type=listed(STAGES), default=list(STAGES), help="comma list")
    p.add_argument("--sizes", type=listed(ALL_SIZES), default=list(ALL_SIZES), help="comma list")
    p.add_argument("--modes", type=listed(MODES), default=list(MODES), help="comma list")
    p.add_argument(
        "--precisions", type=listed(PRECISIONS), default=list(PRECISIONS), help="comma list"
    )
    p.add_argument(
        "--variants",
        type=listed(VARIANTS),
        default=["default", "best"],
        help="default = the --precisions as given; best = bf16 (+ precomputed reference for dpo); "
        "packed = best with packed rows (ours: train.packing; TRL: sft packing, else padded)",
    )
    p.add_argument("--tools", type=listed(TOOLS), default=list(TOOLS), help="comma list")
    p.add_argument(
        "--data",
        choices=DATASETS,
        default="short",
        help="short: the shipped lengths (~60-word prompts and answers); spread: answers of a "
        "word to a page (about 4 to 500 tokens), rows up to 1024 tokens",
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run the grid this many times; each row is the median run (peak memory: the max)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument(
        "--peak-drift",
        type=float,
        default=0.2,
        help="throw a pair away when the matmul peak moved by more than this fraction across it",
    )
    p.add_argument("--retries", type=int, default=2, help="extra pairs per configuration at most")
    p.add_argument("--out", type=Path, help="write the table to OUT (.md) and OUT's .json")
    p.add_argument("--verbose", action="store_true", help="show a failing run's stderr")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda":
        args.device = "cuda:0"

    t0 = time.perf_counter()
    # One epoch, every step full (spread: twice that, as TRL's packed rows hold more examples).
    n_rows = BATCH * (args.steps + args.warmup) * (2 if args.data == "spread" else 1)
    max_length = limits(args.data)[0]
    models = {size: model_dir(size) for size in args.sizes}
    data = {
        size: (real_data_files if size in REAL else data_files)(n_rows, args.data)
        for size in args.sizes
    }
    lengths = {}
    for size in args.sizes:
        if size in REAL:
            lengths[size] = real_lengths(models[size], data[size]["pairs"])
        else:
            lengths[size] = check_same_tokens(models[size], data[size]["pairs"], max_length)
        if lengths[size]["longest"] > max_length:
            raise SystemExit(f"{size}: a row of {lengths[size]['longest']} tokens would be cut")
    log(f"assets ready in {time.perf_counter() - t0:.1f}s under {models[args.sizes[0]].parent}")
    jobs = plan(args)
    # Only the precisions that run: without AVX512-BF16/AMX a CPU emulates bf16 matmuls
    # (a minute for one 2048 x 2048 product).
    peaks = {p: matmul_peak_gflops(p, args.device) for p in PRECISIONS if p in used(jobs)}
    log("matmul peak: " + ", ".join(f"{p} {v:,.0f} GFLOP/s" for p, v in peaks.items()))

    runs: dict[tuple, list[dict]] = {job_key(job): [] for job in jobs}
    # A pair = the tools' runs of one configuration, back to back (ours, then TRL), between two
    # measurements of the matmul peak; a pair whose peak moved by more than --peak-drift is
    # thrown away and run again (at most --retries extra pairs per configuration). Rounds sweep
    # every configuration once, so a slow spell of a shared machine hits all of them alike.
    groups: dict[tuple, list[dict]] = {}
    for job in jobs:
        groups.setdefault(pair_key(job), []).append(job)
    kept = {g: 0 for g in groups}
    tries = {g: 0 for g in groups}
    thrown: list[str] = []
    drift: list[float] = []
    i = 0
    while True:
        todo = [
            g for g in groups if kept[g] < args.repeats and tries[g] < args.repeats + args.retries
        ]
        if not todo:
            break
        for g in todo:
            members = groups[g]
            tries[g] += 1
            precision = members[0]["precision"]
            before = matmul_peak_gflops(precision, args.device)
            pair = []
            for job in members:
                i += 1
                name = " ".join(
                    [job["tool"], job["stage"], job["size"], job["mode"], precision_label(job)]
                    + (["packed"] if job["packing"] else [])
                )
                log(f"[{i}] {name} (pair {tries[g]}) ...")
                res = run_child(job, args, models, data[job["size"]])
                if res.get("ok"):
                    log(
                        f"[{i}] {name}: {res['steps_per_s']:.3f} steps/s, "
                        f"{res['tokens_per_s']:,.0f} tok/s, {res['peak_rss_mb']:,.0f} MB RSS "
                        f"({res['wall_s']:.0f}s)"
                    )
                else:
                    log(f"[{i}] {name}: FAILED {res.get('error')}")
                pair.append((job, res))
            after = matmul_peak_gflops(precision, args.device)
            moved = after / before - 1
            drift.append(moved)
            label = " ".join(str(x) for x in g[:-1]) + (" packed" if g[-1] else "")
            if abs(moved) > args.peak_drift and len(members) > 1:
                thrown.append(f"{label} ({before:,.0f} -> {after:,.0f} GFLOP/s)")
                log(f"pair thrown away: matmul peak {before:,.0f} -> {after:,.0f} GFLOP/s")
                continue
            log(f"matmul peak {before:,.0f} -> {after:,.0f} GFLOP/s ({100 * moved:+.0f}%)")
            kept[g] += 1
            for job, res in pair:
                res["peak_before"], res["peak_after"] = before, after
                runs[job_key(job)].append(res)
    for job in jobs:
        if not runs[job_key(job)]:
            runs[job_key(job)].append({"ok": False, "error": "every pair was thrown away"})
    results = [(job, combine(runs[job_key(job)])) for job in jobs]

    info = machine_info(args)
    rows = build_rows(results, peaks)
    command = "python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = [
        f"command: {command.strip()}",
        f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
        f"({info['threads']} threads), device {info['device']}"
        + (f" ({info['gpu']})" if info.get("gpu") else "")
        + f", TRL {info['trl']}",
        "matmul peak (torch.matmul 2048x2048): "
        + ", ".join(f"{p} {v:,.0f} GFLOP/s" for p, v in peaks.items()),
        f"pairs: each configuration ran as (ours, TRL) back to back, {args.repeats} pair(s) kept, "
        f"the matmul peak measured before and after each pair (it moved "
        f"{100 * min(drift, default=0):+.0f}% to {100 * max(drift, default=0):+.0f}%); "
        + (
            f"{len(thrown)} pair(s) thrown away for a peak that moved > {100 * args.peak_drift:.0f}%: "
            + "; ".join(thrown)
            if thrown
            else f"none thrown away (limit {100 * args.peak_drift:.0f}%)"
        ),
        f"settings: {args.warmup} warmup + {args.steps} timed steps, (lower) median of the kept "
        f"runs (peak memory: the highest), batch {BATCH} "
        f"(pairs for rm/dpo), max_length {max_length}, LoRA r={LORA['r']} alpha={LORA['alpha']} "
        f"dropout={LORA['dropout']} all-linear (dpo, grpo: dropout off, both tools' default), "
        f"AdamW lr {LR}, no grad checkpointing; grpo: {BATCH} prompts x {GROUP} samples of <= "
        f"{ROLLOUT_TOKENS} new tokens, one update per rollout, KL beta 0.04, no vLLM",
        f"data {args.data}: mean tokens per row "
        + "; ".join(
            f"{size}: prompt {v['prompt']}, chosen {v['chosen']}, rejected {v['rejected']} "
            f"(responses min-median-max {v['response']}, longest row {v['longest']})"
            for size, v in lengths.items()
        )
        + " (toys: identical token sequences for both tools, checked on every row; real models:"
        " conversational rows rendered by the model's chat template in both tools, tok/step shows"
        " what each fed the model)",
        "model FLOP/s = tokens/s x (6 N, or 8 N when DPO runs the reference forward each step;"
        " grpo: 10 N per prompt + response token: sampling 2 N, reference 2 N, update 6 N),"
        " N = linear-layer parameters ("
        + ", ".join(
            f"{s}: {linear_params(s, True) / 1e6:.1f}M of {total_params(s) / 1e6:.1f}M"
            for s in args.sizes
        )
        + "; RM without the LM head); % peak = of the matmul peak at the run's precision",
        "+pre = reference log-probs precomputed (ours: ref.precompute=true, TRL:"
        " precompute_ref_log_probs=True); ours/TRL = steps/s ratio at the same settings"
        " (tok/s ours/TRL: tokens/s ratio, fairer where the tools batch other rows per step);"
        " ours/TRL best = vs TRL's fastest run of the stage by tokens/s (any precision, +pre or"
        " not, padded or packed; tok/s: the tokens/s ratio, the one to read for packed rows);"
        " RSS ours/TRL = peak RSS ratio, same pair",
        f"layout packed: ours train.packing=true train.packing_attention={PACKING_ATTENTION}"
        f" ({BATCH} examples a step packed into rows of <= max_length, attention kept within"
        f" each example); TRL: sft packing=True (best-fit decreasing, padding-free:"
        f" {TRL_PACKED_ROWS} row(s) of max_length a step, one flat sequence), its pair also runs"
        " TRL padded; TRL has no packing for rm or dpo (its DPO padding_free is disabled in this"
        " version), so their packed pair runs TRL padded",
    ]
    print()
    print_table(rows, header)
    if args.out:
        md = args.out if args.out.suffix != ".json" else args.out.with_suffix(".md")
        js = args.out.with_suffix(".json")
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(render(rows, header))
        js.write_text(
            json.dumps(
                {
                    "command": command.strip(),
                    "machine": info,
                    "matmul_peak_gflops": peaks,
                    "header": header,
                    "rows": rows,
                },
                indent=1,
            )
        )
        log(f"wrote {md} and {js}")
    return 0 if all(res.get("ok") for _, res in results) else 1


if __name__ == "__main__":
    sys.exit(main())
