"""Tokenizer and model loading: a causal LM, optionally quantized (bitsandbytes NF4/FP4/int8),
with LoRA adapters (peft) or trained in full. The same code runs on CUDA and on CPU.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf_cli import distributed as dist
from rlhf_cli.config import Config, ModelConfig
from rlhf_cli.errors import UserError, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Used for conversations when the tokenizer has no template of its own (a base model):
# ChatML written as plain text, so no new embeddings are needed.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def quiet_libraries() -> None:
    """Keep the libraries' progress bars and known-harmless warnings out of the run's output."""
    # bitsandbytes looks for an optional hub-hosted CPU kernel and warns when it is absent; its
    # own CPU kernels are used instead.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


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
        from rlhf_cli.tiny import tiny_model_dir

        return str(tiny_model_dir())
    from rlhf_cli.real import resolve

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


VARLEN = "sdpa_varlen"  # the attention of train.packing_attention=varlen


def varlen_bounds(position_ids: torch.Tensor) -> torch.Tensor:
    """Where each sequence of packed rows starts in their flattened positions, and the end
    (cumulative lengths, as flash-attention's varlen kernel takes them): a sequence starts
    wherever its position id is 0 (data.pack_rows restarts them per sequence and per run of
    padding), and wherever the ids do not count on from the previous one or a row begins (a
    first sequence that does not start at 0, a caller's own positions), so no sequence crosses
    a row's end."""
    width = position_ids.shape[-1]
    flat = position_ids.reshape(-1)
    new = torch.ones_like(flat, dtype=torch.bool)
    new[1:] = (flat[1:] == 0) | (flat[1:] != flat[:-1] + 1)
    new[::width] = True
    starts = new.nonzero().flatten()
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([starts, end]).to(torch.int32)


def varlen_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
):
    """SDPA one sequence at a time inside one forward over packed rows: the projections and
    MLPs run on the whole rows (large matmuls), attention on each sequence alone (causal, no
    mask: no work across sequences, no (T, T) mask in any layer): flash-attention's varlen on
    a CPU. The bounds come from cu_seq_lens_q where a caller passes them, else from the
    position ids (varlen_bounds); any other call (padded rows, generation) is plain SDPA with
    its mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None and attention_mask is None and query.shape[2] > 1:
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and bool((position_ids[..., 1:] == 0).any()):
            bounds = varlen_bounds(position_ids.expand(query.shape[0], -1))
    if bounds is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    window = kwargs.get("sliding_window")
    if kwargs.get("softcap") is not None or (window and int(torch.diff(bounds).max()) > window):
        raise UserError(
            "train.packing_attention=varlen runs plain causal attention on each example: this "
            "model soft-caps its attention scores or has an example longer than its sliding "
            "window; use train.packing_attention=mask"
        )
    rows, heads, width, dim = query.shape
    # (R, H, T, D) -> (R*T, H, D): token-major, so each sequence is one contiguous slice.
    q, k, v = (
        x.transpose(1, 2).reshape(rows * width, x.shape[1], dim) for x in (query, key, value)
    )
    gqa = k.shape[1] != heads
    p = dropout if module.training else 0.0
    out = []
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        # (1, H, L, D): SDPA takes its flash kernel on 4-D inputs only (on a CPU, 3-D ones
        # fall back to the math path, which keeps the (H, L, L) probabilities).
        o = F.scaled_dot_product_attention(
            *(x[a:b].transpose(0, 1)[None] for x in (q, k, v)),
            dropout_p=p,
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        )
        out.append(o[0].transpose(0, 1))
    return torch.cat(out).reshape(rows, width, heads, dim), None


def varlen_mask(*args, attention_mask=None, **kwargs):
    """The mask of VARLEN: none for packed rows (they come without one: varlen_attention
    keeps each sequence to itself), SDPA's for every other batch."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and kwargs.get("q_length", 0) > 1:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen() -> str:
    """Make VARLEN an attention implementation transformers knows (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, varlen_mask)
    return VARLEN


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


class _Masked(torch.autograd.Function):
    """x * keep * scale, saving only the boolean mask for the backward."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale), None, None


def dropout_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(keep mask, 1 / keep probability): each element kept with probability 1 - p, p rounded
    to a multiple of 2^-16. Four 16-bit draws come from each 64-bit random word: a quarter of
    the generator calls of torch's dropout, whose per-element Bernoulli draw is the slowest part
    of a LoRA step on a CPU (a quarter of the whole step with dropout on 7 linears per layer)."""
    k = round(p * 65536)
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    keep = words.view(torch.int16)[:n].view(shape) >= k - 32768
    return keep, 65536 / (65536 - k)


class FastDropout(torch.nn.Module):
    """Inverted dropout like torch.nn.Dropout (same expectation, independent per element),
    with the mask from dropout_mask: the LoRA input dropout of every adapted layer."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep, scale = dropout_mask(x.shape, self.p, x.device)
        return _Masked.apply(x, keep, scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _OutsideAutocast:
    """True outside torch.autocast, false inside: the value of a LoRA layer's
    `cast_input_dtype_enabled`, which peft reads as a bool before each adapter forward."""

    def __bool__(self) -> bool:
        return not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"))


def lean_lora(model):
    """Swap peft's LoRA dropout modules (torch.nn.Dropout) for FastDropout, same p, and keep
    a LoRA layer's input in its own dtype under autocast. peft casts the (bf16) input to the
    adapter's fp32 before dropout and lora_A, where autocast casts it straight back to bf16: two
    copies of every adapted activation and a dropout at twice the bytes, for the same numbers.
    Outside autocast the cast stays (an fp32 adapter on a bf16 base needs it)."""
    outside = _OutsideAutocast()
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = outside
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, layer in list(dropouts.items()):
                if isinstance(layer, torch.nn.Dropout) and layer.p > 0:
                    dropouts[name] = FastDropout(layer.p)
    return model


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


def generation_config(
    tokenizer,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
):
    """A complete GenerationConfig: greedy at temperature 0, else sampling from the policy's own
    distribution (truncated only by top_p < 1, top_k > 0 or min_p > 0). Every field that reshapes the
    distribution is set to its neutral value, so nothing is taken from the model's
    generation_config.json (repetition_penalty, min_p, top_k, no_repeat_ngram_size, ...): the
    samples come from the distribution whose log-probs are trained and evaluated."""
    from transformers import GenerationConfig

    sampling = temperature > 0
    return GenerationConfig(
        do_sample=sampling,
        # Greedy: the sampling knobs unset (generate_ids blanks the model's own defaults), or
        # transformers warns on every call that they are ignored.
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=top_k if sampling else None,
        min_p=min_p if sampling else None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        length_penalty=1.0,
        num_beams=1,
        num_return_sequences=1,
        min_length=0,  # (min_new_tokens unset: both set is a warning on every call)
        max_new_tokens=max_new_tokens,
        bad_words_ids=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        renormalize_logits=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


def generate_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, config):
    """model.generate with `config` alone: transformers fills every unset field of a passed
    config from the model's own generation_config (generation_config.json), so the model's is
    swapped for a blank one while generating."""
    from transformers import GenerationConfig

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = lm.generation_config
    lm.generation_config = GenerationConfig()
    try:
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            # FSDP gathers each layer's weights in every forward: every rank takes a step
            # per token until all ranks' rows are done (a finished rank runs on idle).
            synced_gpus=is_fsdp(model) and dist.world_size() > 1,
        )
    finally:
        lm.generation_config = saved


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


def decoder(model):
    """The transformer under the LM head (adapters included): hidden states without logits."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(lm, lm.base_model_prefix)


def shares_prompt(model, batch) -> bool:
    """Whether `batch` carries the shared-prompt layout and the model can run it: the prompt's
    KV cache must come back, which gradient checkpointing turns off, and the responses'
    backward must reach the prompt pass through it, which FSDP cannot follow (it gathers a
    layer's weights for the backward of the outputs it saw, and the cache is not among them:
    the prompt pass's backward found them freed)."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers < 5.x: the old name
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    return "prompt_ids" in batch and not checkpointing and not is_fsdp(model)


def is_fsdp(model) -> bool:
    """Whether FSDP (dist.strategy=fsdp) shards `model`'s weights."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def shared_prompt_hidden(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of every response row with its prompt run once: the prompts (left-padded)
    go through the decoder, their KV cache is gathered row by row, and the responses attend to
    it at positions that continue each prompt. Returns the last prompt token's hidden state per
    row (N, H) and the responses' (N, R, H): what one forward over prompt + response gives at
    those positions, without running the prompt once per response."""
    dec = decoder(model)
    prompt_mask = batch["prompt_mask"]
    prompt = dec(
        input_ids=batch["prompt_ids"],
        attention_mask=prompt_mask,
        position_ids=(prompt_mask.cumsum(1) - 1).clamp(min=0),
        use_cache=True,
    )
    cache, rows = prompt.past_key_values, batch["row_example"]
    if cache is None:
        raise UserError("the model returned no KV cache: set train.shared_prompt=false")
    cache.reorder_cache(rows)  # (B, ...) -> (N, ...), differentiable
    response_mask = batch["response_mask"]
    start = prompt_mask.sum(1)[rows]
    positions = start[:, None] + torch.arange(response_mask.shape[1], device=start.device)
    # transformers 5.2x renamed the argument past_key_values -> cache (the old name warns).
    name = "cache" if "cache" in inspect.signature(dec.forward).parameters else "past_key_values"
    out = dec(
        input_ids=batch["response_ids"],
        attention_mask=torch.cat([prompt_mask[rows], response_mask], dim=1),
        position_ids=positions,
        use_cache=True,
        **{name: cache},
    )
    return prompt.last_hidden_state[:, -1][rows], out.last_hidden_state


def _softcap(config):
    cap = getattr(config, "final_logit_softcapping", None)
    return (lambda x: torch.tanh(x / cap) * cap) if cap else None


def _times(attr: str):
    return lambda config: lambda x: x * getattr(config, attr)


def _divided(attr: str):
    return lambda config: lambda x: x / getattr(config, attr)


# What a family's causal-LM forward does to lm_head(hidden) before it returns the logits, by
# config.model_type (read from transformers' modeling files; tests compare each with
# model(...).logits on a tiny config). A family in neither table takes its log-probs from the
# model's own forward (models.own_logits), whatever it does.
PLAIN_HEAD = {
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "phi",
    "gemma", "olmo", "olmo2", "starcoder2", "smollm3",
}  # fmt: skip
LOGIT_TRANSFORMS = {
    "gemma2": _softcap,  # tanh(x / cap) * cap
    "gemma3_text": _softcap,
    "cohere": _times("logit_scale"),
    "cohere2": _times("logit_scale"),
    "granite": _divided("logits_scaling"),
    "granitemoe": _divided("logits_scaling"),
    "granitemoeshared": _divided("logits_scaling"),
    "granitemoehybrid": _divided("logits_scaling"),
    "falcon_h1": _times("lm_head_multiplier"),
}


def own_logits(model) -> bool:
    """True when the LM head's output must come from the model's own forward (a family whose
    logit transform this module does not know)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type not in PLAIN_HEAD and model_type not in LOGIT_TRANSFORMS


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The logits a known family's forward returns for these hidden states: the LM head, then
    the family's final transform (soft-capping, logit scales)."""
    logits = model.get_output_embeddings()(hidden)
    make = LOGIT_TRANSFORMS.get(model.config.model_type)
    transform = make(model.config) if make is not None else None
    return transform(logits) if transform is not None else logits


# Label positions per LM-head chunk: the float32 logits that exist at once are at most
# HEAD_CHUNK x vocab (1024 x 49k = 200 MB for SmolLM2), whatever the batch.
HEAD_CHUNK = 1024


class _FrozenHeadLogps(torch.autograd.Function):
    """log p(target_i) = z_i[t_i] - logsumexp(z_i), z_i = W h_i + b, for a frozen head, a chunk
    of rows at a time. The gradient needs no logits: d logp_i / d h_i = W^T (onehot(t_i) -
    softmax(z_i)), an (n, H) tensor computed in the forward from each chunk's logits, so the
    backward only scales it by the incoming gradient (as Liger's fused linear cross-entropy does
    for a scalar loss; here per row, since DPO's loss is not a sum of log-probs)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grads = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # The weight (and bias) in the compute dtype under autocast, cast once for all chunks:
        # autocast caches no cast of a frozen weight, so F.linear would cast it again per chunk.
        device = hidden.device.type
        w, b = weight, bias
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            # One (chunk, vocab) float32 buffer, worked in place: the logits, shifted by their
            # max, exponentiated, then (for the gradient) onehot - softmax.
            z = F.linear(hidden[start:end], w, b).float()
            t = targets[start:end]
            z.sub_(z.amax(dim=-1, keepdim=True))
            picked = z.gather(1, t[:, None]).squeeze(1)
            total = z.exp_().sum(dim=-1)
            out[start:end] = picked - total.log()
            if grads is not None:
                g = z.div_(total[:, None]).neg_()
                g[torch.arange(end - start, device=g.device), t] += 1
                grads[start:end] = g.to(w.dtype) @ w
        ctx.save_for_backward(grads)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grads,) = ctx.saved_tensors
        grad_hidden = None
        if grads is not None:
            grad_hidden = grads * grad_out[:, None].to(grads.dtype)
        return grad_hidden, None, None, None, None


def head_logps(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under the model's LM head (and its family's logit transform) for rows of
    hidden states (n, H) -> (n,) float32, HEAD_CHUNK rows at a time: no (n, vocab) logits are
    ever kept. A frozen plain head (LoRA's usual case) gets its gradient computed in the forward
    (_FrozenHeadLogps); a trained head or a logit transform recomputes each chunk's logits in the
    backward (activation checkpointing), one chunk at a time."""
    from torch.utils.checkpoint import checkpoint

    head = model.get_output_embeddings()
    plain = (
        type(head) is torch.nn.Linear
        and not head.weight.requires_grad
        and (head.bias is None or not head.bias.requires_grad)
        and model.config.model_type not in LOGIT_TRANSFORMS
    )
    if plain:
        return _FrozenHeadLogps.apply(hidden, head.weight, head.bias, targets, HEAD_CHUNK)

    def chunk_logps(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(lm_logits(model, h).float(), t, reduction="none")

    pieces = [hidden.new_zeros(0, dtype=torch.float32)]
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        h, t = hidden[start : start + HEAD_CHUNK], targets[start : start + HEAD_CHUNK]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(chunk_logps, h, t, use_reentrant=False))
        else:
            pieces.append(chunk_logps(h, t))
    return torch.cat(pieces)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """The keyword arguments of a forward over a batch's rows: with the attention mask of a
    padded batch, or, for packed rows (data.pack_rows), with their position ids and no mask:
    the model then limits attention to each sequence (transformers builds a block-diagonal
    causal mask from position ids that restart at 0, or runs flash-attention's varlen kernel),
    and no KV cache (a cache turns that detection off)."""
    if "sequence" in batch:
        return {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "attention_mask": None,
            "use_cache": False,
        }
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def segments(sequence: torch.Tensor) -> list[list[tuple[int, int]]]:
    """The [start, end) column ranges of each row's sequences in a packed batch."""
    out = []
    for row in sequence.tolist():
        runs: list[tuple[int, int]] = []
        for t, j in enumerate(row):
            if j < 0:
                continue
            if runs and row[runs[-1][0]] == j and runs[-1][1] == t:
                runs[-1] = (runs[-1][0], t + 1)
            else:
                runs.append((t, t + 1))
        out.append(runs)
    return out


def packed_states(model, batch: dict) -> torch.Tensor:
    """The decoder's hidden states (R, T, H) of packed rows (data.pack_rows). The same
    numbers three ways (train.packing_attention): `varlen` and `mask`, one forward over the
    rows, whose attention keeps each sequence to itself by their position ids (the model's
    attention implementation: varlen_attention, SDPA with the block-diagonal mask
    transformers builds, or flash-attention's varlen kernel); `slices` (batch["slices"]), one
    forward per sequence, its states written back into its row (zeros on padding): no mask,
    but small matmuls (slower on a CPU: README "Packing")."""
    dec = decoder(model)
    if not batch.get("slices"):
        return dec(**model_inputs(batch)).last_hidden_state
    ids, width = batch["input_ids"], batch["input_ids"].shape[1]
    rows = []
    for r, runs in enumerate(segments(batch["sequence"])):
        parts = [
            dec(input_ids=ids[r : r + 1, a:b], use_cache=False).last_hidden_state[0]
            for a, b in runs
        ]
        parts.append(parts[0].new_zeros(width - runs[-1][1], parts[0].shape[-1]))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def packed_hidden(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    limit: int,
    multiple: int = 1,
    slices: bool = False,
) -> torch.Tensor:
    """The decoder's hidden states (B, T, H) of a padded batch (padding anywhere: left,
    right, between), computed with its tokens packed (data.pack_bins into rows of up to
    `limit` tokens, data.pack_rows): each row's tokens at positions 0, 1, ... as the padded
    forward gives them with position ids that skip padding; zeros at padding."""
    from rlhf_cli.data import pack_bins, pack_rows

    keep = attention_mask.bool()
    lengths = keep.sum(1).tolist()
    seqs = [input_ids[b][keep[b]].tolist() for b in range(input_ids.shape[0])]
    packed = pack_rows(seqs, seqs, pack_bins(lengths, limit, multiple), 0, multiple)
    packed = {k: v.to(input_ids.device) for k, v in packed.items()}
    hidden = packed_states(model, {**packed, "slices": slices})
    starts = packed["last"] - torch.tensor(lengths, device=input_ids.device) + 1
    index = torch.cat([torch.arange(int(s), int(s) + n) for s, n in zip(starts, lengths)])
    out = hidden.new_zeros(*input_ids.shape, hidden.shape[-1])
    out[keep] = hidden.flatten(0, 1)[index.to(input_ids.device)]
    return out


def labelled_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the labelled tokens only, and the row each comes from: (n,), (n,).

    The LM head runs only at the positions that predict a label (never on prompt or padding),
    followed by the family's logit transform (lm_logits), HEAD_CHUNK positions at a time
    (head_logps), so neither (B, T, V) nor (labels, V) logits exist. A family whose transform is
    unknown takes the model's own forward instead.
    """
    from rlhf_cli.losses import IGNORE_INDEX, token_logps

    targets = batch["labels"][:, 1:]
    # The row (sequence) each label belongs to: packed rows hold several.
    rows = batch["sequence"][:, 1:] if "sequence" in batch else None
    if own_logits(model):
        logits = model(**model_inputs(batch)).logits
        logps, mask = token_logps(logits, batch["labels"], IGNORE_INDEX)
        return logps[mask], (mask.nonzero()[:, 0] if rows is None else rows[mask])
    if shares_prompt(model, batch):
        # Response token j is predicted by response position j - 1, the first by the prompt's
        # last position; every response token is a label.
        last_prompt, hidden = shared_prompt_hidden(model, batch)
        hidden = torch.cat([last_prompt[:, None], hidden[:, :-1]], dim=1)
        targets, keep = batch["response_ids"], batch["response_mask"].bool()
    else:
        if rows is not None:
            hidden = packed_states(model, batch)[:, :-1]
        else:
            hidden = decoder(model)(**model_inputs(batch)).last_hidden_state[:, :-1]
        keep = targets != IGNORE_INDEX
        if rows is not None:
            return head_logps(model, hidden[keep], targets[keep]), rows[keep]
    return head_logps(model, hidden[keep], targets[keep]), keep.nonzero()[:, 0]


class ScalarHead(torch.nn.Module):
    """A linear map from the hidden state of each sequence's last real token to one number (a
    reward or a value); kept in fp32 outside the adapter and saved beside it."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        # Zero at the start: a value head's random guesses would drown the first advantages.
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (...): one score per position."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)

    def last_token(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) right-padded -> (B,): the score at each row's last non-pad token (packed
        rows: PackedRows' `last` instead)."""
        last = attention_mask.sum(dim=1) - 1
        return self(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])


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
