"""GRPO on SmolLM2-135M-Instruct with each rollout engine (`make bench-rollout`): ours with
rollout.engine=hf (transformers' generate), ours with rollout.engine=vllm (vLLM in the process,
merged weights reloaded every step), and TRL's GRPOTrainer without vLLM and with use_vllm=True,
vllm_mode="colocate" (where that fails to run, the table says so); "TRL's best" is the faster
of the two.

The runs and their settings are scripts/bench.py's GRPO rows (4 prompts x 4 samples of up to 64
new tokens, one update a step, fp32, LoRA r=16 all-linear; `--modes qlora`: a 4-bit NF4 base),
each in its own process. A round runs every configuration once, back to back, between two
measurements of the matmul peak; rounds repeat (--repeats) and each figure is the median over
them. Generated tokens/s = sampled tokens over the generation time of a step (ours: rollout_s,
without the weight reload, which `sync s` shows; TRL: its _generate, reload included), median
over the timed steps.

    python scripts/bench_rollout.py --modes lora --steps 3 --warmup 1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import bench_common  # noqa: E402

CONFIGS = (("ours", "hf"), ("ours", "vllm"), ("trl", "hf"), ("trl", "vllm"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="lora", help="lora, qlora or lora,qlora")
    p.add_argument("--steps", type=int, default=3, help="timed steps a run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--timeout", type=int, default=1200)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/bench-rollout.md")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main(argv=None) -> int:
    args = parse_args(argv)
    args.data = "short"
    modes = [m for m in args.modes.split(",") if m]
    model = bench_common.model_dir("smollm2")
    n_rows = bench_common.BATCH * (args.steps + args.warmup)
    data = bench_common.real_data_files(n_rows, "short")
    results: dict[tuple, list[dict]] = {}
    peaks: list[tuple[float, float]] = []
    fallback: set[str] = set()
    for r in range(args.repeats):
        before = bench_common.matmul_peak_gflops("fp32", args.device)
        for mode in modes:
            for tool, engine in CONFIGS:
                job = dict(
                    tool=tool,
                    stage="grpo",
                    size="smollm2",
                    mode=mode,
                    precision="fp32",
                    precompute=False,
                    packing=False,
                    packing_pair=False,
                    variant="default",
                    engine=engine,
                )
                if tool == "trl" and engine == "vllm" and (tool, mode) in fallback:
                    continue  # failed in an earlier round
                name = f"{tool} {job['engine']} {mode} (round {r + 1})"
                bench_common.log(f"{name} ...")
                res = bench.run_child(job, args, {"smollm2": model}, data)
                if not res.get("ok") and tool == "trl" and engine == "vllm":
                    fallback.add((tool, mode))
                    results.setdefault(("trl-error", mode, "vllm"), []).append(res)
                if res.get("ok"):
                    bench_common.log(
                        f"{name}: {res['steps_per_s']:.3f} steps/s, "
                        f"{res.get('gen_tokens_per_s', 0):,.0f} generated tok/s ({res['wall_s']:.0f}s)"
                    )
                else:
                    bench_common.log(f"{name}: FAILED {res.get('error')}")
                results.setdefault((tool, mode, job["engine"]), []).append(res)
        after = bench_common.matmul_peak_gflops("fp32", args.device)
        peaks.append((before, after))
        bench_common.log(f"round {r + 1}: matmul peak {before:,.0f} -> {after:,.0f} GFLOP/s")

    lines = [
        f"# GRPO rollouts on SmolLM2-135M-Instruct, {args.device}",
        "",
        f"{bench_common.BATCH} prompts x {bench_common.GROUP} samples of <= {bench_common.ROLLOUT_TOKENS} new tokens, "
        f"fp32, {args.steps} timed steps after {args.warmup}, medians of {args.repeats} "
        "interleaved rounds. matmul peak (fp32 GFLOP/s) before/after each round: "
        + ", ".join(f"{a:,.0f}/{b:,.0f}" for a, b in peaks),
        "",
        "| tool | engine | mode | steps/s | step s | generated tok/s | rollout share | sync s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary: dict[str, dict] = {}
    for (tool, mode, engine), runs in results.items():
        if tool == "trl-error":
            continue
        ok = [x for x in runs if x.get("ok")]
        if not ok:
            lines.append(f"| {tool} | {engine} | {mode} | failed: {runs[-1].get('error')} |")
            continue
        row = {
            "steps_per_s": median([x["steps_per_s"] for x in ok]),
            "step_s": median([x["step_time_median_s"] for x in ok]),
            "gen": median([x.get("gen_tokens_per_s") for x in ok]),
            "share": median([x.get("rollout_fraction") for x in ok]),
            "sync": median([x.get("sync_s") for x in ok]),
            "rss": max(x["peak_rss_mb"] for x in ok),
            "all": [round(x["steps_per_s"], 4) for x in ok],
        }
        summary[f"{tool} {engine} {mode}"] = row
        sync = "" if row["sync"] is None else f"{row['sync']:.2f}"
        lines.append(
            f"| {tool} | {engine} | {mode} | {row['steps_per_s']:.4f} {row['all']} | "
            f"{row['step_s']:.2f} | {row['gen'] or 0:,.0f} | {row['share'] or 0:.2f} | {sync} | "
            f"{row['rss']:,.0f} |"
        )
    lines.append("")
    for mode in modes:
        hf, vl = summary.get(f"ours hf {mode}"), summary.get(f"ours vllm {mode}")
        trl = [v for k, v in summary.items() if k.startswith("trl") and k.endswith(mode)]
        if hf and vl and hf["gen"] and vl["gen"]:
            lines.append(
                f"- {mode}: our vLLM rollouts {vl['gen'] / hf['gen']:.2f}x our hf rollouts' "
                f"generated tokens/s ({vl['gen']:,.0f} vs {hf['gen']:,.0f})"
            )
        if trl and (hf or vl):
            ours = max(x["steps_per_s"] for x in (hf, vl) if x)
            best = max(x["steps_per_s"] for x in trl)
            lines.append(
                f"- {mode}: our best GRPO step {ours / best:.2f}x TRL's best ({ours:.4f} vs {best:.4f} steps/s)"
            )
    for (tool, mode, _), runs in results.items():
        if tool == "trl-error":
            lines.append(
                f"- {mode}: TRL with use_vllm=True, vllm_mode=colocate failed here: {runs[0].get('error')}"
            )
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(
        json.dumps({f"{k[0]} {k[2]} {k[1]}": v for k, v in results.items()}, indent=1)
    )
    print(text)
    return 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = main()
    bench_common.log(f"done in {time.perf_counter() - t0:.0f}s")
    sys.exit(code)
