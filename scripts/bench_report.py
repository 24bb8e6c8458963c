"""scripts/bench.py's report: repeats combined into rows (medians, ratios, model FLOP/s), the
markdown table and the machine it ran on."""

from __future__ import annotations

import os
import platform
import shutil

from bench_common import linear_params, pair_key, precision_label


def combine(repeats: list[dict]) -> dict:
    """One result from the repeats of a run: the median run by steps/s (its rates), the
    highest peak memory of all, and every run's steps/s. Any failure fails the row."""
    failed = [r for r in repeats if not r.get("ok")]
    if failed:
        return failed[0]
    ordered = sorted(repeats, key=lambda r: r["steps_per_s"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    for key in ("peak_rss_mb", "cuda_peak_mb"):
        if key in out:
            out[key] = max(r[key] for r in repeats)
    out["steps_per_s_runs"] = [round(r["steps_per_s"], 3) for r in repeats]
    return out


def flops_per_token(job: dict) -> int:
    n = linear_params(job["size"], with_lm_head=job["stage"] != "rm")
    if job["stage"] == "grpo":
        # Per prompt + response token: sampling (prefill or decode) 2N, reference 2N, update 6N.
        return 10 * n
    reference = job["stage"] == "dpo" and not job["precompute"]
    return (8 if reference else 6) * n


def build_rows(results: list[tuple[dict, dict]], peaks: dict) -> list[dict]:
    """A row per run; ours/TRL against the TRL run of the same pair, ours/TRL best against
    TRL's fastest run (tokens/s) of the stage, size and mode: any precision, reference
    precomputed or not, padded or packed."""
    trl_runs = [(job, res) for job, res in results if job["tool"] == "trl" and res.get("ok")]
    rows = []
    for job, res in results:
        row = {
            "tool": job["tool"],
            "stage": job["stage"],
            "size": job["size"],
            "mode": job["mode"],
            "precision": precision_label(job),
            "layout": "packed" if job["packing"] else "padded",
            "variant": job["variant"],
            **{k: v for k, v in res.items()},
        }
        if res.get("ok"):
            flops = res["tokens_per_s"] * flops_per_token(job)
            row["model_gflops"] = flops / 1e9
            row["peak_fraction"] = flops / 1e9 / peaks[job["precision"]]
        if job["tool"] == "ours" and res.get("ok"):
            # The TRL run of the pair (where a pair has two: the one laid out as ours).
            pair = [(j, r) for j, r in trl_runs if pair_key(j) == pair_key(job)]
            pair.sort(key=lambda jr: jr[0]["packing"] != job["packing"])
            same = pair[0][1] if pair else None
            best = max(
                (
                    r
                    for j, r in trl_runs
                    if (j["stage"], j["size"], j["mode"])
                    == (job["stage"], job["size"], job["mode"])
                ),
                key=lambda r: r["tokens_per_s"],
                default=None,
            )
            if same:
                row["vs_trl"] = res["steps_per_s"] / same["steps_per_s"]
                row["tok_vs_trl"] = res["tokens_per_s"] / same["tokens_per_s"]
                row["rss_vs_trl"] = res["peak_rss_mb"] / same["peak_rss_mb"]
            if best:
                row["vs_trl_best"] = res["steps_per_s"] / best["steps_per_s"]
                row["tok_vs_trl_best"] = res["tokens_per_s"] / best["tokens_per_s"]
        rows.append(row)
    return rows


COLUMNS = [
    ("tool", "tool"),
    ("stage", "stage"),
    ("size", "size"),
    ("mode", "mode"),
    ("precision", "precision"),
    ("layout", "layout"),
    ("steps/s", "steps_per_s"),
    ("tokens/s", "tokens_per_s"),
    ("tok/step", "tokens_per_step"),
    ("peak RSS MB", "peak_rss_mb"),
    ("model GFLOP/s", "model_gflops"),
    ("% peak", "peak_fraction"),
    ("gen tok/s", "gen_tokens_per_s"),
    ("rollout share", "rollout_fraction"),
    ("ours/TRL", "vs_trl"),
    ("ours/TRL best", "vs_trl_best"),
    ("tok/s ours/TRL", "tok_vs_trl"),
    ("tok/s ours/TRL best", "tok_vs_trl_best"),
    ("RSS ours/TRL", "rss_vs_trl"),
    ("error", "error"),
]


def cell(key: str, value) -> str:
    if value is None:
        return ""
    if key in ("peak_fraction", "rollout_fraction"):
        return f"{100 * value:.1f}%"
    if key in ("vs_trl", "vs_trl_best", "rss_vs_trl", "tok_vs_trl", "tok_vs_trl_best"):
        return f"{value:.2f}x"
    if key in ("tokens_per_s", "tokens_per_step", "peak_rss_mb", "gen_tokens_per_s"):
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def render(rows: list[dict], header: list[str]) -> str:
    """The table as markdown (also what the terminal shows when rich is missing)."""
    show = [(title, key) for title, key in COLUMNS if any(r.get(key) is not None for r in rows)]
    lines = [*header, ""]
    lines.append("| " + " | ".join(title for title, _ in show) + " |")
    lines.append("|" + "|".join("---" for _ in show) + "|")
    for r in rows:
        lines.append("| " + " | ".join(cell(key, r.get(key)) for _, key in show) + " |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict], header: list[str]) -> None:
    show = [(title, key) for title, key in COLUMNS if any(r.get(key) is not None for r in rows)]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(render(rows, header))
        return
    console = Console(width=max(160, shutil.get_terminal_size().columns))
    for line in header:
        console.print(line, highlight=False, markup=False)
    table = Table(show_lines=False)
    for title, key in show:
        table.add_column(title, justify="left" if key in ("tool", "stage", "error") else "right")
    for r in rows:
        table.add_row(*(cell(key, r.get(key)) for _, key in show))
    console.print(table)


def machine_info(args) -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "device": args.device,
    }
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((ln.split(":", 1)[1].strip() for ln in fh if "model name" in ln), None)
        info["cpu"] = name or info["cpu"]
    except OSError:
        pass
    info["cores"] = os.cpu_count()
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    return info
