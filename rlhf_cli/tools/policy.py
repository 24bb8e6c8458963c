"""A trained policy outside training: rebuilt from a run directory (its config.yaml names the
base, quantization and adapter) or loaded from a plain transformers directory (a merged model),
with its reference policy, prompts rendered exactly as in training, and batched generation.

What `rlhf sample`, `rlhf eval` and `rlhf merge` share.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from rlhf_cli.config import (
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    PeftConfig,
    QuantConfig,
    SftConfig,
    load_saved_config,
    remote_code_allowed,
)
from rlhf_cli.core.errors import UserError
from rlhf_cli.core.progress import console
from rlhf_cli.core.quiet import quiet_libraries
from rlhf_cli.data.batches import PreferenceBatch
from rlhf_cli.data.examples import Renderer, build_examples
from rlhf_cli.data.rows import load_rows
from rlhf_cli.model.forward import response_logps
from rlhf_cli.model.load import (
    adapter_switched,
    autocast,
    autocast_dtype,
    load_base_model,
    load_tokenizer,
    resolve_device,
    set_eval,
    setup_reference,
)
from rlhf_cli.rollout.batch import generate_batches
from rlhf_cli.rollout.engine import make_engine
from rlhf_cli.trainer.checkpoint import FULL_WEIGHTS, STATE_FILE

QUANT_MODES = ("none", "nf4", "fp4", "int8")


@dataclass
class Located:
    """Where a policy's files are: `weights` holds an adapter, full weights (a run) or a
    transformers model (plain); `cfg` is the run's config (None for a plain model)."""

    weights: Path
    cfg: Config | None


def locate(path: str | Path) -> Located:
    """A run directory, its final/ or a checkpoint (config.yaml + adapter or full weights), or a
    plain transformers model directory (config.json)."""
    path = Path(path)
    for candidate in (path / "final", path):
        has_weights = (candidate / "adapter_config.json").is_file() or (
            candidate / FULL_WEIGHTS
        ).is_file()
        if (candidate / "config.yaml").is_file() and has_weights:
            if (candidate / "config.json").is_file() and not (candidate / STATE_FILE).is_file():
                break  # a transformers directory that happens to hold a config.yaml
            # (a full fine-tune's final/ holds config.json too, beside the trainer state)
            return Located(candidate, load_saved_config(candidate / "config.yaml"))
    if (path / "config.json").is_file():
        return Located(path, None)
    if (path / "config.yaml").is_file():
        raise UserError(
            f"{path}: a run directory without trained weights (no final/ yet): was the run "
            "stopped? point at one of its checkpoints/step-N"
        )
    raise UserError(
        f"{path}: neither a run directory (config.yaml + final/) nor a transformers model "
        "directory (config.json)"
    )


def plain_config(path: str | Path, quant: str = "none") -> Config:
    """The config of a plain model directory: defaults everywhere, the model at `path`."""
    return Config(
        stage=SftConfig(),
        model=ModelConfig(name_or_path=str(path), trust_remote_code=remote_code_allowed()),
        data=DataConfig(),
        peft=PeftConfig(),
        quant=QuantConfig(mode=quant),
        optim=OptimConfig(),
        run_dir=str(path),
    )


@dataclass
class Policy:
    """A policy ready for inference, and optionally its reference."""

    model: Any
    tokenizer: Any
    cfg: Config
    device: torch.device
    amp: torch.dtype | None
    description: str
    ref_model: Any = None  # a separate reference model, or None
    ref_adapter: str | None = None  # a frozen adapter on `model` that is the reference
    reference: str | None = None  # what the reference is; None: no reference loaded
    engine_name: str = "hf"  # rollout.engine of rlhf sample / eval
    _engine: Any = None

    def renderer(self) -> Renderer:
        return Renderer(self.tokenizer)

    @property
    def engine(self):
        """The generation engine (rlhf_cli.rollout), made on first use."""
        if self._engine is None:
            cfg = replace(self.cfg, rollout=replace(self.cfg.rollout, engine=self.engine_name))
            self._engine = make_engine(cfg, self.model, self.tokenizer, self.device, self.amp)
        return self._engine

    @torch.no_grad()
    def logps(self, batch: PreferenceBatch, reference: bool = False) -> torch.Tensor:
        """(N,) summed log-probs of every row's response tokens (labels != IGNORE_INDEX), by the
        policy or by its reference."""
        batch = {k: v.to(self.device) for k, v in batch.items()}  # type: ignore[assignment]
        with autocast(self.amp, self.device):
            if not reference:
                return response_logps(self.model, batch)[0].float()
            if self.reference is None:
                raise UserError(f"{self.description}: no reference policy loaded")
            if self.ref_model is not None:
                return response_logps(self.ref_model, batch)[0].float()
            with adapter_switched(self.model, self.ref_adapter):
                return response_logps(self.model, batch)[0].float()


