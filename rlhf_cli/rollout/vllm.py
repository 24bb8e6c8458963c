"""Rollout engines: who writes the responses the online stages and rs learn from (and those of
`rlhf sample` / `rlhf eval`). One interface (`generate(prompts, generation) -> replies`), two
engines, picked by rollout.engine:

- hf: transformers' generate on the training model itself (left-padded batches, the KV cache).
  It is the policy: nothing to keep in sync.
- vllm: a vLLM engine inside the training process (colocated; one per rank under torchrun)
  holding a merged copy of the policy: base + LoRA (W + scale B A of the active adapter, out of
  place: the trained model is never merged and unmerged), a 4-bit or 8-bit base dequantized
  first, in rollout.dtype. After an optimizer update the copy is stale and the next generation
  reloads it in place (`rollout/sync_s`) and drops vLLM's prefix cache, whose prompt states
  came from the old weights. Its sampled tokens' log-probs come back with the replies; the
  trainer's own stay the ones trained on (the online stages log the difference and can weight
  the loss by their ratio: rollout.tis_cap).

Why merged weights and not vLLM's LoRA path: on a CPU its LoRA kernels copy the matrices per
token (47 tokens/s against 82 for HF + peft on SmolLM2-135M, greedy output equal), while a
reload of the merged 135M model takes about 0.6 s a step. A 4-bit base cannot be served by
vLLM's CPU build anyway, so the engine holds the dequantized weights (their memory is counted by
`rlhf plan`).

Seeds: both engines draw from torch's global generator, which a checkpoint saves; the hf engine
samples with it, the vllm engine draws one number per batch and seeds each request from it (and
its position in the batch). A resumed run therefore samples what the uninterrupted run sampled,
with either engine (tests/test_vllm.py). The two engines sample different tokens from the same
seed: they use different random streams.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from rlhf_cli.core import distributed as dist
from rlhf_cli.core.errors import UserError, first_line
from rlhf_cli.core.progress import console
from rlhf_cli.core.quiet import native_stderr_silenced
from rlhf_cli.rollout.batch import Reply

VLLM_INSTALL = 'make install VLLM=1 (or pip install -e ".[vllm]" on a CUDA machine)'


# -- vLLM ------------------------------------------------------------------------------------


def require_vllm():
    """Import vllm (in-process engine, quiet logs), or one line naming the install command."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
    try:
        import vllm
    except ModuleNotFoundError as err:
        if err.name == "vllm":
            raise UserError(f"rollout.engine=vllm needs vLLM: {VLLM_INSTALL}") from None
        raise UserError(f"rollout.engine=vllm: vLLM fails to import: {err}") from None
    except (ImportError, RuntimeError, OSError) as err:
        # pip brings CUDA builds of torchvision/torchaudio next to the CPU build of vllm; their
        # operators then fail to load (`operator torchvision::nms does not exist`).
        line = first_line(err)
        hint = ""
        if "torchvision" in str(err) or "torchaudio" in str(err):
            hint = (
                " (CUDA builds of torchvision/torchaudio beside a CPU torch: "
                "pip uninstall -y torchvision torchaudio torchcodec)"
            )
        raise UserError(f"rollout.engine=vllm: vLLM fails to import: {line}{hint}") from None
    return vllm


