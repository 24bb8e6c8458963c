"""scripts/bench.py, our side: one configuration through rlhf-cli's own loop (a child process)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from bench_common import BATCH, GROUP, LORA, LR, PACKING_ATTENTION, ROLLOUT_TOKENS, SEED, _rate


def run_ours(spec: dict, run_dir: Path) -> dict:
    from omegaconf import OmegaConf

    import rlhf_cli.train as train_mod
    from rlhf_cli.compose import compose_checked
    from rlhf_cli.core.progress import Reporter
    from rlhf_cli.trainer.loop import Stage

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

    from rlhf_cli.trainer.online import OnlineStage

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
