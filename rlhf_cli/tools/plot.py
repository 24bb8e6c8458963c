"""`rlhf plot`: PNG plots of training metrics (one panel per metric, one line per run; eval
points as markers) and of the reward-vs-KL frontier across `rlhf eval` JSON files.

matplotlib is an optional extra (`pip install 'rlhf-cli[plot]'`), imported only here."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from rlhf_cli.core.errors import UserError
from rlhf_cli.core.progress import console

# Shown when present, in this order, unless metrics=... names others.
DEFAULT_METRICS = (
    "loss",
    "rewards/margins",
    "rewards/accuracies",
    "accuracy",
    "score",
    "kl",
)


def pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise UserError(
            "rlhf plot needs matplotlib: pip install 'rlhf-cli[plot]' (or pip install matplotlib)"
        ) from err
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def read_run_metrics(run: str) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run}: no metrics.jsonl (not a run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def plot_metrics(runs: list[str], out: str, metrics: list[str] | None = None) -> Path:
    """One panel per metric: each run's train curve (a line) and eval points (markers)."""
    records = {run: read_run_metrics(run) for run in runs}
    present = {k for rows in records.values() for r in rows for k, v in r.items() if _finite(v)}
    if metrics:
        missing = [m for m in metrics if m not in present]
        if missing:
            raise UserError(
                f"metrics={','.join(missing)}: not logged by {', '.join(runs)}; logged: "
                + ", ".join(sorted(present - {"step"}))
            )
    else:
        metrics = [m for m in DEFAULT_METRICS if m in present]
    plt = pyplot()
    cols = min(2, len(metrics))
    rows_n = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6 * cols, 3.6 * rows_n), squeeze=False)
    labels = _short_labels(runs)
    for ax, metric in zip(axes.flat, metrics):
        for run, label in zip(runs, labels):
            for split, style in (("train", "-"), ("eval", "o--")):
                points = [
                    (r["step"], r[metric])
                    for r in records[run]
                    if r.get("split") == split and _finite(r.get(metric))
                ]
                if points:
                    xs, ys = zip(*points)
                    name = label if split == "train" else f"{label} (eval)"
                    ax.plot(xs, ys, style, label=name, markersize=4, linewidth=1.2)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    return _save(fig, plt, out)


def plot_frontier(evals: list[str], out: str) -> Path:
    """Mean reward against KL to the reference, one point per label: the mean over the eval
    files that share it (seeds of one setting; each drawn faintly) with +- std bars. Labels
    that share a first word (`DPO beta=0.1`, `DPO beta=0.3`) are one method: one colour, joined
    in KL order, the rest of the label written by its point."""
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for path in evals:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{path}: not an `rlhf eval` JSON file ({err})") from err
        if not (_finite(result.get("reward")) and _finite(result.get("kl"))):
            raise UserError(
                f"{path}: needs a reward and a KL (evaluate with a reward and a reference)"
            )
        groups[result.get("label") or Path(path).stem].append((result["kl"], result["reward"]))
    methods: dict[str, list[str]] = defaultdict(list)
    for label in groups:
        methods[label.split()[0]].append(label)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    for index, (method, labels) in enumerate(methods.items()):
        color = f"C{index % 10}"
        means = []
        for label in labels:
            kls, rewards = zip(*groups[label])
            mean = (statistics.fmean(kls), statistics.fmean(rewards))
            means.append(mean)
            ax.errorbar(
                *mean,
                xerr=statistics.stdev(kls) if len(kls) > 1 else None,
                yerr=statistics.stdev(rewards) if len(rewards) > 1 else None,
                fmt="o",
                capsize=3,
                color=color,
                label=label if len(labels) == 1 else (method if label == labels[0] else None),
            )
            if len(kls) > 1:
                ax.scatter(kls, rewards, s=12, alpha=0.35, color=color)
            if len(labels) > 1:
                ax.annotate(
                    label[len(method) :].strip(),
                    mean,
                    textcoords="offset points",
                    xytext=(5, -12),
                    fontsize=7,
                    color=color,
                )
        if len(means) > 1:
            ax.plot(*zip(*sorted(means)), "-", color=color, alpha=0.5)
    ax.set_xlabel("KL(policy || reference), nats per sequence")
    ax.set_ylabel("mean reward")
    ax.set_title("reward vs KL to the reference")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, out)


def _short_labels(runs: list[str]) -> list[str]:
    """Run paths without the prefix they all share."""
    parts = [Path(r).resolve().parts for r in runs]
    common = 0
    while len(runs) > 1 and all(len(p) > common + 1 for p in parts):
        if len({p[common] for p in parts}) > 1:
            break
        common += 1
    return ["/".join(p[common:]) if len(runs) > 1 else Path(r).name for p, r in zip(parts, runs)]


def _save(fig, plt, out: str) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    console.print(f"plot: wrote {path}")
    return path
