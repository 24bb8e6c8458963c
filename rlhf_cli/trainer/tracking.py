"""Experiment tracking besides metrics.jsonl: TensorBoard event files and Weights & Biases.

Both are optional packages (`pip install 'rlhf-cli[tensorboard]'`, `'rlhf-cli[wandb]'`), asked
for by `log.tensorboard=true` / `log.wandb=true`, checked before any model loads, and written by
rank 0 only (the Reporter owns them). Metrics go under `train/<name>` and `eval/<name>` against
the optimizer step; the online stages add a few prompt/response/reward rows as text.

Resuming: what the stopped run wrote to TensorBoard after the checkpoint is cut from its event
files (as from metrics.jsonl), so each step shows once. W&B continues the same run (its id
is kept in <run_dir>/wandb-run-id); W&B cannot take back what it already logged, so the steps
between the checkpoint and the stop show twice there.
"""

from __future__ import annotations

import importlib.util
import math
import secrets
from pathlib import Path
from typing import Any

import yaml

from rlhf_cli.config import LogConfig
from rlhf_cli.core.errors import UserError, first_line

WANDB_ID_FILE = "wandb-run-id"


def check_available(log: LogConfig) -> None:
    """One line when a tracker was asked for and its package is missing."""
    for wanted, package, extra in (
        (log.tensorboard, "tensorboard", "tensorboard"),
        (log.wandb, "wandb", "wandb"),
    ):
        if wanted and importlib.util.find_spec(package) is None:
            raise UserError(
                f"log.{extra}=true needs the {package} package: pip install 'rlhf-cli[{extra}]' "
                f"(or drop log.{extra})"
            )


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric values (bools and strings are not metrics)."""
    return {
        k: float(v)
        for k, v in record.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def samples_markdown(rows: list[dict[str, Any]]) -> str:
    """Sample rows as a markdown table (TensorBoard renders text summaries as markdown)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if not math.isfinite(value) else f"{value:.4g}"
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def drop_events_after(tb_dir: Path, last_step: int) -> None:
    """Rewrite the run's event files without the summaries logged after `last_step` (the
    checkpoint a resumed run continues from), as metrics.jsonl is cut: every reader then shows
    each step once, with the resumed run's values."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        records = list(RawEventFileLoader(str(path)).Load())  # as written, byte for byte
        keep = []
        for raw in records:
            event = Event.FromString(raw)
            if event.step <= last_step or not event.HasField("summary"):
                keep.append(raw)
        if len(keep) == len(records):
            continue
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as fh:
            writer = RecordWriter(fh)
            for raw in keep:
                writer.write(raw)
        tmp.replace(path)


class Trackers:
    """The run's TensorBoard writer and W&B run (either may be absent)."""

    def __init__(
        self,
        log: LogConfig,
        run_dir: Path,
        config_yaml: str,
        stage: str,
        resume_step: int | None,
    ):
        self.tb = None
        self.wandb_run = None
        if log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = run_dir / "tensorboard"
            if resume_step is not None:
                drop_events_after(tb_dir, resume_step)
            # purge_step too: readers that honour it hide what a crashed writer left behind.
            self.tb = SummaryWriter(
                str(tb_dir), purge_step=None if resume_step is None else resume_step + 1
            )
            if resume_step is None:
                self.tb.add_text("config", "```\n" + config_yaml + "\n```", 0)
        if log.wandb:
            config = yaml.safe_load(config_yaml)
            try:
                self.wandb_run = self._start_wandb(log, run_dir, config, stage, resume_step)
            except Exception as err:  # no login, a bad project, no network: one line
                self.close(failed=True)
                first = first_line(err)
                raise UserError(
                    f"log.wandb=true: W&B did not start ({first}); log in with `wandb login` "
                    "(or set WANDB_API_KEY), or add log.wandb_mode=offline and `wandb sync` later"
                ) from err

    @staticmethod
    def _start_wandb(log: LogConfig, run_dir: Path, config, stage: str, resume_step):
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        run_id = None
        if resume_step is not None and id_file.exists():
            run_id = id_file.read_text().strip() or None
        if run_id is None:
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
        run = wandb.init(
            project=log.project,
            name=log.name or str(run_dir),
            tags=list(dict.fromkeys([stage, *log.tags])),
            config=config,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            mode=log.wandb_mode,
        )
        # Plot everything against the optimizer step (W&B's own _step counts log calls).
        run.define_metric("step")
        for prefix in ("train/*", "eval/*", "samples"):
            run.define_metric(prefix, step_metric="step")
        return run

    def scalars(self, step: int, split: str, record: dict[str, Any]) -> None:
        values = {f"{split}/{k}": v for k, v in numbers(record).items()}
        if self.tb is not None:
            for tag, value in values.items():
                self.tb.add_scalar(tag, value, step)
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({"step": step, **values})

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self.tb is not None:
            self.tb.add_text("samples", samples_markdown(rows), step)
            self.tb.flush()
        if self.wandb_run is not None:
            import wandb

            keys = list(rows[0])
            table = wandb.Table(columns=keys, data=[[row[k] for k in keys] for row in rows])
            self.wandb_run.log({"step": step, "samples": table})

    def close(self, failed: bool = False) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None
