"""One environment class, written to TRL's `environment_factory` interface, run unchanged by TRL's
GRPOTrainer and by rlhf-cli (`stage.env=trl:check_trl_env:CounterEnv`): one GRPO step each on the
tiny model with TRL's Qwen2.5 chat template (it renders and parses tool calls), counting the calls
each trainer makes into the class (the random tiny model writes no tool call, so `increment` is
not called by either: tests/test_envs.py drives that part with scripted replies). Needs the
bench extra (TRL):

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/check_trl_env.py
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path

CALLS: Counter = Counter()  # reset / increment / get_reward calls, per trainer


class CounterEnv:
    """Reach a target with the increment tool; the reward is whether it was reached."""

    def reset(self, **kwargs) -> str | None:
        CALLS["reset"] += 1
        CALLS["reset with seed"] += "seed" in kwargs
        self.count = 0
        self.target = int(kwargs.get("seed", 0)) % 3 + 1
        return f" Reach {self.target} with the increment tool."

    def increment(self, step: int) -> str:
        """Add to the counter.

        Args:
            step: How much to add.
        """
        CALLS["increment"] += 1
        self.count += step
        return str(self.count)

    def get_reward(self) -> float:
        CALLS["get_reward"] += 1
        return float(self.count == self.target)


def template() -> Path:
    import trl

    return Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja"


def trl_side(out: Path, env_class: type) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_cli.model.tiny import tiny_model_dir

    model = str(tiny_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
    tokenizer.chat_template = template().read_text()
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    rows = [{"prompt": [{"role": "user", "content": "Count."}], "seed": i} for i in range(4)]
    args = GRPOConfig(
        output_dir=str(out),
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=16,
        max_tool_calling_iterations=2,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
    )
    trainer = GRPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        environment_factory=env_class,
    )
    trainer.train()


def our_side(out: Path) -> dict:
    from omegaconf import OmegaConf

    from rlhf_cli.compose import compose_checked
    from rlhf_cli.train import run

    cfg = compose_checked(
        [
            f"run_dir={out}",
            "stage=grpo",
            "stage.env=trl:check_trl_env:CounterEnv",
            f"model.chat_template={template()}",
            "data.path=episodes:8",
            "data.eval_size=0",
            "stage.group_size=2",
            "stage.rollout_batch_size=4",
            "stage.max_turns=2",
            "stage.max_new_tokens=16",
            "train.max_steps=1",
        ]
    )
    return run(cfg, OmegaConf.to_yaml(OmegaConf.structured(cfg)), out)


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # check_trl_env importable by name
    import check_trl_env as shared  # the module stage.env loads: one class, one counter

    tmp = Path(tempfile.mkdtemp(prefix="check-trl-env-"))
    trl_side(tmp / "trl", shared.CounterEnv)
    trl_calls = dict(shared.CALLS)
    shared.CALLS.clear()
    our_side(tmp / "ours")
    ours = dict(shared.CALLS)
    print(f"TRL GRPOTrainer, 1 step (2 prompts x 2 generations): {trl_calls}")
    print(f"rlhf-cli stage=grpo, 1 step (4 prompts x 2 samples):  {ours}")
    # every rollout reset with its row (the seed column among the keywords) and rewarded once
    ok = all(
        c.get("reset", 0) > 0 and c["reset"] == c.get("reset with seed") == c.get("get_reward")
        for c in (trl_calls, ours)
    )
    print("the class ran unchanged under both" if ok else "MISMATCH: a trainer skipped the class")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
