"""Tokenizer and model loading: a causal LM, optionally quantized (bitsandbytes NF4/FP4/int8),
with LoRA adapters (peft) or trained in full. The same code runs on CUDA and on CPU.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from rlhf_cli.config import Config, ModelConfig
from rlhf_cli.core.errors import UserError, first_line
from rlhf_cli.model.kernels import FastDropout, lean_lora, register_varlen
from rlhf_cli.model.real import resolve
from rlhf_cli.model.tiny import tiny_model_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA device is visible: use device=auto or cpu")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype for torch.autocast, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    # auto: bf16 where the GPU supports it; fp32 on CPU, where only some chips have bf16 units.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(dtype: torch.dtype | None, device: torch.device):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_path(model_cfg: ModelConfig) -> str:
    """The hub id or directory to load; `tiny` is built locally on first use; a hub id with an
    offline copy (rlhf_cli.real) loads from that copy where the hub cannot serve it."""
    if model_cfg.name_or_path == "tiny":
        return str(tiny_model_dir())

    return resolve(model_cfg.name_or_path)


def _hub_error(what: str, name: str, err: Exception) -> UserError:
    reason = first_line(err)
    hint = "check the name, or download it first (HF_HUB_OFFLINE=1 is set?)"
    if Path(name).exists():
        hint = "the directory exists but does not hold a complete model"
    return UserError(f"could not load {what} {name!r}: {reason} ({hint})")


def read_chat_template(value: str) -> str:
    """model.chat_template: a .jinja file or the template itself; either must parse."""
    from jinja2 import Environment, TemplateSyntaxError

    template = value
    if value.endswith((".jinja", ".j2")) or ("{" not in value and "/" in value):
        if not Path(value).is_file():
            raise UserError(
                f"model.chat_template={value}: no such file (give a .jinja file or the "
                "template text)"
            )
        template = Path(value).read_text(encoding="utf-8")
    try:
        Environment().parse(template)
    except TemplateSyntaxError as err:
        raise UserError(
            f"model.chat_template: not a valid Jinja template (line {err.lineno}: {err.message})"
        ) from err
    return template


def load_tokenizer(model_cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = model_path(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise _hub_error("the tokenizer of", path, err) from err
    if model_cfg.chat_template:
        tokenizer.chat_template = read_chat_template(model_cfg.chat_template)
    if tokenizer.pad_token is None:
        # Padding is always masked out, so reusing EOS (or UNK) changes no loss.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.eos_token is None:
        raise UserError(f"the tokenizer of {path!r} has no EOS token: set one in its config")
    tokenizer.padding_side = "right"
    return tokenizer


def base_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.model.dtype != "auto":
        return DTYPES[cfg.model.dtype]
    # A frozen base (LoRA) in a run that computes in bf16 is stored in bf16: half the memory,
    # and autocast does not re-cast every weight in every forward. Weights that train (full)
    # keep fp32 masters, and an fp32 run stays fp32 throughout.
    computes_bf16 = autocast_dtype(cfg.train.precision, device) == torch.bfloat16
    if cfg.peft.method == "lora" and computes_bf16:
        return torch.bfloat16
    return torch.float32


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 natively: a CUDA GPU with bf16, or a CPU with bf16 units
    (the kernel's avx512_bf16 or amx_bf16 flags; oneDNN also takes bf16 on plain AVX-512, 3-4x
    slower than fp32 there, and AVX2 emulates it: 7.5x slower than fp32 on a 2-core EPYC, 19.5
    vs 2.6 ms for a (192, 576) x (576, 1536) matmul)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no way to tell here, fp32 is the safe choice
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The dtype the 4-bit base's dequantized weights are multiplied in (quant.compute_dtype)."""
    if cfg.quant.compute_dtype != "auto":
        return DTYPES[cfg.quant.compute_dtype]
    return torch.bfloat16 if native_bf16(device) else torch.float32


def quantization_config(cfg: Config, device: torch.device):
    from transformers import BitsAndBytesConfig

    mode = cfg.quant.mode
    if mode == "none":
        return None
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=mode,
        bnb_4bit_use_double_quant=cfg.quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg, device),
    )


def attn_implementation(cfg: Config) -> str | None:
    """model.attn_implementation, or VARLEN for packed rows with packing_attention=varlen
    where the model would take SDPA (a flash-attention model keeps its own varlen kernel)."""
    chosen = cfg.model.attn_implementation
    if cfg.train.packing and cfg.train.packing_attention == "varlen" and chosen in (None, "sdpa"):
        return register_varlen()
    return chosen


def load_base_model(cfg: Config, device: torch.device):
    """The causal LM, quantized as configured, on `device`, without adapters."""
    from transformers import AutoModelForCausalLM

    path = model_path(cfg.model)
    kwargs = dict(
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        dtype=base_dtype(cfg, device),
        quantization_config=quantization_config(cfg, device),
        device_map={"": str(device)},
    )
    if attention := attn_implementation(cfg):
        kwargs["attn_implementation"] = attention
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise _hub_error("the model", path, err) from err
    return model


