"""The DPO paper's controlled-sentiment experiment in miniature, on the tiny model, offline, on a
CPU (`make demo`).

Rafailov et al. (2023, section 6.1) fine-tune GPT-2 on IMDb reviews, then train it to write
positive reviews with a sentiment classifier as the ground-truth reward, and plot that reward
against the KL to the reference for DPO and PPO. Here:

1. the corpus (scripts/make_reviews.py -> OUT/reviews.jsonl): film reviews from word lists,
   their sentiment mixed so that it averages 0; `rlhf_cli.sentiment:score` is the exact ground
   truth;
2. SFT: the tiny model, fully fine-tuned on the reviews, merged (`rlhf merge`) into a plain
   model directory: the reference, neutral on average;
3. preferences: two samples of the SFT model per prompt, the more positive one chosen (ties
   dropped); a tenth of them held out for evaluation;
4. from the SFT model (a fresh LoRA adapter on its 4-bit NF4 base, the reference being that
   base with the adapter disabled): DPO at several betas; a reward model on the pairs, then PPO
   against it; GRPO with the ground-truth function itself; KTO on the pairs split into
   desirable and undesirable reviews; rejection sampling (best of 8) with the ground truth;
5. `rlhf eval` of every policy: mean ground-truth reward and KL to the reference on fresh
   samples (and accuracies on the held-out pairs), a table and a reward-vs-KL frontier PNG.

Every step is an `rlhf` command, printed as it runs (logs under OUT/logs/). Independent runs go
in parallel (--jobs, one thread each). `--quick` is the reduced pipeline of tests/test_demo.py.

    python scripts/demo.py [--out runs/demo] [--seeds 1 2 3] [--jobs 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from make_reviews import write_reviews  # noqa: E402

from rlhf_cli.sentiment import review_prompts, sentiment  # noqa: E402

REWARD_FN = "reward.fn=rlhf_cli.sentiment:score"
MARKER = ".rlhf-demo"


@dataclass
class Plan:
    """Steps and sizes of the experiment (the defaults are `make demo`)."""

    sft_steps: int = 150
    dpo_steps: int = 60
    betas: tuple[float, ...] = (1.0, 0.3, 0.1, 0.03)
    dpo_lr: float = 1e-3  # 2e-3 drives the small betas into degenerate text within 40 steps
    rm_steps: int = 40
    ppo_steps: int = 30
    grpo_steps: int = 30
    kto_steps: int = 60  # on the pairs split in two: twice the examples of a DPO step's pairs
    rs_rounds: int = 6  # rejection sampling: 64 prompts x 8 samples a round, the best kept
    lr: float = 2e-3  # rm, ppo, grpo, rs
    methods: tuple[str, ...] = ("dpo", "kto", "ppo", "grpo", "rs")
    pair_prompts: int = 800  # prompts (rows of the corpus) sampled twice for preferences
    eval_samples: int = 2  # per eval prompt (the corpus has 90 distinct prompts)
    max_new_tokens: int = 40
    quant: str = "nf4"


QUICK = Plan(
    sft_steps=60,
    dpo_steps=20,
    betas=(0.1,),
    dpo_lr=2e-3,
    methods=("dpo",),
    pair_prompts=400,
    eval_samples=1,
)


class Runner:
    """Runs `rlhf` commands (printed first; output to OUT/logs/<name>.log)."""

    def __init__(self, out: Path, threads: int):
        self.out = out
        self.env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
        }
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, *args: str) -> None:
        command = [sys.executable, "-m", "rlhf_cli", *args]
        print(f"$ rlhf {shlex.join(args)}", flush=True)
        t0 = time.perf_counter()
        log = self.out / "logs" / f"{name}.log"
        with log.open("w") as fh:
            done = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, env=self.env)
        if done.returncode:
            tail = log.read_text().splitlines()[-15:]
            raise SystemExit(f"{name} failed (exit {done.returncode}); {log}:\n" + "\n".join(tail))
        print(f"  {name}: done in {time.perf_counter() - t0:.0f}s", flush=True)


def preference_pairs(samples: Path, pairs: Path, held_out: Path) -> tuple[int, int]:
    """Consecutive samples of one prompt -> {prompt, chosen, rejected} by the ground truth,
    ties dropped; every tenth pair goes to `held_out`."""
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    labelled = []
    for a, b in zip(rows[0::2], rows[1::2], strict=True):
        assert a["prompt"] == b["prompt"]
        sa, sb = sentiment(a["response"]), sentiment(b["response"])
        if sa != sb:
            chosen, rejected = (a, b) if sa > sb else (b, a)
            labelled.append(
                {
                    "prompt": a["prompt"],
                    "chosen": chosen["response"],
                    "rejected": rejected["response"],
                }
            )
    train = [p for i, p in enumerate(labelled) if i % 10]
    test = labelled[::10]
    pairs.write_text("".join(json.dumps(p) + "\n" for p in train))
    held_out.write_text("".join(json.dumps(p) + "\n" for p in test))
    return len(train), len(test)


def run(out: Path, plan: Plan, seeds: list[int], jobs: int) -> list[dict]:
    t0 = time.perf_counter()
    if (out / MARKER).is_file():
        shutil.rmtree(out)  # the previous demo's output: start afresh
    elif out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty and not a previous demo's output: choose --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by scripts/demo.py; removed when it runs again\n")
    rlhf = Runner(out, threads=max(1, (os.cpu_count() or 1) // jobs))
    single = Runner(out, threads=os.cpu_count() or 1)
    sft_model, prompts = out / "sft_model", out / "eval_prompts.jsonl"
    pairs, held_out = out / "preferences.jsonl", out / "preferences_heldout.jsonl"
    corpus = write_reviews(out)
    data = ("data=reviews", f"data.path={corpus}")
    rows = corpus.read_text().splitlines()[: plan.pair_prompts]
    (out / "pair_prompts.jsonl").write_text("".join(line + "\n" for line in rows))
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in review_prompts()))

    # 1-3: the reference and its preference data (once, shared by every seed)
    single(
        "sft",
        "train",
        "stage=sft",
        *data,
        "peft=full",
        "quant=none",
        f"train.max_steps={plan.sft_steps}",
        "train.micro_batch_size=16",
        "train.save_every=0",
        "optim.lr=2e-3",
        f"run_dir={out / 'sft'}",
    )
    single("merge", "merge", str(out / "sft"), f"out={sft_model}", "force=true")
    single(
        "sample_pairs",
        "sample",
        str(sft_model),
        f"prompts={out / 'pair_prompts.jsonl'}",
        "n=2",
        "temperature=1",
        f"max_new_tokens={plan.max_new_tokens}",
        "batch_size=128",
        f"out={out / 'sft_samples.jsonl'}",
        "force=true",
    )
    n_train, n_test = preference_pairs(out / "sft_samples.jsonl", pairs, held_out)
    print(f"  preferences: {n_train} pairs to train on, {n_test} held out", flush=True)

    # 4-5: one chain of commands per method and seed, `jobs` chains at a time
    def evaluate(name: str, policy: Path, label: str, seed: int, *more: str) -> list:
        return [
            name,
            "eval",
            str(policy),
            f"prompts={prompts}",
            REWARD_FN,
            f"pairs={held_out}",
            f"n={plan.eval_samples}",
            f"max_new_tokens={plan.max_new_tokens}",
            "batch_size=64",
            f"seed={seed}",
            f"label={label}",
            f"out={out / 'eval' / (name.removeprefix('eval_') + '.json')}",
            "force=true",
            *more,
        ]

    def train(name: str, *args: str) -> list:
        # A fresh LoRA adapter on the SFT model: the reference is that model, adapter disabled.
        common = [f"model.name_or_path={sft_model}", f"quant={plan.quant}", "peft.dropout=0"]
        return [name, "train", *args, *common, "train.save_every=0", f"run_dir={out / name}"]

    chains: list[list[list]] = []
    for seed in seeds:
        s = f"train.seed={seed}"
        chains.append(
            [
                evaluate(
                    f"eval_sft_s{seed}",
                    sft_model,
                    "SFT",
                    seed,
                    f"ref={sft_model}",
                    f"quant={plan.quant}",
                )
            ]
        )
        if "dpo" in plan.methods:
            for beta in plan.betas:
                name = f"dpo_b{beta}_s{seed}"
                chains.append(
                    [
                        train(
                            name,
                            "stage=dpo",
                            f"data.path={pairs}",
                            "data.eval_size=0",
                            f"stage.beta={beta}",
                            f"optim.lr={plan.dpo_lr}",
                            f"train.max_steps={plan.dpo_steps}",
                            "train.micro_batch_size=16",
                            s,
                        ),
                        evaluate(f"eval_{name}", out / name, f"DPO beta={beta}", seed),
                    ]
                )
        if "kto" in plan.methods:
            chains.append(
                [
                    train(
                        f"kto_s{seed}",
                        "stage=kto",
                        f"data.path={pairs}",
                        "data.eval_size=0",
                        f"optim.lr={plan.dpo_lr}",
                        f"train.max_steps={plan.kto_steps}",
                        "train.micro_batch_size=16",
                        s,
                    ),
                    evaluate(f"eval_kto_s{seed}", out / f"kto_s{seed}", "KTO beta=0.1", seed),
                ]
            )
        if "rs" in plan.methods:
            chains.append(
                [
                    train(
                        f"rs_s{seed}",
                        "stage=rs",
                        REWARD_FN,
                        *data,
                        "data.eval_size=0",
                        "stage.n=8",
                        f"stage.rounds={plan.rs_rounds}",
                        "stage.prompts_per_round=64",
                        "stage.rollout_batch_size=32",
                        f"stage.max_new_tokens={plan.max_new_tokens}",
                        f"optim.lr={plan.lr}",
                        "train.micro_batch_size=16",
                        s,
                    ),
                    evaluate(
                        f"eval_rs_s{seed}", out / f"rs_s{seed}", "RS best-of-8 (ground truth)", seed
                    ),
                ]
            )
        if "ppo" in plan.methods:
            chains.append(
                [
                    train(
                        f"rm_s{seed}",
                        "stage=rm",
                        f"data.path={pairs}",
                        f"data.eval_path={held_out}",
                        f"optim.lr={plan.lr}",
                        f"train.max_steps={plan.rm_steps}",
                        "train.micro_batch_size=16",
                        s,
                    ),
                    train(
                        f"ppo_s{seed}",
                        "stage=ppo",
                        f"reward.model={out / f'rm_s{seed}'}",
                        *data,
                        "data.eval_size=0",
                        f"optim.lr={plan.lr}",
                        f"train.max_steps={plan.ppo_steps}",
                        f"stage.max_new_tokens={plan.max_new_tokens}",
                        "stage.normalize_rewards=true",
                        s,
                    ),
                    evaluate(f"eval_ppo_s{seed}", out / f"ppo_s{seed}", "PPO (reward model)", seed),
                ]
            )
        if "grpo" in plan.methods:
            chains.append(
                [
                    train(
                        f"grpo_s{seed}",
                        "stage=grpo",
                        REWARD_FN,
                        *data,
                        "data.eval_size=0",
                        f"optim.lr={plan.lr}",
                        f"train.max_steps={plan.grpo_steps}",
                        f"stage.max_new_tokens={plan.max_new_tokens}",
                        s,
                    ),
                    evaluate(
                        f"eval_grpo_s{seed}", out / f"grpo_s{seed}", "GRPO (ground truth)", seed
                    ),
                ]
            )

    def run_chain(chain: list[list]) -> None:
        for name, *args in chain:
            rlhf(name, *args)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for _ in pool.map(run_chain, chains):
            pass

    results = [json.loads(p.read_text()) for p in sorted((out / "eval").glob("*.json"))]
    rows = summarise(results)
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "results.md").write_text(markdown(rows, seeds))
    evals = [str(p) for p in sorted((out / "eval").glob("*.json"))]
    single("plot_frontier", "plot", *evals, f"out={out / 'frontier.png'}", "force=true")
    if "dpo" in plan.methods:
        dpo_runs = [str(out / f"dpo_b{b}_s{seeds[0]}") for b in plan.betas]
        single("plot_dpo", "plot", *dpo_runs, f"out={out / 'dpo_metrics.png'}", "force=true")
    print()
    print(markdown(rows, seeds))
    print(f"demo: done in {time.perf_counter() - t0:.0f}s; results in {out}")
    return rows


ORDER = ("SFT", "DPO", "KTO", "PPO", "GRPO", "RS")


def summarise(results: list[dict]) -> list[dict]:
    """One row per label: mean and std over seeds of reward, KL and held-out accuracies."""
    by_label: dict[str, list[dict]] = {}
    for r in results:
        by_label.setdefault(r["label"], []).append(r)

    def stats(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    rows = []
    for label, rs in by_label.items():
        row = {"label": label, "seeds": len(rs)}
        for key, get in (
            ("reward", lambda r: r["reward"]),
            ("kl", lambda r: r["kl"]),
            ("preference_accuracy", lambda r: r["pairs"]["preference_accuracy"]),
            ("implicit_accuracy", lambda r: r["pairs"]["implicit_accuracy"]),
        ):
            row[key], row[f"{key}_std"] = stats([get(r) for r in rs])
        row["per_seed_reward"] = [r["reward"] for r in rs]
        rows.append(row)
    rows.sort(key=lambda r: (ORDER.index(r["label"].split()[0]), -r["kl"]))
    return rows


def markdown(rows: list[dict], seeds: list[int]) -> str:
    spread = f"mean ± std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else "one seed"
    lines = [
        "| policy | ground-truth reward | KL to SFT (nats/seq) | held-out pref. acc. | implicit-reward acc. |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            f"{r[k]:.3f} ± {r[k + '_std']:.3f}"
            for k in ("reward", "kl", "preference_accuracy", "implicit_accuracy")
        ]
        if r["kl"] == 0:
            cells[-1] = "n/a (its own reference)"
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n({spread}; reward in [-1, 1], SFT is the reference)\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--quick", action="store_true", help="the reduced pipeline of the tests")
    args = parser.parse_args(argv)
    run(args.out, QUICK if args.quick else Plan(), args.seeds, args.jobs)


if __name__ == "__main__":
    main()
