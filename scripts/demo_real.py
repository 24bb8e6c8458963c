"""Learning on a real model: SmolLM2-135M-Instruct, offline, on a CPU (`make demo-real`).

The property: complete answers of at most 20 words (`rlhf_cli.rewards:concise`, and the answer
ends with <|im_end|> within 48 new tokens), which the instruct model gives in about a fifth of
its samples at temperature 1. Prompts: the shipped
`builtin:prompts` (200 instructions), the first 160 to train on, the last 40 held out.

1. on-policy pairs: 4 samples of the base model per training prompt (`rlhf sample`; 8 per
   held-out prompt); samples with the property (chosen) paired with samples without it
   (rejected), each sample used once;
2. per seed: DPO on the pairs; KTO on the same pairs split into desirable and undesirable
   answers; GRPO with the property as its reward (`concise`, minus 1 for an answer cut off
   without <|im_end|>: stage.missing_eos_penalty=1); rejection sampling (best of 4 per prompt
   by the same reward, 3 rounds of 32 prompts); a reward model on the pairs, scored on the
   held-out pairs (`rlhf score`: pairwise accuracy);
3. `rlhf eval` of the base model and of every policy on the held-out prompts (4 samples each at
   temperature 1): the property's rate (the mean reward) and the KL to the reference;
4. a table (OUT/results.md): mean ± standard deviation over seeds.

The pairs are sampled once (seed 0) and shared by every seed; the seeds change the training
(data order, LoRA init, rollouts) and the evaluation samples.

    python scripts/demo_real.py [--out runs/demo-real] [--seeds 1 2 3] [--methods dpo kto ...]
    python scripts/demo_real.py --keep ...   # add to OUT: what is there already is not redone
    python scripts/demo_real.py --variants [--seeds 1 2 3]   # the online variants (below)

--variants: the online RL variants on the same task, same budget (VARIANT_STEPS steps of 4
prompts x 4 samples, two updates of 8 responses a step, lr 5e-4, missing_eos_penalty 1 as the
soft overlong penalty; KL 0.02 but for DAPO), each evaluated on the held-out prompts (2 samples
each at temperature 1); the table goes to OUT/variants.md. The same seed gives every variant
the same first rollouts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from demo import Runner  # noqa: E402

from rlhf_cli.rewards import concise  # noqa: E402

MODEL = "model=smollm2-135m"
REWARD_FN = "reward.fn=rlhf_cli.rewards:concise"
MARKER = ".rlhf-demo-real"
EVAL_SAMPLES, MAX_NEW = 4, 48
COMMON = (MODEL, "quant=none", "train.save_every=0", "data.eval_size=0")


def base_model_dir() -> str:
    from rlhf_cli.config import ModelConfig
    from rlhf_cli.model.load import model_path

    return model_path(ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct"))


def write_prompts(out: Path) -> tuple[Path, Path]:
    from rlhf_cli.data.rows import builtin_path

    lines = builtin_path("prompts").read_text().splitlines()
    train, held = out / "prompts_train.jsonl", out / "prompts_heldout.jsonl"
    train.write_text("\n".join(lines[:160]) + "\n")
    held.write_text("\n".join(lines[160:]) + "\n")
    return train, held


def has_property(row: dict) -> bool:
    return bool(row["ended"]) and concise([""], [row["response"]])[0] == 1.0


def pairs_from(samples: Path, pairs: Path, per_prompt: int) -> int:
    """Samples of each prompt (per_prompt in a row) -> {prompt, chosen, rejected}: samples with
    the property paired with samples without it, each sample in one pair at most (a prompt
    with 1 good and 3 bad samples gives one pair, 2 and 2 give two)."""
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    out = []
    for i in range(0, len(rows), per_prompt):
        group = rows[i : i + per_prompt]
        assert all(r["prompt"] == group[0]["prompt"] for r in group)
        good = [r["response"] for r in group if has_property(r)]
        bad = [r["response"] for r in group if not has_property(r)]
        for chosen, rejected in zip(good, bad):
            out.append({"prompt": group[0]["prompt"], "chosen": chosen, "rejected": rejected})
    pairs.write_text("".join(json.dumps(p) + "\n" for p in out))
    return len(out)


METHODS = ("dpo", "kto", "grpo", "rs", "rm")
KINDS = ("base", "dpo", "kto", "grpo", "rs")  # the policies evaluated


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "demo-real")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--dpo-steps", type=int, default=20)
    ap.add_argument("--grpo-steps", type=int, default=10)
    ap.add_argument("--rm-steps", type=int, default=20)
    ap.add_argument("--kto-steps", type=int, default=20)
    ap.add_argument("--rs-rounds", type=int, default=3)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument(
        "--keep", action="store_true", help="keep OUT's finished runs and evals; do the rest"
    )
    ap.add_argument("--summarize", action="store_true", help="only rebuild OUT/results.md")
    ap.add_argument(
        "--variants", action="store_true", help="the online variants' table (OUT/variants.md)"
    )
    args = ap.parse_args()
    out: Path = args.out
    if args.summarize:
        print(summarize(out, args.seeds))
        return
    if args.variants:
        run_variants(out, args.seeds)
        return
    if (out / MARKER).is_file() and not args.keep:
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise SystemExit(f"{out} is not empty and not a previous demo's output: choose --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by scripts/demo_real.py; removed when it runs again\n")
    t0 = time.perf_counter()
    rlhf = Runner(out, threads=0)
    rlhf.env.pop("OMP_NUM_THREADS")
    base = base_model_dir()
    train_prompts, held_prompts = write_prompts(out)

    # 1. on-policy pairs from the base model
    counts = {}
    for split, prompts, n in (("train", train_prompts, 4), ("heldout", held_prompts, 8)):
        samples, pairs = out / f"samples_{split}.jsonl", out / f"pairs_{split}.jsonl"
        if args.keep and pairs.is_file():
            counts[split] = len(pairs.read_text().splitlines())
            continue
        rlhf(
            f"sample_{split}",
            "sample",
            base,
            f"prompts={prompts}",
            f"n={n}",
            "temperature=1",
            f"max_new_tokens={MAX_NEW}",
            "batch_size=64",
            "seed=0",
            f"out={out / f'samples_{split}.jsonl'}",
        )
        counts[split] = pairs_from(samples, pairs, n)
    print(f"  pairs: {counts['train']} to train on, {counts['heldout']} held out", flush=True)
    pairs, held_pairs = out / "pairs_train.jsonl", out / "pairs_heldout.jsonl"

    def done(name: str) -> bool:
        """With --keep: this eval (or score) file is there already."""
        return args.keep and any((out / "eval").glob(f"{name}.json*"))

    def evaluate(name: str, policy: str, seed: int, *more: str) -> None:
        if done(name):
            return
        rlhf(
            f"eval_{name}",
            "eval",
            policy,
            f"prompts={held_prompts}",
            REWARD_FN,
            f"n={EVAL_SAMPLES}",
            "temperature=1",
            f"max_new_tokens={MAX_NEW}",
            "batch_size=64",
            f"seed={seed}",
            f"out={out / 'eval' / f'{name}.json'}",
            *more,
        )

    def train(name: str, *overrides: str) -> str:
        """`rlhf train` into OUT/<name> (with --keep, a finished run is reused)."""
        run = out / name
        if args.keep and (run / "final").is_dir():
            return str(run)
        if run.exists():
            shutil.rmtree(run)  # an unfinished run of an earlier call
        rlhf(name, "train", *COMMON, *overrides, f"run_dir={run}")
        return str(run)

    methods = set(args.methods)
    for seed in args.seeds:
        seeded = f"train.seed={seed}"
        evaluate(f"base_s{seed}", base, seed)
        if "dpo" in methods and not done(f"dpo_s{seed}"):
            run = train(
                f"dpo_s{seed}",
                "stage=dpo",
                f"data.path={pairs}",
                f"train.max_steps={args.dpo_steps}",
                "train.micro_batch_size=4",
                "train.grad_accum=2",
                "optim.lr=2e-4",
                "stage.beta=0.1",
                seeded,
            )
            evaluate(f"dpo_s{seed}", run, seed, f"pairs={held_pairs}")
        if "kto" in methods and not done(f"kto_s{seed}"):
            run = train(
                f"kto_s{seed}",
                "stage=kto",
                f"data.path={pairs}",  # each pair: one desirable and one undesirable answer
                f"train.max_steps={args.kto_steps}",
                "train.micro_batch_size=8",
                "train.grad_accum=2",
                "optim.lr=2e-4",
                "stage.beta=0.1",
                seeded,
            )
            evaluate(f"kto_s{seed}", run, seed)
        if "grpo" in methods and not done(f"grpo_s{seed}"):
            run = train(
                f"grpo_s{seed}",
                "stage=grpo",
                REWARD_FN,
                "stage.missing_eos_penalty=1.0",
                f"data.path={train_prompts}",
                f"train.max_steps={args.grpo_steps}",
                "stage.rollout_batch_size=4",
                "stage.group_size=4",
                f"stage.max_new_tokens={MAX_NEW}",
                "stage.kl_coef=0.02",
                "optim.lr=5e-4",
                seeded,
            )
            evaluate(f"grpo_s{seed}", run, seed)
        if "rs" in methods and not done(f"rs_s{seed}"):
            run = train(
                f"rs_s{seed}",
                "stage=rs",
                REWARD_FN,
                "stage.missing_eos_penalty=1.0",
                f"data.path={train_prompts}",
                f"stage.rounds={args.rs_rounds}",
                "stage.n=4",
                "stage.prompts_per_round=32",
                "stage.rollout_batch_size=16",
                f"stage.max_new_tokens={MAX_NEW}",
                "train.micro_batch_size=4",
                "train.grad_accum=2",
                "optim.lr=2e-4",
                seeded,
            )
            evaluate(f"rs_s{seed}", run, seed)
        if "rm" in methods and not done(f"rm_s{seed}"):
            run = train(
                f"rm_s{seed}",
                "stage=rm",
                f"data.path={pairs}",
                f"train.max_steps={args.rm_steps}",
                "train.micro_batch_size=4",
                "train.grad_accum=2",
                "optim.lr=5e-4",
                seeded,
            )
            scores = out / "eval" / f"rm_s{seed}.jsonl"
            rlhf(f"score_s{seed}", "score", run, str(held_pairs), f"out={scores}")

    elapsed = f"{time.perf_counter() - t0:.0f} s in all"
    print(summarize(out, args.seeds, elapsed))


VARIANT_STEPS, VARIANT_EVAL_SAMPLES = 6, 2
VARIANT_COMMON = (
    REWARD_FN,
    "stage.missing_eos_penalty=1.0",
    "stage.rollout_batch_size=4",
    "stage.group_size=4",
    "stage.minibatch_size=8",  # two updates a step: the second one is off-policy
    f"stage.max_new_tokens={MAX_NEW}",
    "optim.lr=5e-4",
    f"train.max_steps={VARIANT_STEPS}",
)
KL = "stage.kl_coef=0.02"  # every variant but DAPO (no KL term)
VARIANTS = {
    "grpo": (
        "GRPO as published (seq_mean_token_mean, std-scaled)",
        "stage=grpo",
        "stage.loss_agg=seq_mean_token_mean",
        KL,
    ),
    "dapo": (
        "DAPO (token_mean, clip-higher 0.28, dynamic sampling, no KL)",
        "stage=grpo",
        "stage.loss_agg=token_mean",
        "stage.clip_eps_high=0.28",
        "stage.dynamic_sampling=true",
        "stage.kl_coef=0",
    ),
    "dr_grpo": (
        "Dr. GRPO (seq_sum_norm, no std scaling)",
        "stage=grpo",
        "stage.loss_agg=seq_sum_norm",
        "stage.scale_rewards=false",
        KL,
    ),
    "gspo": (
        "GSPO (sequence ratios, clip 3e-4 / 4e-4)",
        "stage=grpo",
        "stage.importance_level=sequence",
        "stage.loss_agg=seq_mean_token_mean",
        "stage.clip_eps=0.0003",
        "stage.clip_eps_high=0.0004",
        KL,
    ),
    "rloo": ("RLOO (leave-one-out baseline, KL in the reward)", "stage=rloo", KL),
    "reinforce": ("REINFORCE, moving-average baseline", "stage=reinforce", KL),
}


def run_variants(out: Path, seeds: list[int]) -> None:
    """Each variant x seed into OUT/variants/<name>_s<seed> (a finished one is kept), then
    `rlhf eval` on the held-out prompts and the table."""
    rlhf = Runner(out, threads=0)
    rlhf.env.pop("OMP_NUM_THREADS")
    _, held = write_prompts(out)
    train_prompts = out / "prompts_train.jsonl"
    t0 = time.perf_counter()
    for seed in seeds:
        for name, (_, *overrides) in VARIANTS.items():
            run = out / "variants" / f"{name}_s{seed}"
            result = out / "variants" / f"{name}_s{seed}.json"
            if result.is_file():
                continue
            if not (run / "final").is_dir():
                if run.exists():
                    shutil.rmtree(run)
                rlhf(
                    f"var_{name}_s{seed}",
                    "train",
                    *COMMON,
                    *VARIANT_COMMON,
                    *overrides,
                    f"data.path={train_prompts}",
                    f"train.seed={seed}",
                    f"run_dir={run}",
                )
            rlhf(
                f"eval_var_{name}_s{seed}",
                "eval",
                str(run),
                f"prompts={held}",
                REWARD_FN,
                f"n={VARIANT_EVAL_SAMPLES}",
                "temperature=1",
                f"max_new_tokens={MAX_NEW}",
                "batch_size=64",
                f"seed={seed}",
                f"out={result}",
            )
    print(summarize_variants(out, seeds, f"{time.perf_counter() - t0:.0f} s"))


def summarize_variants(out: Path, seeds: list[int], note: str = "") -> str:
    table = [
        f"| variant | complete answers of <= 20 words (held-out, T=1) | KL to the base (nats/seq) "
        f"| mean training reward, steps {VARIANT_STEPS - 2}-{VARIANT_STEPS} | seeds |",
        "|---|---|---|---|---|",
    ]
    for name, (label, *_) in VARIANTS.items():
        done = [s for s in seeds if (out / "variants" / f"{name}_s{s}.json").is_file()]
        if not done:
            continue
        evals = [read(out / "variants" / f"{name}_s{s}.json") for s in done]
        rate = [statistics.fmean(has_property(x) for x in r["responses"]) for r in evals]
        last = []
        for s in done:
            rows = (out / "variants" / f"{name}_s{s}" / "metrics.jsonl").read_text().splitlines()
            train = [json.loads(x) for x in rows if '"train"' in x]
            last.append(statistics.fmean(r["reward"] for r in train[-3:]))
        table.append(
            f"| {label} | {mean_std(rate)} | {mean_std([r['kl'] for r in evals])} "
            f"| {mean_std(last)} | {len(done)} |"
        )
    table += ["", f"seeds {seeds}; mean ± std over the seeds" + (f"; {note}" if note else "") + "."]
    text = "\n".join(table) + "\n"
    (out / "variants.md").write_text(text)
    return text


LABELS = {
    "base": "base SmolLM2-135M-Instruct",
    "dpo": "DPO on on-policy pairs",
    "kto": "KTO on the pairs, split",
    "grpo": "GRPO, the property as reward",
    "rs": "rejection sampling, best of 4",
}


def summarize(out: Path, seeds: list[int], note: str = "") -> str:
    """The results table from the files a run left (eval/*.json, eval/rm_s*.jsonl), written to
    OUT/results.md: one row per policy, over the seeds whose files are there."""
    table = [
        "| policy | complete answers of <= 20 words (held-out prompts, T=1) | mean words | KL to the base (nats/seq) | seeds |",
        "|---|---|---|---|---|",
    ]
    found = False
    for kind in KINDS:
        evals = [
            read(out / "eval" / f"{kind}_s{s}.json")
            for s in seeds
            if (out / "eval" / f"{kind}_s{s}.json").is_file()
        ]
        if not evals:
            continue
        found = True
        rate = [statistics.fmean(has_property(x) for x in r["responses"]) for r in evals]
        words = [
            statistics.fmean(len(x["response"].split()) for x in r["responses"]) for r in evals
        ]
        kl = mean_std([r["kl"] for r in evals]) if kind != "base" else "0"
        table.append(
            f"| {LABELS[kind]} | {mean_std(rate)} | {mean_std(words)} | {kl} | {len(evals)} |"
        )
    if not found:
        raise SystemExit(f"{out}: no finished evaluation to summarize")
    rm = []
    for s in seeds:
        path = out / "eval" / f"rm_s{s}.jsonl"
        if path.is_file():
            rows = [json.loads(line)["scores"] for line in path.read_text().splitlines()]
            rm.append(sum(c > r for c, r in rows) / len(rows))
    dpo_pairs = [
        read(p)["pairs"]["implicit_accuracy"]
        for s in seeds
        if (p := out / "eval" / f"dpo_s{s}.json").is_file()
    ]
    n_train = len((out / "pairs_train.jsonl").read_text().splitlines())
    n_held = len((out / "pairs_heldout.jsonl").read_text().splitlines())
    table += [
        "",
        f"Held-out pairs ({n_held}): reward model pairwise accuracy "
        f"{mean_std(rm) if rm else 'n/a'}; the DPO policy's implicit-reward accuracy "
        f"{mean_std(dpo_pairs) if dpo_pairs else 'n/a'} (chance 0.5).",
        "",
        f"{n_train} training pairs; seeds {seeds}; mean ± std over the seeds of each row"
        + (f"; {note}" if note else "")
        + ".",
    ]
    text = "\n".join(table) + "\n"
    (out / "results.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
