"""Model cards: `final/README.md` of a run and the README of a merged model, in the Hugging Face
model-card format (YAML front matter, then Markdown), so the hub and `huggingface_hub.ModelCard`
read them: what the model was trained from, how (the command and the resolved config) and with
what result (the last train and eval metrics)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rlhf_cli.config import Config

STAGE_WORDS = {
    "sft": "supervised fine-tuning",
    "rm": "a reward model (Bradley-Terry, scalar head)",
    "dpo": "direct preference optimisation",
    "kto": "KTO on desirable / undesirable answers",
    "ppo": "PPO against a reward",
    "grpo": "GRPO (group-relative advantages) against a reward",
    "rloo": "RLOO (leave-one-out baseline) against a reward",
    "reinforce": "REINFORCE with a baseline against a reward",
    "rs": "rejection sampling (best-of-n fine-tuning)",
}


def command_line() -> str | None:
    """The `rlhf train` command of this process (its Hydra overrides), when Hydra ran it."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return "rlhf train " + " ".join(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return None


def hub_dataset(path: str) -> str | None:
    """data.path when it names a hub dataset (not a local file or a shipped one)."""
    if path.startswith("builtin:") or Path(path).expanduser().exists():
        return None
    if path.startswith((".", "/", "~")) or Path(path).suffix:
        return None
    return path


def model_card(
    cfg: Config,
    config_yaml: str,
    kind: str,
    metrics: dict[str, Any] | None = None,
    evals: dict[str, Any] | None = None,
    command: str | None = None,
) -> str:
    """The card text. kind: adapter (a PEFT LoRA adapter), full (the whole model, a run's
    weights file) or merged (a plain transformers model)."""
    base = cfg.model.name_or_path
    stage = cfg.stage.name
    tags = ["rlhf-cli", stage, "text-generation"]
    if kind == "adapter":
        tags += ["lora", "peft", f"base_model:adapter:{base}"]
    front: dict[str, Any] = {
        "base_model": base,
        "library_name": "peft" if kind == "adapter" else "transformers",
        "pipeline_tag": "text-generation",
        "tags": tags,
    }
    dataset = hub_dataset(cfg.data.path)
    if dataset:
        front["datasets"] = [dataset]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {base}: {stage}",
        "",
        f"Trained with rlhf-cli: {STAGE_WORDS.get(stage, stage)}, from `{base}`"
        + (f" (starting from the adapter `{cfg.model.adapter}`)" if cfg.model.adapter else "")
        + f"; quantization {cfg.quant.mode}, peft {cfg.peft.method}.",
        "",
        "## Use",
        "",
        "```python",
        *_use(kind, base),
        "```",
    ]
    rows = {f"train {k}": v for k, v in (metrics or {}).items() if _shown(k, v)}
    rows.update({f"eval {k}": v for k, v in (evals or {}).items() if _shown(k, v)})
    if rows:
        lines += ["", "## Results (the last step)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in rows.items()]
    if command:
        lines += ["", "## Command", "", "```", command, "```"]
    lines += ["", "## Config", "", "```yaml", config_yaml.strip(), "```", ""]
    return "\n".join(lines)


def _use(kind: str, base: str) -> list[str]:
    if kind == "adapter":
        return [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            'model = PeftModel.from_pretrained(base, "<this directory>")',
            'tokenizer = AutoTokenizer.from_pretrained("<this directory>")',
        ]
    if kind == "merged":
        return [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("<this directory>")',
            'tokenizer = AutoTokenizer.from_pretrained("<this directory>")',
        ]
    return ["# the whole model's weights: rlhf sample <run> ... or rlhf merge <run> out=DIR"]


def _shown(key: str, value: Any) -> bool:
    hidden = ("lr", "epoch", "skipped", "step", "split", "tokens_per_s", "step_s", "rollout_s")
    return isinstance(value, int | float) and key not in hidden and "first" not in key


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