def enable_checkpointing(model, kwargs: dict) -> None:
    """Gradient checkpointing: transformers renamed it (5.20+: activation_checkpointing_enable;
    the old name still works there with a deprecation warning, and is the only one before)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_model(cfg: Config, device: torch.device, tokenizer):
    """Base (quantized or not) + LoRA adapters (fresh, or model.adapter), ready to train."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model = load_base_model(cfg, device)
    model.config.use_cache = False  # the KV cache only helps generation
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gc_kwargs = {"use_reentrant": False}
    if cfg.quant.mode != "none":
        # The base is frozen; its unquantized weights (embeddings, norms, LM head) keep the
        # dtype the base was loaded in (base_dtype: bf16 in a bf16 run, fp32 in an fp32 one),
        # so a bf16 QLoRA run has a bf16 residual stream like a bf16 LoRA run. peft's
        # prepare_model_for_kbit_training casts them to fp32: then every 4-bit layer casts its
        # input to bf16 and its output back to fp32, which measured 12-17% of a bf16 QLoRA step
        # on CPU. model.dtype=float32 keeps them fp32 (the fp32 residual of that recipe).
        model.requires_grad_(False)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(model, gc_kwargs)

    if cfg.peft.method == "full":
        model.requires_grad_(True)
        return model
    if cfg.model.adapter:
        from peft import PeftConfig

        adapter = resolve_adapter(cfg.model.adapter)
        # The adapter fixes r, alpha and the target modules; dropout is this run's choice.
        saved = PeftConfig.from_pretrained(str(adapter))
        saved.lora_dropout = cfg.peft.dropout
        model = PeftModel.from_pretrained(model, str(adapter), config=saved, is_trainable=True)
        return lean_lora(model)
    targets = list(cfg.peft.target_modules)
    lora = LoraConfig(
        r=cfg.peft.r,
        lora_alpha=cfg.peft.alpha,
        lora_dropout=cfg.peft.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        modules_to_save=list(cfg.peft.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as err:
        raise UserError(f"peft.target_modules={targets}: {err}") from err
    return lean_lora(model)


def set_eval(model):
    """model.eval(), except bitsandbytes' Linear4bit layers, which have no dropout.

    On a CPU with AVX512-BF16, a Linear4bit called in eval mode under no_grad repacks its weight
    for an inference kernel (rounding the scales to bf16) and keeps using that kernel afterwards,
    in training too, where it has no backward: gradients would stop flowing through the base
    layers, and a reference model would no longer compute what the policy's base computes.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        Linear4bit = ()
    model.eval()
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.train()
    return model


@contextlib.contextmanager
def eval_mode(model):
    """Evaluation or generation inside a training run (see set_eval), then every module back in
    the mode it had: nested uses (an eval that computes reference log-probs) keep the outer
    eval mode, and a model that was in eval mode stays there."""
    modes = [(module, module.training) for module in model.modules()]
    set_eval(model)
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def disable_dropout(model) -> int:
    """Set every dropout probability of `model` (LoRA dropout, the base's dropout layers and
    attention dropout) to 0; returns how many were on. DPO and the online stages compare
    log-probs of the same text under two forwards (policy and reference, or sampling and
    update), which dropout would make differ (TRL's disable_dropout does the same)."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout | FastDropout) and module.p > 0:
            module.p, changed = 0.0, changed + 1
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float) and rate > 0:
            module.attention_dropout, changed = 0.0, changed + 1
    return changed


def resolve_adapter(path: str) -> Path:
    """An adapter directory: the path itself, or a run directory's final/."""
    for candidate in (Path(path), Path(path) / "final"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise UserError(
        f"model.adapter={path}: no adapter_config.json there (point it at a run directory, its "
        "final/ or one of its checkpoints/step-N)"
    )


def load_reference_model(cfg: Config, device: torch.device):
    """ref.model: a separate frozen policy, quantized like the base. A directory holding an
    adapter is loaded on the base it names."""
    from dataclasses import replace

    from peft import PeftModel

    path = Path(cfg.ref.model)  # type: ignore[arg-type]
    adapter = next(
        (p for p in (path, path / "final") if (p / "adapter_config.json").is_file()), None
    )
    if adapter is not None:
        import json

        base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = load_base_model(replace(cfg, model=replace(cfg.model, name_or_path=base)), device)
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    else:
        ref_cfg = replace(cfg, model=replace(cfg.model, name_or_path=str(cfg.ref.model)))
        model = load_base_model(ref_cfg, device)
    model.requires_grad_(False)
    return set_eval(model)


REFERENCE_ADAPTER = "reference"


def setup_reference(cfg: Config, model, device: torch.device):
    """(separate reference model or None, frozen reference adapter name or None, description).

    ref.model: a separate frozen model. Starting from an adapter: a frozen copy of it on the
    same base (the reference is the starting policy, never the raw base). Full fine-tuning: a
    frozen copy of the base. Otherwise: the same base with the adapter disabled (name None).
    """
    from dataclasses import replace

    if cfg.ref.model:
        return load_reference_model(cfg, device), None, f"ref.model={cfg.ref.model}"
    if cfg.model.adapter:
        name = add_frozen_adapter(model, resolve_adapter(cfg.model.adapter))
        return None, name, f"frozen copy of model.adapter={cfg.model.adapter}"
    if not hasattr(model, "peft_config"):
        ref_cfg = replace(cfg, ref=replace(cfg.ref, model=model_path(cfg.model)))
        return load_reference_model(ref_cfg, device), None, "a frozen copy of the base (peft=full)"
    return None, None, "the base model with the adapter disabled"


def add_frozen_adapter(model, path: Path, name: str = REFERENCE_ADAPTER) -> str:
    """Load a second, frozen copy of an adapter next to the trainable one (same base weights)."""
    active = model.active_adapter
    model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    model.set_adapter(active)  # the trainable adapter stays active and trainable
    return name


@contextlib.contextmanager
def adapter_switched(model, name: str | None):
    """Run with adapter `name` active and frozen (name None: every adapter disabled)."""
    if name is None:
        with model.disable_adapter():
            yield
        return
    active = model.active_adapter
    model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(active)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as stored elements x 2."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
