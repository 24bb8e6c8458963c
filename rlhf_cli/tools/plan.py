"""`rlhf plan`: the memory one device needs for a run, from the config alone (nothing loads).

The model's shape comes from its config.json: a local directory's, a bundled copy for the presets
(assets/model_configs.json, so it works offline), else the hub's (config.json only). Each row is
a formula over that shape and the run's settings; the activation rows count what autograd keeps
for the backward of a Llama-family decoder layer as transformers 5 runs it with SDPA attention
(measured with saved-tensor hooks: `rlhf plan ... measure=true` and tests/test_plan.py compare).

Rows are an upper bound for rows of data.max_length tokens (the longest a batch can be); what a
step needs at its peak is the static part (weights, adapters, gradients, optimizer) plus one
micro-batch's activations plus the largest transient of the step (logits, the rollout's
log-probs, one layer's recomputation under gradient checkpointing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from rlhf_cli.config import Config, DpoConfig, KtoConfig, OnlineConfig, PpoConfig, RsConfig
from rlhf_cli.core.errors import UserError

GIB = 2**30


# A CUDA context plus cuBLAS workspaces: memory the process holds that torch's allocator does not
# count (typically 0.4-0.9 GiB); not part of the checked rows.
CUDA_CONTEXT_GIB = 0.6


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


NF4_BLOCK, DQ_BLOCK = 64, 256  # bitsandbytes' 4-bit block and its double-quant block


ADAM8_MIN_SIZE, ADAM8_BLOCK = 4096, 256  # bitsandbytes: smaller tensors keep 32-bit states


@dataclass(frozen=True)
class Arch:
    """The shape of a decoder-only transformer (Llama, Mistral, Qwen2 families)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attn_bias: bool = False

    @classmethod
    def from_config(cls, c: dict) -> Arch:
        try:
            heads = int(c["num_attention_heads"])
            hidden = int(c["hidden_size"])
            return cls(
                hidden=hidden,
                intermediate=int(c["intermediate_size"]),
                layers=int(c["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(c.get("num_key_value_heads") or heads),
                head_dim=int(c.get("head_dim") or hidden // heads),
                vocab=int(c["vocab_size"]),
                tied=bool(c.get("tie_word_embeddings", False)),
                attn_bias=bool(c.get("attention_bias", c.get("model_type") == "qwen2")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(
                f"the model config lacks {err} (rlhf plan reads Llama-style configs: "
                "hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, vocab_size)"
            ) from err

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer."""
        q, kv, h, i = (
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.hidden,
            self.intermediate,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params(self) -> int:
        """Weights of the decoder layers' linear layers (what 4/8-bit quantization stores)."""
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def other_params(self) -> int:
        """Embeddings, LM head, norms and biases (kept unquantized)."""
        h = self.hidden
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.attn_bias else 0
        head = 0 if self.tied else self.vocab * h
        return self.vocab * h + head + (2 * self.layers + 1) * h + self.layers * bias

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


def bundled_configs() -> dict[str, dict]:
    text = resources.files("rlhf_cli.assets").joinpath("model_configs.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def model_arch(cfg: Config) -> tuple[Arch, str]:
    """(the model's shape, where it came from), without loading any weights."""
    name = cfg.model.name_or_path
    if name == "tiny":
        from rlhf_cli.model.tiny import TINY_RECIPE

        return Arch.from_config(TINY_RECIPE), "the built-in tiny recipe"
    local = Path(name).expanduser()
    if (local / "config.json").is_file():
        return Arch.from_config(json.loads((local / "config.json").read_text())), str(local)
    bundled = bundled_configs()
    if name in bundled:
        return Arch.from_config(bundled[name]), "the bundled preset config"
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(
            name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise UserError(
            f"model.name_or_path={name}: no config.json found ({str(err).splitlines()[0]}); "
            "give a local model directory, a preset (model=llama2-7b, ...) or a hub id "
            "reachable from here"
        ) from err
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return Arch.from_config(text.to_dict()), f"{name} (hub config)"


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What the rows depend on, resolved from the config for one device type."""

    device: str  # cuda | cpu
    quant: str  # nf4 | fp4 | int8 | none
    double_quant: bool
    full: bool  # peft=full
    lora_r: int
    lora_dropout: float
    targets: tuple[str, ...]
    compute_bytes: int  # activations: 2 under bf16 autocast, else 4
    base_bytes: int  # the unquantized parts of the base
    optim8bit: bool
    checkpointing: bool
    micro: int
    length: int
    shared_prompt: bool  # rm/dpo: responses attend to their prompt's KV cache
    packed: bool = False  # train.packing: several sequences a row
    packed_mask: bool = False  # ... under a block-diagonal mask (train.packing_attention=mask)


def settings(cfg: Config, device: str) -> Settings:
    from rlhf_cli.model.load import DTYPES

    amp = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device == "cuda")
    full = cfg.peft.method == "full"
    if cfg.model.dtype != "auto":
        base = DTYPES[cfg.model.dtype].itemsize
    else:
        base = 2 if (not full and amp) else 4  # model.load.base_dtype
    targets = tuple(cfg.peft.target_modules)
    if targets == ("all-linear",):
        targets = LINEAR_NAMES
    # DPO and KTO turn dropout off unless stage.dropout=true; the online stages always do.
    st = cfg.stage
    dropout = cfg.peft.dropout
    if isinstance(st, OnlineConfig) or (isinstance(st, DpoConfig | KtoConfig) and not st.dropout):
        dropout = 0.0
    shared = (
        st.name in ("rm", "dpo")
        and cfg.train.shared_prompt
        and not cfg.train.gradient_checkpointing
        and not cfg.train.packing
    )
    return Settings(
        device=device,
        quant=cfg.quant.mode,
        double_quant=cfg.quant.double_quant,
        full=full,
        lora_r=cfg.peft.r,
        lora_dropout=dropout,
        targets=tuple(t for t in LINEAR_NAMES if t in targets),
        compute_bytes=2 if amp else 4,
        base_bytes=base,
        optim8bit=cfg.optim.name == "adamw8bit",
        checkpointing=cfg.train.gradient_checkpointing,
        micro=cfg.train.micro_batch_size,
        length=cfg.data.max_length,
        shared_prompt=shared,
        packed=cfg.train.packing,
        packed_mask=cfg.train.packing and cfg.train.packing_attention == "mask",
    )


def quant_constant_bytes(arch: Arch, s: Settings) -> float:
    """A 4-bit base's quantization constants (one per block of 64 weights; with double quant,
    themselves 8-bit with a float32 per 256)."""
    if s.quant not in ("nf4", "fp4"):
        return 0.0
    blocks = arch.linear_params / NF4_BLOCK
    # Each quantized layer keeps its 16-value code table too (and the 256-value one of the
    # double quantization), float32.
    tables = arch.layers * len(arch.linears()) * 4 * (16 + (256 if s.double_quant else 0))
    return (blocks * (1 + 4 / DQ_BLOCK) if s.double_quant else blocks * 4) + tables


def base_weight_bytes(arch: Arch, s: Settings) -> float:
    """The frozen (or, for peft=full, trained) base as stored."""
    lin = arch.linear_params
    if s.quant in ("nf4", "fp4"):
        stored = lin / 2 + quant_constant_bytes(arch, s)
    elif s.quant == "int8":
        outs = arch.layers * sum(o for _, o in arch.linears().values())
        stored = lin + 4 * outs  # int8 weights + one fp32 scale per output row
    else:
        stored = lin * s.base_bytes
    return stored + arch.other_params * s.base_bytes


def lora_params(arch: Arch, s: Settings) -> list[int]:
    """The LoRA matrices (A and B of every adapted layer), element counts."""
    out = []
    for name, (i, o) in arch.linears().items():
        if name in s.targets:
            out += [s.lora_r * i, s.lora_r * o] * arch.layers
    return out


def trainable_counts(arch: Arch, s: Settings) -> list[int]:
    if s.full:
        return [arch.params]
    return lora_params(arch, s)


def optimizer_bytes(counts: list[int], eight_bit: bool) -> float:
    """AdamW's two moments in fp32; bitsandbytes' 8-bit AdamW: one byte each plus a fp32 scale
    per block of 256, and two shared quantization maps; tensors under 4096 elements keep fp32
    moments."""
    if not eight_bit:
        return 8.0 * sum(counts)
    blocks = sum(
        8.0 * n if n < ADAM8_MIN_SIZE else 2 * n + 8 * -(-n // ADAM8_BLOCK) for n in counts
    )
    return blocks + 2 * 256 * 4  # the two 256-entry fp32 quantization maps, shared


def layer_activation_bytes(arch: Arch, s: Settings, seq_len: int) -> float:
    """What one decoder layer keeps for the backward, per token (SDPA attention).

    Always: each RMSNorm's float32 input and 1/rms (2 norms), the rotated query, key and value
    and the attention output with its log-sum-exp (SDPA), the MLP's gate, up and SiLU(gate).
    The inputs of the layers that train: LoRA A's input (the normed hidden states, the attention
    output, the MLP product; with LoRA dropout, each adapted layer's own dropped copy and a
    1-byte mask instead), the A outputs (r each); a full fine-tune keeps every linear's input.
    """
    h, i, c = arch.hidden, arch.intermediate, s.compute_bytes
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    fp32 = 4 * (2 * h + 2 + arch.heads)
    if s.shared_prompt:
        # The responses attend to the prompt's cache plus their own keys and values, repeated
        # to every query head, under an explicit float mask.
        kv, fp32 = q, fp32 + 4 * seq_len
    elif s.packed_mask:
        # Several sequences a row: a block-diagonal mask, which SDPA converts to a float mask
        # (and keeps) in every layer; under a mask, keys and values repeated to every head.
        # (varlen: SDPA on each sequence, causal, no mask: what a padded row keeps.)
        kv, fp32 = q, fp32 + c * seq_len
    kept = c * (q + 2 * kv + q + 3 * i)
    linears = arch.linears()
    if s.full:
        inputs = c * (2 * h + i)  # normed states (q/k/v and gate/up) + MLP product; o's = attn out
    elif s.lora_dropout > 0:
        ins = sum(linears[n][0] for n in s.targets)
        inputs = (c + 1) * ins + c * s.lora_r * len(s.targets)
    else:
        groups = {
            "attn_in": any(n in s.targets for n in ("q_proj", "k_proj", "v_proj")),
            "mlp_in": any(n in s.targets for n in ("gate_proj", "up_proj")),
            "down": "down_proj" in s.targets,
        }
        inputs = c * (h * groups["attn_in"] + h * groups["mlp_in"] + i * groups["down"])
        inputs += c * s.lora_r * len(s.targets)
    return fp32 + kept + inputs


def activation_bytes(arch: Arch, s: Settings, tokens: int, seq_len: int) -> float:
    """Saved activations of one forward over `tokens` tokens (sequences of seq_len)."""
    final_norm = tokens * (4 * arch.hidden + 4)
    if s.checkpointing:  # each layer keeps its input (the plan's transient: one layer recomputed)
        return arch.layers * tokens * arch.hidden * s.base_bytes + final_norm
    return arch.layers * layer_activation_bytes(arch, s, seq_len) * tokens + final_norm


def logits_bytes(
    arch: Arch, s: Settings, positions: int, chunk: int | None = None
) -> tuple[float, float]:
    """(kept for the backward, transient) of the LM head over `positions` positions.

    Whole rows at once (chunk None, the online update): the float32 logits the log-softmax
    keeps; while its backward runs, the gradient coming in and the one going out (float32
    each), plus the compute-dtype logits under autocast. In chunks (model.forward.head_logps, the
    offline stages): a frozen head keeps only d logp / d hidden (positions x hidden, the hidden
    states' dtype) and one chunk's float32 logits (softmaxed in place) exist at a time, with
    under autocast its compute-dtype logits or gradient beside them; a trained head recomputes
    each chunk in the backward, so nothing stays and one chunk takes the whole-rows transient."""
    low = s.compute_bytes if s.compute_bytes != 4 else 0
    if chunk is None:
        n = positions * arch.vocab
        return 4.0 * n, 8.0 * n + low * n
    c = min(positions, chunk) * arch.vocab
    if not s.full:
        return float(positions * arch.hidden * s.base_bytes), 4.0 * c + low * c
    return 0.0, 12.0 * c + low * c


@dataclass
class Row:
    name: str
    bytes: float
    note: str = ""
    peak: bool = True  # counted in the total


@dataclass
class Plan:
    rows: list[Row]
    arch: Arch
    source: str
    settings: Settings

    @property
    def total(self) -> float:
        return sum(r.bytes for r in self.rows if r.peak)


def plan(
    cfg: Config, device: str = "cuda", arch: Arch | None = None, source: str = "", ranks: int = 1
) -> Plan:
    """The rows of memory one device needs for this config: one rank of a DDP run, or of an
    FSDP run (dist.strategy=fsdp) over `ranks` ranks."""
    if arch is None:
        arch, source = model_arch(cfg)
    s = settings(cfg, device)
    st = cfg.stage
    online = isinstance(st, OnlineConfig)
    rows = weight_rows(arch, s)
    shape, heads, transient = micro_batch(cfg, arch, s)
    rows += heads
    held, held_transient = activation_rows(arch, s, *shape, online=online)
    rows += held
    transient += held_transient
    held, extra_rows = other_models(cfg, arch, s)
    rows += held
    if isinstance(st, (OnlineConfig, RsConfig)) and cfg.rollout.engine == "vllm":
        # Generation runs in the engine: no KV cache on the trained model.
        transient = [t for t in transient if not t[0].startswith("KV cache")]
        sequences = st.rollout_batch_size * (st.group_size if online else st.n)
        tokens = sequences * (cfg.data.max_prompt_length + st.max_new_tokens)
        engine = engine_rows(cfg, arch, device, tokens)
        if device == "cuda" and cfg.rollout.sleep:  # asleep while training: not at the peak
            engine = [
                Row(r.name, r.bytes, r.note + "; freed while training", peak=False) for r in engine
            ]
        (rows if device != "cuda" or not cfg.rollout.sleep else extra_rows).extend(engine)
    name, peak = max(transient, key=lambda t: t[1]) if transient else ("", 0.0)
    if peak:
        rows.append(Row("largest transient", peak, name))
    if ranks > 1 and cfg.dist.strategy == "fsdp":
        rows = fsdp_rows(rows, arch, s, ranks)
    if device == "cuda":
        rows.append(Row("CUDA context", CUDA_CONTEXT_GIB * GIB, "held outside torch's allocator"))
    return Plan(rows + extra_rows, arch, source, s)


def weight_rows(arch: Arch, s: Settings) -> list[Row]:
    """The base's weights, the trainable parameters, their gradients and optimizer states."""
    quant = {"none": f"{'bf16' if s.base_bytes == 2 else 'fp32'}"}.get(s.quant, s.quant)
    dq = " + double quant" if s.quant in ("nf4", "fp4") and s.double_quant else ""
    counts = trainable_counts(arch, s)
    n_train = sum(counts)
    what = (
        "the whole model, fp32"
        if s.full
        else f"LoRA r={s.lora_r} on {len(s.targets)} layers/block, fp32"
    )
    return [
        Row(
            "base weights",
            base_weight_bytes(arch, s),
            f"{arch.params / 1e9:.2f}B parameters, linear layers {quant}{dq}, the rest "
            f"{'bf16' if s.base_bytes == 2 else 'fp32'}",
        ),
        Row(
            "trainable parameters",
            4.0 * n_train if not s.full else 0.0,
            f"{n_train / 1e6:.1f}M: {what}",
        ),
        Row("gradients", 4.0 * n_train, "fp32, one per trainable parameter"),
        Row(
            "optimizer states",
            optimizer_bytes(counts, s.optim8bit),
            "8-bit AdamW (bitsandbytes)" if s.optim8bit else "AdamW: two fp32 moments",
        ),
    ]


def micro_batch(
    cfg: Config, arch: Arch, s: Settings
) -> tuple[tuple[int, int, int], list[Row], list[tuple[str, float]]]:
    """The sequences of one micro-batch through the trained model, by stage: (sequences,
    their length, positions through the LM head), the stage's heads (rows), and what exists
    only for a while (the KV cache of sampling, the rollout's log-probs)."""
    st = cfg.stage
    seqs, length, positions = s.micro, s.length, s.micro * s.length
    heads: list[Row] = []
    transient: list[tuple[str, float]] = []
    if st.name in ("rm",):
        seqs = 2 * s.micro
        positions = 0
        heads.append(
            Row("reward head", 4.0 * 3 * (arch.hidden + 1), "fp32 + its gradient and moments")
        )
    elif isinstance(st, (DpoConfig, KtoConfig)):
        seqs = 2 * s.micro  # chosen + rejected, or an example + its KL pair
        positions = seqs * length
    if s.packed and st.name in ("rm", "dpo"):  # a pair packs into one row: half the rows
        seqs, length = s.micro, 2 * length
    elif isinstance(st, OnlineConfig):
        prompt, new = cfg.data.max_prompt_length, st.max_new_tokens
        length = prompt + new
        seqs, positions = s.micro, s.micro * new
        rollout = st.rollout_batch_size * st.group_size
        kv = 2 * arch.layers * arch.kv_heads * arch.head_dim * s.compute_bytes * rollout * length
        transient.append(("KV cache of the rollout", kv))
        # Old and reference log-probs (no gradient): float32 logits and logsumexp's exp, for
        # whole rows of up to LOGIT_TOKENS positions at a time.
        from rlhf_cli.trainer.online import LOGIT_TOKENS

        chunk = min(rollout, max(1, LOGIT_TOKENS // max(1, new)))
        transient.append(("rollout log-probs", 8.0 * chunk * new * arch.vocab))
        if isinstance(st, PpoConfig):
            heads.append(
                Row("value head", 4.0 * 4 * (arch.hidden + 1), "fp32 + gradient + moments")
            )
    elif isinstance(st, RsConfig):
        prompt, new = cfg.data.max_prompt_length, st.max_new_tokens
        batch = st.rollout_batch_size * st.n  # prompts x completions per generation batch
        kv = 2 * arch.layers * arch.kv_heads * arch.head_dim * s.compute_bytes * batch
        transient.append(("KV cache of the sampling", kv * (prompt + new)))
    return (seqs, length, positions), heads, transient


def activation_rows(
    arch: Arch, s: Settings, seqs: int, length: int, positions: int, online: bool
) -> tuple[list[Row], list[tuple[str, float]]]:
    """The activations kept for the backward and the logits (rows), and the backward's own
    transients: a layer's gradients (or its recomputed activations), the logits' gradient."""
    from rlhf_cli.model.forward import HEAD_CHUNK

    tokens = seqs * length
    kept_logits, logits_tmp = logits_bytes(arch, s, positions, None if online else HEAD_CHUNK)
    gc = "with gradient checkpointing" if s.checkpointing else "no gradient checkpointing"
    rows = [
        Row(
            "activations",
            activation_bytes(arch, s, tokens, length),
            f"{seqs} {'packed rows' if s.packed else 'sequences'} x {length} tokens, {gc}, "
            f"{'bf16' if s.compute_bytes == 2 else 'fp32'}",
        )
    ]
    # A layer's backward holds the gradients of its MLP's intermediates (about four of them);
    # under gradient checkpointing, the layer's recomputed activations (its gradients take
    # their place as the backward goes).
    if s.checkpointing:
        transient = [("one layer recomputed", layer_activation_bytes(arch, s, length) * tokens)]
    else:
        transient = [("one layer's backward", 4 * arch.intermediate * s.compute_bytes * tokens)]
    if positions:
        what = (
            f"{positions} positions x {arch.vocab} vocabulary, fp32"
            if online
            else f"{positions} positions, in chunks of {HEAD_CHUNK} (d logp / d hidden kept)"
        )
        rows.append(Row("logits", kept_logits, what))
        transient.append(("logits in the backward", logits_tmp))
    return rows, transient


def other_models(cfg: Config, arch: Arch, s: Settings) -> tuple[list[Row], list[Row]]:
    """The reference (a second base with ref.model) and the reward model beside the policy;
    and, not at the peak, a reference precomputed to disk."""
    st = cfg.stage
    rows, extra_rows = [], []
    ref_name = getattr(cfg.ref, "model", None)
    if isinstance(st, (DpoConfig, KtoConfig, OnlineConfig)) and ref_name:
        rows.append(
            Row(
                "reference model",
                base_weight_bytes(arch, s),
                f"ref.model={ref_name}: a second base",
            )
        )
    if isinstance(st, (DpoConfig, KtoConfig)) and cfg.ref.precompute:
        extra_rows.append(
            Row(
                "precomputed reference",
                0.0,
                "log-probs cached on disk: no reference forward",
                peak=False,
            )
        )
    if isinstance(st, OnlineConfig) and cfg.reward.model:
        rows.append(
            Row(
                "reward model",
                4.0 * sum(lora_params(arch, s)) + 4.0 * (arch.hidden + 1),
                "a second adapter + head on the same base (another base: add its weights)",
            )
        )
    return rows, extra_rows


def engine_rows(cfg: Config, arch: Arch, device: str, tokens: int) -> list[Row]:
    """rollout.engine=vllm: the engine's copy of the merged policy (every weight, in the
    engine's dtype: not 4-bit) and its KV cache (rollout.kv_cache_gib, or what one generation
    batch of `tokens` needs at least)."""
    r = cfg.rollout
    size = {"float32": 4, "bfloat16": 2, "float16": 2}.get(r.dtype, 2 if device == "cuda" else 4)
    rows = [
        Row(
            "vLLM engine weights",
            float(size * arch.params),
            f"the merged policy, {8 * size}-bit, {arch.params / 1e9:.2f}B parameters",
        )
    ]
    per_token = 2 * arch.layers * arch.kv_heads * arch.head_dim * size
    kv = r.kv_cache_gib if r.kv_cache_gib is not None else (None if device == "cuda" else 0.5)
    if kv is not None:
        rows.append(Row("vLLM KV cache", kv * GIB, f"rollout.kv_cache_gib={kv:g}"))
    else:
        rows.append(
            Row(
                "vLLM KV cache",
                float(per_token * tokens),
                f"at least one rollout ({tokens} tokens); vLLM takes what "
                f"rollout.gpu_memory_utilization={r.gpu_memory_utilization:g} of the GPU leaves",
            )
        )
    return rows


def fsdp_rows(rows: list[Row], arch: Arch, s: Settings, ranks: int) -> list[Row]:
    """One rank's rows under dist.strategy=fsdp: the weights, gradients and optimizer state
    divided by the ranks, except what every rank keeps whole (a 4-bit base's quantization
    constants; an LM head tied to the embeddings), plus the weights FSDP gathers whole while it
    computes: the embedding (the decoder's unit, for its forward and its backward) and two
    decoder layers (the one computing and the next, prefetched)."""
    tied = arch.vocab * arch.hidden if arch.tied else 0
    whole = {
        "base weights": quant_constant_bytes(arch, s) + tied * s.base_bytes,
        # peft=full trains the tied matrix: whole on every rank, with its gradient and moments
        "trainable parameters": 4.0 * tied if s.full else 0.0,
        "gradients": 4.0 * tied if s.full else 0.0,
        "optimizer states": 8.0 * tied if s.full else 0.0,
    }
    out = []
    for r in rows:
        if r.name in whole:
            kept = min(whole[r.name], r.bytes)
            r = Row(r.name, (r.bytes - kept) / ranks + kept, f"{r.note}; 1/{ranks} a rank")
        out.append(r)
    lin = arch.linear_params / arch.layers
    stored = (
        lin / 2 if s.quant in ("nf4", "fp4") else lin if s.quant == "int8" else lin * s.base_bytes
    )
    layer = stored + 2 * arch.hidden * s.base_bytes + 4.0 * sum(lora_params(arch, s)) / arch.layers
    embedding = arch.vocab * arch.hidden * s.base_bytes
    gathered = (embedding + 2 * layer) * (1 - 1 / ranks)  # (its own shard counted above)
    out.append(Row("gathered by FSDP", gathered, "the embedding and two decoder layers, whole"))
    return out


KNOBS: list[tuple[str, dict]] = [
    ("train.gradient_checkpointing=true", {"train.gradient_checkpointing": True}),
    ("peft.dropout=0", {"peft.dropout": 0.0}),
    ("quant=nf4", {"quant.mode": "nf4"}),
    ("optim=adamw8bit", {"optim.name": "adamw8bit"}),
    ("halve train.micro_batch_size (double train.grad_accum)", {"train.micro_batch_size": "half"}),
    ("ref.precompute=true", {"ref.precompute": True}),
]


def with_change(cfg: Config, change: dict) -> Config | None:
    """A copy of cfg with the knob applied, or None when it does not apply."""
    import copy

    new = copy.deepcopy(cfg)
    for key, value in change.items():
        section, field = key.split(".")
        obj = getattr(new, section)
        old = getattr(obj, field)
        if value == "half":
            if old <= 1:
                return None
            value = old // 2
        if old == value:
            return None
        if key in ("quant.mode", "peft.dropout") and new.peft.method == "full":
            return None
        if key == "optim.name" and new.dist.strategy == "fsdp":  # (refused under FSDP)
            return None
        if key == "ref.precompute" and not (
            isinstance(new.stage, DpoConfig | KtoConfig) and new.ref.model
        ):
            return None
        setattr(obj, field, value)
    return new


def knobs(cfg: Config, device: str, arch: Arch, ranks: int = 1) -> list[tuple[str, float]]:
    """Each applicable knob with the total it gives, most saving first."""
    now = plan(cfg, device, arch, ranks=ranks).total
    out = []
    for label, change in KNOBS:
        new = with_change(cfg, change)
        if new is not None and (total := plan(new, device, arch, ranks=ranks).total) < now:
            out.append((label, total))
    return sorted(out, key=lambda t: t[1])


def gib(n: float) -> str:
    x = n / GIB
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.1 else f"{x:.4f}"


def stdout():
    """The plan is the command's output: stdout (progress and errors go to stderr)."""
    from rich.console import Console

    return Console(soft_wrap=True)


def show(cfg: Config, device: str, gpu_gib: float | None, ranks: int = 1) -> Plan:
    from rich.table import Table

    console = stdout()
    p = plan(cfg, device, ranks=ranks)
    sharded = ranks > 1 and cfg.dist.strategy == "fsdp"
    where = f"one rank of {ranks} (FSDP)" if sharded else f"one {device.upper()} device"
    if ranks > 1 and not sharded:
        where += f" (each of the {ranks} ranks holds it all: dist.strategy=ddp)"
    budget = gpu_gib
    a = p.arch
    console.print(
        f"rlhf plan stage={cfg.stage.name} model={cfg.model.name_or_path} ({p.source}): "
        f"{a.layers} layers, hidden {a.hidden}, {a.heads} heads / {a.kv_heads} KV, vocabulary "
        f"{a.vocab}; {where}"
    )
    table = Table(show_header=True, title_justify="left")
    table.add_column("memory")
    table.add_column("GiB", justify="right")
    table.add_column("what")
    for r in p.rows:
        table.add_row(r.name, gib(r.bytes) if r.peak else "-", r.note)
    table.add_row("[bold]total (peak)", f"[bold]{gib(p.total)}", "")
    console.print(table, soft_wrap=False)
    if budget:
        fits = p.total <= budget * GIB
        verdict = "fits" if fits else "does not fit"
        console.print(f"{verdict} in {budget:g} GiB ({100 * p.total / (budget * GIB):.0f}%)")
        if not fits:
            for label, total in knobs(cfg, device, a, ranks):
                mark = "fits" if total <= budget * GIB else "still over"
                console.print(f"  {label}: {gib(total)} GiB ({mark})")
    return p