def engine_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def is_quantized(layer: torch.nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer (its weight holds codes, not values)."""
    weight = getattr(layer, "weight", None)
    return type(weight).__name__ in ("Params4bit", "Int8Params")


def plain_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight as a plain float tensor: a bitsandbytes 4-bit or 8-bit weight
    dequantized (exactly what its forward multiplies by)."""
    if is_quantized(layer):
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(layer.weight, getattr(layer, "state", None))
    return layer.weight


def unmergeable(model) -> str | None:
    """What merged_weights cannot fold into W + scale B A: a DoRA adapter (its magnitude
    vector rescales the merged weight) or a LoRA bias (`lora_bias`); None when there is none."""
    from peft.tuners.lora import LoraLayer

    active = list(getattr(model, "active_adapters", None) or [])
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in active:
            if getattr(module, "use_dora", {}).get(adapter):
                return f"a DoRA adapter ({name})"
            if getattr(module, "lora_bias", {}).get(adapter):
                return f"a LoRA bias (lora_bias, {name})"
    return None


def trains_embeddings(model) -> bool:
    """Whether the trained policy's input embeddings or LM head differ from the base's (wrapped
    by peft: modules_to_save, or a LoRA on them): with tied embeddings the engine must hold them
    untied, or loading the trained head would overwrite its input embeddings too (and the
    reverse)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    if not hasattr(model, "get_base_model"):
        return False
    base = model.get_base_model()
    heads = {base.get_input_embeddings(), base.get_output_embeddings()}
    for module in base.modules():
        # (peft's wrapper stands in the model's place, so it may be what the getters return)
        if isinstance(module, ModulesToSaveWrapper) and heads & {module, module.original_module}:
            return True
        if isinstance(module, LoraLayer) and heads & {module, module.get_base_layer()}:
            return True
    return False


@torch.no_grad()
def merged_weights(model, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy as one plain checkpoint, a tensor at a time, under the base model's names:
    each LoRA layer's weight is its base weight (dequantized) + the active adapters' B A
    scale, computed out of place in float32; modules_to_save give their trained copy; every
    other parameter as it is. Frozen extra adapters (the reference's, a reward model's) are
    left out."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    active = list(getattr(model, "active_adapters", None) or [])
    done: list[str] = []  # modules whose parameters are given already (with their children)
    for name, module in base.named_modules():
        if any(name.startswith(prefix + ".") for prefix in done):
            continue
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            weight = plain_weight(layer).float()
            for adapter in active:
                if adapter in module.lora_A and not module.disable_adapters:
                    weight = weight + module.get_delta_weight(adapter).float()
            yield f"{name}.weight", weight.to(dtype)
            if getattr(layer, "bias", None) is not None:
                yield f"{name}.bias", layer.bias.to(dtype)
            done.append(name)
        elif isinstance(module, ModulesToSaveWrapper):
            copy = module.modules_to_save[active[0]] if active else module.original_module
            for key, value in copy.named_parameters():
                yield f"{name}.{key}", value.to(dtype)
            done.append(name)
        elif is_quantized(module):  # a quantized linear without LoRA: dequantized as well
            yield f"{name}.weight", plain_weight(module).to(dtype)
            if getattr(module, "bias", None) is not None:
                yield f"{name}.bias", module.bias.to(dtype)
            done.append(name)
        else:
            for key, value in module.named_parameters(recurse=False):
                yield (f"{name}.{key}" if name else key), value.to(dtype)


@contextmanager
def process_state_kept():
    """Starting a vLLM worker seeds every global generator (torch, numpy, random) with its own
    seed and replaces torch.set_num_threads with a no-op (its CPU threads are bound): keep this
    process's random streams (the run's exact resume depends on them) and thread control."""
    import numpy as np

    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)


# One engine per process and model shape: a test suite (or `rlhf sample` after a run) reuses it;
# its weights are reloaded from the policy before it first generates for a new owner.
_ENGINES: dict[tuple, Any] = {}


_LOADED: dict[tuple, int] = {}  # engine key -> serial of the VLLMEngine whose weights it holds


_SERIALS = iter(range(1, 2**62))


class VLLMEngine:
    """A vLLM engine in this process holding the merged policy; see the module docstring."""

    name = "vllm"

    def __init__(self, rollout_cfg, model, tokenizer, model_dir: str, device: torch.device):
        self.cfg = rollout_cfg
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.dtype = engine_dtype(rollout_cfg.dtype, device)
        self.sync_seconds = 0.0  # the reloads' time since the caller last reset it
        self.stale = True  # the first generation loads the policy
        self.sleeping = False
        context = (
            getattr(model.config, "max_position_embeddings", None) or rollout_cfg.max_model_len
        )
        self.max_len = self.max_context = min(rollout_cfg.max_model_len, int(context))
        cuda = device.type == "cuda"
        kv = rollout_cfg.kv_cache_gib
        if kv is None and not cuda:
            kv = 0.5
        self.sleep_mode = cuda and rollout_cfg.sleep
        what = unmergeable(model)
        if what is not None:
            raise UserError(
                f"rollout.engine=vllm: the policy has {what}, which the engine's merged weights "
                "(W + scale B A) cannot hold: use rollout.engine=hf, or a plain LoRA adapter"
            )
        # Tied embeddings whose trained copy differs from the base's: the engine holds them
        # untied (vLLM would otherwise load the trained LM head into the input embeddings).
        self.untied = bool(getattr(model.config, "tie_word_embeddings", False)) and (
            trains_embeddings(model)
        )
        self.key = (
            model_dir,
            str(self.dtype),
            self.max_len,
            kv,
            str(device),
            self.sleep_mode,
            self.untied,
        )
        self.serial = next(_SERIALS)
        self.llm = _ENGINES.get(self.key)
        if self.llm is None:
            self.llm = _ENGINES[self.key] = self._start(model_dir, kv, cuda)

    def _start(self, model_dir: str, kv_gib: float | None, cuda: bool):
        vllm = require_vllm()
        kwargs: dict[str, Any] = dict(
            model=model_dir,
            dtype=str(self.dtype).removeprefix("torch."),
            # The weights come from the policy at the first generation (never read from disk:
            # the model may be an offline copy, a resumed run or a merged adapter).
            load_format="dummy",
            skip_tokenizer_init=True,  # token ids in, token ids out
            generation_config="vllm",  # no defaults from the model's generation_config.json
            # The log-probs of the distribution sampled from (temperature, top_p/top_k/min_p
            # applied): the behaviour policy, whose ratio to the trainer's TIS corrects.
            logprobs_mode="processed_logprobs",
            max_model_len=self.max_len,
            seed=0,  # every request carries its own seed
            enforce_eager=not cuda,  # compiling gained nothing on a CPU and took 2 minutes
            enable_prefix_caching=True,
        )
        if kv_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_gib * 2**30)
        if self.untied:
            kwargs["hf_overrides"] = {"tie_word_embeddings": False}
        if cuda:
            kwargs["gpu_memory_utilization"] = self.cfg.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = self.sleep_mode
        if dist.world_size() > 1:
            # Under torchrun: each rank's engine is its own data-parallel replica in the
            # process group torchrun started (as TRL's colocate mode does).
            kwargs["distributed_executor_backend"] = "external_launcher"
        t0 = time.perf_counter()

        # (its CPU worker prints a NUMA-binding note from C++ on stderr: not the run's line)
        with process_state_kept(), native_stderr_silenced():
            try:
                llm = vllm.LLM(**kwargs)
            except (ValueError, RuntimeError) as err:
                line = first_line(err)
                raise UserError(f"rollout.engine=vllm: the engine did not start: {line}") from None

        console.print(
            f"rollout: vLLM {vllm.__version__} engine started in {time.perf_counter() - t0:.1f}s "
            f"({kwargs['dtype']}, up to {self.max_len} tokens a sequence)"
        )
        return llm

    def policy_changed(self) -> None:
        self.stale = True

    def sync(self) -> float:
        """Load the policy's merged weights into the engine (when they changed); seconds."""
        if not self.stale and _LOADED.get(self.key) == self.serial:
            return 0.0
        t0 = time.perf_counter()
        if self.sleeping:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": merged_weights(self.model, self.dtype)}
        )
        self.llm.reset_prefix_cache()  # cached prompt states came from the old weights
        self.stale = False
        _LOADED[self.key] = self.serial
        seconds = time.perf_counter() - t0
        self.sync_seconds += seconds
        return seconds

    def sampling_params(self, generation, seed: int):
        """vLLM's SamplingParams for a transformers GenerationConfig (rollout.engine.
        generation_config): the same temperature, top_p, top_k, min_p, length and EOS."""
        from vllm import SamplingParams

        sampling = bool(generation.do_sample)
        return SamplingParams(
            n=1,
            temperature=float(generation.temperature) if sampling else 0.0,
            top_p=float(generation.top_p or 1.0) if sampling else 1.0,
            top_k=int(generation.top_k or 0) if sampling else 0,
            min_p=float(generation.min_p or 0.0) if sampling else 0.0,
            max_tokens=int(generation.max_new_tokens),
            stop_token_ids=[self.tokenizer.eos_token_id],
            logprobs=0,  # the sampled token's
            seed=seed,
            detokenize=False,
        )

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], generation) -> list[Reply]:
        from vllm.inputs import TokensPrompt

        self.sync()
        if self.sleeping:
            self.llm.wake_up(tags=["kv_cache"])
            self.sleeping = False
        longest = max(len(p) for p in prompts) + int(generation.max_new_tokens)
        if longest > self.max_len:
            raise UserError(
                f"rollout.engine=vllm: a prompt of {longest - int(generation.max_new_tokens)} "
                f"tokens + {int(generation.max_new_tokens)} new ones exceeds the engine's "
                f"{self.max_len}: raise rollout.max_model_len (the model allows "
                f"{getattr(self.model.config, 'max_position_embeddings', '?')}) or shorten "
                "data.max_prompt_length / stage.max_new_tokens"
            )
        # One draw from the global generator (checkpointed) seeds this batch's requests. vLLM's
        # CPU sampler also draws from the global generator at every decode step (seeds it then
        # replaces with the requests' own): it runs on a fork of it, seeded from the same draw,
        # so the run's stream advances by exactly one draw per batch.
        base = int(torch.randint(0, 2**31 - 1, ()).item())
        seeds = [(base * 1_000_003 + dist.rank() * 65_537 + i) % 2**63 for i in range(len(prompts))]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(base)
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                [self.sampling_params(generation, s) for s in seeds],
                use_tqdm=False,
            )
        eos = self.tokenizer.eos_token_id
        replies = []
        for out in outputs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            logps = [d[t].logprob for d, t in zip(c.logprobs, ids)] if c.logprobs else None
            replies.append(Reply(ids, bool(ids) and ids[-1] == eos, logps))
        return replies

    def release(self) -> None:
        """After a step's rollouts (every turn and dynamic-sampling try done), before the
        update: on CUDA with rollout.sleep, the engine sleeps at level 2 (weights and KV cache
        freed, so the update gets the memory back; the weights are reloaded from the updated
        policy before the next rollout anyway)."""
        if self.sleep_mode and not self.sleeping:
            self.llm.sleep(level=2)
            self.sleeping, self.stale = True, True