def load_policy(
    path: str | Path,
    device: str = "auto",
    quant: str | None = None,
    with_reference: bool = False,
    dtype: str | None = None,
) -> Policy:
    """The policy of a run (base + quantization + adapter, as trained; `quant` overrides the
    base's quantization) or of a plain model directory (unquantized unless `quant` says so).

    The reference is the run's own (see model.load.setup_reference): the base with the adapter
    disabled, the frozen starting adapter (model.adapter), ref.model, or for a full fine-tune
    the base it started from. A plain model has none. `dtype` overrides model.dtype.
    """
    quiet_libraries()
    if quant is not None and quant not in QUANT_MODES:
        raise UserError(f"quant={quant!r} is not one of: {', '.join(QUANT_MODES)}")
    dev = resolve_device(device)
    found = locate(path)
    if found.cfg is None:
        cfg = plain_config(found.weights, quant or "none")
        tokenizer = load_tokenizer(cfg.model)
        model = set_eval(load_base_model(cfg, dev).requires_grad_(False))
        return Policy(model, tokenizer, cfg, dev, None, f"{path} (a plain model)")

    cfg = found.cfg
    if dtype is not None:
        cfg = replace(cfg, model=replace(cfg.model, dtype=dtype))
    if cfg.stage.name == "rm":
        raise UserError(
            f"{path}: a reward model (stage=rm), not a policy; score data with `rlhf score`"
        )
    if quant is not None:
        if cfg.peft.method == "full" and quant != "none":
            raise UserError(f"{path}: a full fine-tune (peft=full) loads unquantized: quant=none")
        cfg = replace(cfg, quant=replace(cfg.quant, mode=quant))
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(replace(cfg, model=replace(cfg.model, adapter=None)), dev)
    if cfg.peft.method == "full":
        from safetensors.torch import load_model

        load_model(model, str(found.weights / FULL_WEIGHTS))
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(found.weights), is_trainable=False)
    model.requires_grad_(False)
    policy = Policy(
        model,
        tokenizer,
        cfg,
        dev,
        autocast_dtype(cfg.train.precision, dev),
        f"{path} (stage={cfg.stage.name}, quant={cfg.quant.mode}, peft={cfg.peft.method})",
    )
    if with_reference:
        policy.ref_model, policy.ref_adapter, policy.reference = setup_reference(cfg, model, dev)
    set_eval(model)
    return policy


def prompt_examples(
    policy: Policy, source: str | None = None, text: str | None = None
) -> list[dict]:
    """Prompts from a file (any format with a prompt: prompt, prompt/completion, preference,
    messages...) or one `text`, rendered and truncated exactly like the run's training prompts."""
    stats: Counter = Counter()
    if text is not None:
        rows, source = [{policy.cfg.data.columns.prompt: text}], "prompt"
    else:
        assert source is not None
        rows = load_rows(source, name=None, split="train", on_bad_row="drop", stats=stats)
    data_cfg = replace(policy.cfg.data, path=source, format="auto", eval_size=0.0)
    examples, report = build_examples(rows, source, data_cfg, policy.renderer(), "prompt", stats)
    if text is None:
        console.print("prompts: " + report.line())
    return examples


@torch.no_grad()
def generate(
    policy: Policy, prompts: list[list[int]], generation: GenerationConfig, batch_size: int
) -> list[list[int]]:
    """Responses to token-id prompts by the policy's engine (hf: batches of `batch_size`,
    left-padded, with the KV cache; vllm: its own scheduling). Each response keeps its tokens
    up to and including the first EOS."""

    return [r.ids for r in generate_batches(policy.engine, prompts, generation, batch_size)]
