"""What a run shows and records: a rich progress bar (or plain lines when not on a terminal),
metrics as JSON lines in the run directory, and a summary table at the end."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True, highlight=False, soft_wrap=True)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def _parsed(line: str) -> dict | None:
    """A metrics line as a dict; None for a blank or torn one (a run killed mid-write)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


class MetricsFile:
    """metrics.jsonl: one object per logged step/eval. On resume, lines after the checkpoint's
    step are dropped, so the file reads as if the run had never stopped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            keep = [
                line
                for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                if (row := _parsed(line)) is not None and row.get("step", 0) <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in keep))
        self.fh = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        self.fh.write(json.dumps(clean) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


class Reporter:
    """Progress display + metrics file for one run."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        start_step: int,
        resumed: bool,
        enabled: bool = True,
        trackers=None,
    ):
        # Only one process of a distributed run (rank 0) shows and writes anything.
        self.enabled = enabled
        self.trackers = trackers if enabled else None  # tracking.Trackers: TensorBoard, W&B
        self.metrics = (
            MetricsFile(run_dir / "metrics.jsonl", start_step if resumed else None)
            if enabled
            else None
        )
        self.total = total_steps
        self.start_step = start_step
        self.interactive = console.is_terminal
        self.progress: Progress | None = None
        self.t0 = time.perf_counter()
        self.last_print = 0.0

    def __enter__(self) -> Reporter:
        if self.interactive and self.enabled:
            self.progress = Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task(
                "train", total=self.total, completed=self.start_step, info=""
            )
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.metrics is not None:
            self.metrics.close()
        if self.trackers is not None:
            self.trackers.close(failed=exc[0] is not None)

    def step(self, step: int, record: dict[str, Any], log: bool) -> None:
        if not self.enabled:
            return
        if log:
            self.metrics.write({"step": step, "split": "train", **record})
            if self.trackers is not None:
                self.trackers.scalars(step, "train", record)
        info = (
            f"loss {fmt(record.get('loss', float('nan')))}  lr {record.get('lr', 0):.2e}  "
            f"{record.get('tokens_per_s', 0):,.0f} tok/s"
        )
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
            return
        now = time.perf_counter()
        if log and (now - self.last_print > 5 or step in (self.start_step + 1, self.total)):
            self.last_print = now
            done = step - self.start_step
            eta = (now - self.t0) / max(done, 1) * (self.total - step)
            console.print(f"step {step}/{self.total}  {info}  ETA {eta:,.0f}s")

    def eval(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.metrics.write({"step": step, "split": "eval", **record})
        if self.trackers is not None:
            self.trackers.scalars(step, "eval", record)
        text = "  ".join(f"{k} {fmt(v)}" for k, v in record.items())
        if self.progress is not None:
            self.progress.console.print(f"eval @ step {step}: {text}")
        else:
            console.print(f"eval @ step {step}: {text}")

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """A few of the step's samples (online stages), for the trackers."""
        if self.trackers is not None and rows:
            self.trackers.samples(step, rows)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        (self.progress.console if self.progress is not None else console).print(text)


def summary_table(title: str, rows: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        table.add_row(key, fmt(value))
    console.print(table)
