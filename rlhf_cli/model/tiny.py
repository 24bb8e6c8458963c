"""`model=tiny`: a small random-init Llama and a BPE tokenizer, built offline on first use.

The tokenizer is trained on the shipped data, the weights come from a fixed seed, so every
machine builds the same model. It lands in a cache directory (RLHF_CLI_CACHE, default
~/.cache/rlhf_cli) under a name that hashes its recipe, and is written to a temporary
directory first and renamed, so concurrent runs (a sweep, torchrun ranks) never see half a model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from rlhf_cli.core.files import temp_dir

TINY_RECIPE = {
    "version": 2,
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "seed": 0,
}


SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]


# Each turn ends with the EOS token so a model learns to stop after its answer; a prefix of a
# conversation renders to a prefix of the text, which the data pipeline relies on for masking.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def cache_root() -> Path:
    return Path(os.environ.get("RLHF_CLI_CACHE", Path.home() / ".cache" / "rlhf_cli"))


def corpus(names: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Every string of the shipped data files `names` (default: all of them), in a fixed order."""
    texts: list[str] = []

    def walk(value) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for k in sorted(value):
                walk(value[k])

    assets = resources.files("rlhf_cli") / "assets"
    if names is None:
        names = sorted(p.name for p in assets.iterdir() if p.name.endswith(".jsonl"))
    for name in names:
        for line in (assets / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                walk(json.loads(line))
    return texts


# The shipped files the tiny tokenizer is trained on (a file added later leaves the tiny model,
# and every number the tests expect of it, as it was).
TINY_CORPUS = ("chat.jsonl", "hh.jsonl", "preference.jsonl", "prompts.jsonl", "sft.jsonl")


def tiny_model_dir() -> Path:
    """Path of the tiny model, building it first if this machine has not yet."""
    texts = corpus(TINY_CORPUS)
    digest = hashlib.sha256(
        json.dumps([TINY_RECIPE, SPECIAL_TOKENS, TINY_CHAT_TEMPLATE, texts]).encode()
    ).hexdigest()[:12]
    target = cache_root() / f"tiny-llama-{digest}"
    return build_once(target, lambda tmp: build_llama(tmp, texts, TINY_RECIPE, TINY_CHAT_TEMPLATE))


def model_files_complete(path: Path) -> bool:
    """Whether `path` holds a saved model and its tokenizer."""
    return all((path / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def build_once(
    target: Path,
    builder: Callable[[Path], None],
    complete: Callable[[Path], bool] = model_files_complete,
) -> Path:
    """`target`, built first by `builder(tmp)` unless `complete(target)`. One builder at a time
    (a sweep's jobs or torchrun's ranks may all start here: a lock beside the target), into a
    temporary directory that is then renamed, so no one ever sees half a model."""
    if complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if complete(target):
            return target

        tmp = temp_dir(target.parent, target.name)
        try:
            builder(tmp)
            if target.exists():  # left incomplete (an older version, a killed build): replace
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_llama(out: Path, corpus: list[str], recipe: dict, chat_template: str | None) -> None:
    """A ByteLevel BPE tokenizer trained on `corpus` and a random-init Llama of `recipe`'s sizes
    (seeded), saved to `out`: the tiny model, and scripts/bench.py's benchmark models."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    # Raw (non-chat) text starts with <s>, like Llama's own tokenizer.
    bos_id = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template

    config = LlamaConfig(
        # The BPE may stop short of the requested size on a small corpus; the embedding keeps the
        # recipe's size (as real models pad their vocabulary), so the parameter count holds.
        vocab_size=max(recipe["vocab_size"], len(tokenizer)),
        hidden_size=recipe["hidden_size"],
        intermediate_size=recipe["intermediate_size"],
        num_hidden_layers=recipe["num_hidden_layers"],
        num_attention_heads=recipe["num_attention_heads"],
        num_key_value_heads=recipe["num_key_value_heads"],
        max_position_embeddings=recipe["max_position_embeddings"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        model = LlamaForCausalLM(config)
        # With initializer_range=0.02 a frozen head caps |logit| near 2.5 (RMS-normed hidden of
        # norm sqrt(d) times columns of norm 0.02 sqrt(d)), so adapters could never fit the data.
        # A fan-in scaled head (std 1/sqrt(d)), as trained models have, leaves room.
        torch.nn.init.normal_(model.lm_head.weight, std=config.hidden_size**-0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
