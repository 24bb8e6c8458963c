"""Benchmark rlhf-cli against TRL: same models, data, batch and LoRA settings, side by side.

    python scripts/bench.py                                   # the full grid (long)
    python scripts/bench.py --stages dpo --sizes small --modes lora --precisions fp32 --steps 3
    python scripts/bench.py --out bench.md                    # also bench.md + bench.json

`make bench` (the toys) and `make bench-real` (SmolLM2-135M-Instruct) run it with the venv's
python (installing the `bench` extra, i.e. TRL, first).

What it does:
- `--sizes smollm2`: the real model, rlhf_cli.model.real's offline copy (`rlhf fetch-model
  smollm2-135m`), on the shipped question/answer pairs in the conversational format, which both
  tools render with the model's own chat template.
- Builds two random-init Llama models offline and deterministically into the cache directory
  (RLHF_CLI_CACHE or ~/.cache/rlhf_cli, subdirectories bench-*): `small` (hidden 256, 4 layers,
  vocab 2048, ~4.2M parameters) and `medium` (hidden 512, 8 layers, vocab 4096, ~30M), each with
  a ByteLevel BPE tokenizer trained on the shipped data (rlhf_cli/assets), like `model=tiny`.
  The tokenizers have NO chat template, so both tools see plain strings: ours concatenates
  prompt and response raw, TRL tokenizes prompt + response as one string. The prompt never ends
  in whitespace and each response starts with a space, so both give the same token sequence
  (<s> prompt response </s>); the script checks this on every row before it runs anything.
- Builds one preference set (prompt ~50 words, chosen/rejected ~65 words) from the shipped
  texts; SFT trains on prompt + chosen (loss on the response), RM and DPO on the pairs.
- Runs each (tool, stage, size, mode, precision) in its own subprocess, `--warmup` steps then
  `--steps` timed steps, with the same settings: 4 pairs (or 4 sequences for SFT) per step, no
  accumulation, max_length 256, LoRA r=16 alpha=32 dropout 0.05 on all linear layers, AdamW
  lr 1e-4 at a constant schedule, gradient clipping at 1.0, no eval, no checkpoints during the
  timed steps, no gradient checkpointing. QLoRA = a 4-bit NF4 base (double quantization) whose
  compute dtype follows the precision (float32 or bfloat16), for both tools.
  Variant `best` (both tools): bf16 autocast, and for DPO reference log-probs precomputed once
  (ours: ref.precompute=true; TRL: precompute_ref_log_probs=True).
- `--data spread` (`make bench-spread`): lengths spread as real instruction data's are, prompts
  of 8-50 words, each response log-uniform from 3 to 380 words (about 4 to 500 tokens, median
  ~40), rows up to 1024 tokens (none cut: checked). Variant `packed`: ours with train.packing
  (train.packing_attention=varlen), TRL at its best on such data: SFT packing=True (best-fit
  decreasing, padding-free) and padded, RM and DPO padded (TRL has no packing for them; its DPO
  padding_free is disabled in 1.16). Both tools take the rows in the file's order (ours
  train.shuffle=false, TRL a sequential sampler), so padded runs step on the same examples.
- GRPO (ours and TRL's GRPOTrainer, no vLLM): BATCH prompts x 4 samples of up to 64 new tokens
  per step (reward: rlhf_cli.rewards:length_target), KV-cache sampling with model.generate; the
  row also shows generation tokens/s (sampled tokens over the generate() time, median over the
  timed steps) and the share of the step spent generating.
- Pairs: each configuration runs as (ours, TRL) back to back between two measurements of the
  matmul peak; a pair whose peak moved by more than --peak-drift is thrown away and run again
  (at most --retries extra pairs), and the header lists every thrown pair.
- Step time = time between the ends of consecutive optimizer steps (everything the loop does per
  step: data, forward, backward, optimizer, logging), over the timed steps. Tokens = non-padding
  tokens (attention mask) of the step's batch (chosen + rejected rows for RM/DPO).
- Peak memory: the child's peak RSS (getrusage); on CUDA also torch.cuda.max_memory_allocated.
- Model FLOP/s = tokens/s x FLOPs/token, FLOPs/token = 6 N (forward + backward) plus 2 N when
  DPO runs the reference forward every step, N = parameters of the linear layers the tokens go
  through (attention + MLP, plus the LM head except for RM); attention scores are not counted.
  The fraction is of the peak torch.matmul rate measured here (2048 x 2048, fp32 or bf16).

TRL settings that differ from its defaults, to match ours: gradient_checkpointing=False,
bf16 only when asked (and then the base loaded in bf16, as ours stores a frozen base in a bf16
run; fp32 otherwise), disable_dropout=False (TRL turns dropout off for DPO/RM by default),
lr_scheduler_type=constant, logging/saving/eval off, tqdm off; in fp32 QLoRA runs its trainable
weights are cast back to fp32 (TRL makes them bf16 for quantized models, which breaks its RM
without autocast). Everything else (fused AdamW, fused LM head for DPO/SFT log-probs, its
per-step metrics, bf16 adapters in bf16 QLoRA runs) is TRL's own default behaviour.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench_common import (
    ALL_SIZES,
    BATCH,
    DATASETS,
    GROUP,
    LORA,
    LR,
    MODES,
    PACKING_ATTENTION,
    PRECISIONS,
    REAL,
    REPO,
    RESULT_PREFIX,
    ROLLOUT_TOKENS,
    STAGES,
    TOOLS,
    TRL_PACKED_ROWS,
    VARIANTS,
    _peak_memory,
    check_same_tokens,
    data_files,
    job_key,
    limits,
    linear_params,
    log,
    matmul_peak_gflops,
    model_dir,
    pair_key,
    precision_label,
    real_data_files,
    real_lengths,
    total_params,
)
from bench_ours import run_ours
from bench_report import build_rows, combine, machine_info, print_table, render
from bench_trl import run_trl


def child_main(spec: dict) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{spec['tool']}-{spec['stage']}-"))
    try:
        result = (run_ours if spec["tool"] == "ours" else run_trl)(spec, run_dir / "run")
        result.update(_peak_memory(spec["device"]))
        result["ok"] = True
    except BaseException as err:  # reported in the table row, never fatal to the benchmark
        traceback.print_exc()
        message = " ".join(str(err).split()) or type(err).__name__
        result = {"ok": False, "error": f"{type(err).__name__}: {message}"[:300]}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


def plan(args) -> list[dict]:
    """Every run to make, deduplicated (for sft/rm `best` is just bf16). `packed` pairs are runs
    of their own, TRL's padded ones included (its run of the pair where TRL has no packing)."""
    jobs, seen = [], set()
    for stage in args.stages:
        for size in args.sizes:
            for mode in args.modes:
                configs = []
                if "default" in args.variants:
                    configs += [(p, False, "default") for p in args.precisions]
                if "best" in args.variants:
                    configs.append(("bf16", stage == "dpo", "best"))
                if "packed" in args.variants:
                    configs += [(p, stage == "dpo", "packed") for p in args.precisions]
                for tool in args.tools:
                    for precision, precompute, variant in configs:
                        packed = variant == "packed"
                        job = dict(
                            tool=tool,
                            stage=stage,
                            size=size,
                            mode=mode,
                            precision=precision,
                            precompute=precompute,
                            packing=packed and (tool == "ours" or stage == "sft"),
                            packing_pair=packed,
                            variant=variant,
                        )
                        extra = []
                        if packed and tool == "trl" and stage == "sft":
                            # TRL at its best may be padded: both in the pair.
                            extra = [dict(job, packing=False)]
                        for j in [job, *extra]:
                            if job_key(j) not in seen:
                                seen.add(job_key(j))
                                jobs.append(j)
    return jobs


