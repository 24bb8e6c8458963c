"""scripts/bench.py, TRL's side: the same configuration through TRL's trainers (a child process)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from bench_common import BATCH, GROUP, LORA, LR, ROLLOUT_TOKENS, SEED, TRL_PACKED_ROWS, _rate


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
