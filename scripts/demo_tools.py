"""A policy that learns to use a tool: SmolLM2-135M-Instruct, GRPO, the calculator environment
(`make demo-tools`, offline, on a CPU).

The task (`data=arithmetic`, shipped): "What is 47 * 83? Write the calculation, a calculator
will check it." The row's `answer` column holds the value; the prompt does not. The
environment (`rlhf_cli.multiturn:CalculatorEnv`) reads the first reply: where it writes a
calculation (`a op b`), the calculator's result comes back as the next user message, and the
second reply is the final answer; `rlhf_cli.rewards:math_answer` scores the final answer's last
number against the answer column (1 or 0). Two replies at most (stage.max_turns=2), 32 new
tokens each.

Per seed: GRPO from the instruct model (LoRA, unquantized base), STEPS steps of 8 prompts x 4
conversations; the 32 held-out prompts are evaluated before the first step and after the last
(4 conversations each at temperature 1: the success rate is the mean reward). A table
(OUT/results.md): per seed and mean ± standard deviation over seeds.

    python scripts/demo_tools.py [--out runs/demo-tools] [--seeds 1 2 3] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SETTINGS = (
    "stage=grpo",
    "model=smollm2-135m",
    "quant=none",
    "data=arithmetic",
    "stage.env=rlhf_cli.multiturn:CalculatorEnv",
    "stage.max_turns=2",
    "reward.fn=rlhf_cli.rewards:math_answer",
    "stage.rollout_batch_size=8",
    "stage.group_size=4",
    "stage.max_new_tokens=32",
    "optim.lr=3e-4",
    "train.eval_on_start=true",
    "train.save_every=0",
)


def metrics(run: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "eval"]


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "demo-tools")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        run = args.out / f"grpo_s{seed}"
        if not (run / "final").is_dir():
            t0 = time.time()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "rlhf_cli",
                    "train",
                    *SETTINGS,
                    f"train.max_steps={args.steps}",
                    f"train.seed={seed}",
                    f"run_dir={run}",
                ],
                check=True,
                cwd=REPO,
            )
            print(f"seed {seed}: {time.time() - t0:.0f} s", flush=True)
        train, evals = metrics(run)
        rows.append(
            {
                "seed": seed,
                "base": evals[0]["score"],
                "trained": evals[-1]["score"],
                "kl": evals[-1]["kl"],
                "turns_first": train[0]["turns"],
                "turns_last": train[-1]["turns"],
                "train_first": statistics.fmean(r["score"] for r in train[:3]),
                "train_last": statistics.fmean(r["score"] for r in train[-3:]),
            }
        )
    lines = [
        "# GRPO with a calculator: SmolLM2-135M-Instruct on two-digit arithmetic",
        "",
        f"{args.steps} steps of 8 prompts x 4 conversations; 32 held-out prompts x 4 conversations "
        "evaluated before and after (success = the final answer equals the answer column).",
        "",
        "| seed | held-out success before | after | KL after | replies/conversation first "
        "-> last step | training reward, first 3 -> last 3 steps |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['base']:.3f} | {r['trained']:.3f} | {r['kl']:.2f} | "
            f"{r['turns_first']:.2f} -> {r['turns_last']:.2f} | "
            f"{r['train_first']:.3f} -> {r['train_last']:.3f} |"
        )
    lines.append(
        f"| mean ± std | {mean_std([r['base'] for r in rows])} | "
        f"{mean_std([r['trained'] for r in rows])} | {mean_std([r['kl'] for r in rows])} | | |"
    )
    text = "\n".join(lines) + "\n"
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