def used(jobs: list[dict]) -> set[str]:
    """The precisions the jobs run at."""
    return {job["precision"] for job in jobs}


def run_child(job: dict, args, models: dict, data: dict) -> dict:
    max_length, max_prompt_length = limits(args.data)
    spec = dict(
        job,
        model=str(models[job["size"]]),
        data=str(data[{"sft": "sft", "grpo": "prompts"}.get(job["stage"], "pairs")]),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
    )
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=args.timeout,
            env=env,
            cwd=str(REPO),
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {args.timeout}s"}
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
    if result is None:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
        result = {"ok": False, "error": f"exit {proc.returncode}: {tail[0].strip()}"[:300]}
    if not result.get("ok") and args.verbose:
        log(proc.stderr[-4000:])
    result["wall_s"] = time.perf_counter() - t0
    return result


def parse_args(argv: list[str] | None = None):
    def listed(choices):
        def parse(text: str) -> list[str]:
            items = [t.strip() for t in text.split(",") if t.strip()]
            bad = [t for t in items if t not in choices]
            if bad or not items:
                raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
            return items

        return parse

    p = argparse.ArgumentParser(
        description="rlhf-cli vs TRL: steps/s, tokens/s, peak memory and FLOP/s, side by side.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--stages", type=listed(STAGES), default=list(STAGES), help="comma list")
    p.add_argument("--sizes", type=listed(ALL_SIZES), default=list(ALL_SIZES), help="comma list")
    p.add_argument("--modes", type=listed(MODES), default=list(MODES), help="comma list")
    p.add_argument(
        "--precisions", type=listed(PRECISIONS), default=list(PRECISIONS), help="comma list"
    )
    p.add_argument(
        "--variants",
        type=listed(VARIANTS),
        default=["default", "best"],
        help="default = the --precisions as given; best = bf16 (+ precomputed reference for dpo); "
        "packed = best with packed rows (ours: train.packing; TRL: sft packing, else padded)",
    )
    p.add_argument("--tools", type=listed(TOOLS), default=list(TOOLS), help="comma list")
    p.add_argument(
        "--data",
        choices=DATASETS,
        default="short",
        help="short: the shipped lengths (~60-word prompts and answers); spread: answers of a "
        "word to a page (about 4 to 500 tokens), rows up to 1024 tokens",
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run the grid this many times; each row is the median run (peak memory: the max)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument(
        "--peak-drift",
        type=float,
        default=0.2,
        help="throw a pair away when the matmul peak moved by more than this fraction across it",
    )
    p.add_argument("--retries", type=int, default=2, help="extra pairs per configuration at most")
    p.add_argument("--out", type=Path, help="write the table to OUT (.md) and OUT's .json")
    p.add_argument("--verbose", action="store_true", help="show a failing run's stderr")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda":
        args.device = "cuda:0"

    t0 = time.perf_counter()
    # One epoch, every step full (spread: twice that, as TRL's packed rows hold more examples).
    n_rows = BATCH * (args.steps + args.warmup) * (2 if args.data == "spread" else 1)
    max_length = limits(args.data)[0]
    models = {size: model_dir(size) for size in args.sizes}
    data = {
        size: (real_data_files if size in REAL else data_files)(n_rows, args.data)
        for size in args.sizes
    }
    lengths = {}
    for size in args.sizes:
        if size in REAL:
            lengths[size] = real_lengths(models[size], data[size]["pairs"])
        else:
            lengths[size] = check_same_tokens(models[size], data[size]["pairs"], max_length)
        if lengths[size]["longest"] > max_length:
            raise SystemExit(f"{size}: a row of {lengths[size]['longest']} tokens would be cut")
    log(f"assets ready in {time.perf_counter() - t0:.1f}s under {models[args.sizes[0]].parent}")
    jobs = plan(args)
    # Only the precisions that run: without AVX512-BF16/AMX a CPU emulates bf16 matmuls
    # (a minute for one 2048 x 2048 product).
    peaks = {p: matmul_peak_gflops(p, args.device) for p in PRECISIONS if p in used(jobs)}
    log("matmul peak: " + ", ".join(f"{p} {v:,.0f} GFLOP/s" for p, v in peaks.items()))

    runs: dict[tuple, list[dict]] = {job_key(job): [] for job in jobs}
    # A pair = the tools' runs of one configuration, back to back (ours, then TRL), between two
    # measurements of the matmul peak; a pair whose peak moved by more than --peak-drift is
    # thrown away and run again (at most --retries extra pairs per configuration). Rounds sweep
    # every configuration once, so a slow spell of a shared machine hits all of them alike.
    groups: dict[tuple, list[dict]] = {}
    for job in jobs:
        groups.setdefault(pair_key(job), []).append(job)
    kept = {g: 0 for g in groups}
    tries = {g: 0 for g in groups}
    thrown: list[str] = []
    drift: list[float] = []
    i = 0
    while True:
        todo = [
            g for g in groups if kept[g] < args.repeats and tries[g] < args.repeats + args.retries
        ]
        if not todo:
            break
        for g in todo:
            members = groups[g]
            tries[g] += 1
            precision = members[0]["precision"]
            before = matmul_peak_gflops(precision, args.device)
            pair = []
            for job in members:
                i += 1
                name = " ".join(
                    [job["tool"], job["stage"], job["size"], job["mode"], precision_label(job)]
                    + (["packed"] if job["packing"] else [])
                )
                log(f"[{i}] {name} (pair {tries[g]}) ...")
                res = run_child(job, args, models, data[job["size"]])
                if res.get("ok"):
                    log(
                        f"[{i}] {name}: {res['steps_per_s']:.3f} steps/s, "
                        f"{res['tokens_per_s']:,.0f} tok/s, {res['peak_rss_mb']:,.0f} MB RSS "
                        f"({res['wall_s']:.0f}s)"
                    )
                else:
                    log(f"[{i}] {name}: FAILED {res.get('error')}")
                pair.append((job, res))
            after = matmul_peak_gflops(precision, args.device)
            moved = after / before - 1
            drift.append(moved)
            label = " ".join(str(x) for x in g[:-1]) + (" packed" if g[-1] else "")
            if abs(moved) > args.peak_drift and len(members) > 1:
                thrown.append(f"{label} ({before:,.0f} -> {after:,.0f} GFLOP/s)")
                log(f"pair thrown away: matmul peak {before:,.0f} -> {after:,.0f} GFLOP/s")
                continue
            log(f"matmul peak {before:,.0f} -> {after:,.0f} GFLOP/s ({100 * moved:+.0f}%)")
            kept[g] += 1
            for job, res in pair:
                res["peak_before"], res["peak_after"] = before, after
                runs[job_key(job)].append(res)
    for job in jobs:
        if not runs[job_key(job)]:
            runs[job_key(job)].append({"ok": False, "error": "every pair was thrown away"})
    results = [(job, combine(runs[job_key(job)])) for job in jobs]

    info = machine_info(args)
    rows = build_rows(results, peaks)
    command = "python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = [
        f"command: {command.strip()}",
        f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
        f"({info['threads']} threads), device {info['device']}"
        + (f" ({info['gpu']})" if info.get("gpu") else "")
        + f", TRL {info['trl']}",
        "matmul peak (torch.matmul 2048x2048): "
        + ", ".join(f"{p} {v:,.0f} GFLOP/s" for p, v in peaks.items()),
        f"pairs: each configuration ran as (ours, TRL) back to back, {args.repeats} pair(s) kept, "
        f"the matmul peak measured before and after each pair (it moved "
        f"{100 * min(drift, default=0):+.0f}% to {100 * max(drift, default=0):+.0f}%); "
        + (
            f"{len(thrown)} pair(s) thrown away for a peak that moved > {100 * args.peak_drift:.0f}%: "
            + "; ".join(thrown)
            if thrown
            else f"none thrown away (limit {100 * args.peak_drift:.0f}%)"
        ),
        f"settings: {args.warmup} warmup + {args.steps} timed steps, (lower) median of the kept "
        f"runs (peak memory: the highest), batch {BATCH} "
        f"(pairs for rm/dpo), max_length {max_length}, LoRA r={LORA['r']} alpha={LORA['alpha']} "
        f"dropout={LORA['dropout']} all-linear (dpo, grpo: dropout off, both tools' default), "
        f"AdamW lr {LR}, no grad checkpointing; grpo: {BATCH} prompts x {GROUP} samples of <= "
        f"{ROLLOUT_TOKENS} new tokens, one update per rollout, KL beta 0.04, no vLLM",
        f"data {args.data}: mean tokens per row "
        + "; ".join(
            f"{size}: prompt {v['prompt']}, chosen {v['chosen']}, rejected {v['rejected']} "
            f"(responses min-median-max {v['response']}, longest row {v['longest']})"
            for size, v in lengths.items()
        )
        + " (toys: identical token sequences for both tools, checked on every row; real models:"
        " conversational rows rendered by the model's chat template in both tools, tok/step shows"
        " what each fed the model)",
        "model FLOP/s = tokens/s x (6 N, or 8 N when DPO runs the reference forward each step;"
        " grpo: 10 N per prompt + response token: sampling 2 N, reference 2 N, update 6 N),"
        " N = linear-layer parameters ("
        + ", ".join(
            f"{s}: {linear_params(s, True) / 1e6:.1f}M of {total_params(s) / 1e6:.1f}M"
            for s in args.sizes
        )
        + "; RM without the LM head); % peak = of the matmul peak at the run's precision",
        "+pre = reference log-probs precomputed (ours: ref.precompute=true, TRL:"
        " precompute_ref_log_probs=True); ours/TRL = steps/s ratio at the same settings"
        " (tok/s ours/TRL: tokens/s ratio, fairer where the tools batch other rows per step);"
        " ours/TRL best = vs TRL's fastest run of the stage by tokens/s (any precision, +pre or"
        " not, padded or packed; tok/s: the tokens/s ratio, the one to read for packed rows);"
        " RSS ours/TRL = peak RSS ratio, same pair",
        f"layout packed: ours train.packing=true train.packing_attention={PACKING_ATTENTION}"
        f" ({BATCH} examples a step packed into rows of <= max_length, attention kept within"
        f" each example); TRL: sft packing=True (best-fit decreasing, padding-free:"
        f" {TRL_PACKED_ROWS} row(s) of max_length a step, one flat sequence), its pair also runs"
        " TRL padded; TRL has no packing for rm or dpo (its DPO padding_free is disabled in this"
        " version), so their packed pair runs TRL padded",
    ]
    print()
    print_table(rows, header)
    if args.out:
        md = args.out if args.out.suffix != ".json" else args.out.with_suffix(".md")
        js = args.out.with_suffix(".json")
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(render(rows, header))
        js.write_text(
            json.dumps(
                {
                    "command": command.strip(),
                    "machine": info,
                    "matmul_peak_gflops": peaks,
                    "header": header,
                    "rows": rows,
                },
                indent=1,
            )
        )
        log(f"wrote {md} and {js}")
    return 0 if all(res.get("ok") for _, res in results) else 1


if __name__ == "__main__":
    sys.exit(main())
