"""What both sides of scripts/bench.py share: the settings, the toy models and the data files
(built offline and deterministically), the matmul peak, step rates and peak memory."""

from __future__ import annotations

import hashlib
import json
import math
import random
import resource
import statistics
import sys
import time
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


# Real checkpoints (rlhf_cli.model.real's offline copies): their own tokenizer and chat template.
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


# Ours, packed: SDPA on each example alone inside one forward (docs/packing.md).
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
    atomic and locked (rlhf_cli.model.tiny.build_once)."""
    from rlhf_cli.model.tiny import build_once

    def build(tmp: Path) -> None:
        builder(tmp)
        (tmp / ".complete").write_text("")

    return build_once(target, build, complete=lambda p: (p / ".complete").is_file())


def model_dir(size: str) -> Path:
    """The benchmark model of this size, built on first use (a real one: its offline copy)."""
    from rlhf_cli.model.tiny import SPECIAL_TOKENS, cache_root, corpus

    if size in REAL:
        from rlhf_cli.model.real import fetch

        return fetch(REAL[size])

    recipe = SIZES[size]
    texts = corpus(CORPUS_FILES)
    target = cache_root() / f"bench-{size}-{_digest(recipe, SPECIAL_TOKENS, texts)}"
    return _build_once(target, lambda out: _build_model(out, recipe, texts))


def _build_model(out: Path, recipe: dict, texts: list[str]) -> None:
    from transformers.utils import logging as hf_logging

    from rlhf_cli.model.tiny import build_llama

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
    from rlhf_cli.model.tiny import cache_root

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
    from rlhf_cli.model.tiny import cache_root

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


def precision_label(job: dict) -> str:
    return job["precision"] + ("+pre" if job["precompute"] else "")
