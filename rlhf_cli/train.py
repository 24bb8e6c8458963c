"""`rlhf train`: setup -> data -> model -> loop -> save, for whichever stage the config names."""

from __future__ import annotations

import shutil
import signal
from contextlib import ExitStack
from pathlib import Path

import torch
from omegaconf import OmegaConf

from rlhf_cli.config import Config, SamplingConfig, allow_remote_code
from rlhf_cli.core import distributed as dist
from rlhf_cli.core.errors import CheckpointError, Interrupted, UserError
from rlhf_cli.core.progress import console, summary_table
from rlhf_cli.core.quiet import quiet_libraries
from rlhf_cli.data.examples import load_datasets
from rlhf_cli.model.load import (
    autocast_dtype,
    count_parameters,
    load_model,
    load_tokenizer,
    resolve_device,
)
from rlhf_cli.multiturn import env_factory, stage_tools
from rlhf_cli.rewards import check_inputs, reward_terms
from rlhf_cli.stages import stage_class
from rlhf_cli.trainer import checkpoint as ckpt_lib
from rlhf_cli.trainer.loop import train
from rlhf_cli.trainer.state import StopFlag, StopRequested, seed_everything
from rlhf_cli.trainer.tracking import check_available as check_trackers

# Keys that may change between a run and its resumption without a warning.
RESUME_FREE_KEYS = {
    "run_dir",
    "resume",
    "train.max_steps",
    "train.epochs",
    "train.save_every",
    "train.keep_last",
    "train.eval_every",
    "train.eval_on_start",
    "train.log_every",
    "train.eval_batches",
    "device",
    "resume_force",
    "dist.timeout_s",
}


RESUME_FREE_PREFIXES = ("log.",)  # tracking may be switched on or off when resuming


# Folders above run_dir that did not exist before this command (set by the CLI): removed again,
# when empty, with a run directory that a mistake left empty.
NEW_PARENTS: list[Path] = []


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(old_yaml: str, new_yaml: str) -> list[str]:
    old = _flatten(OmegaConf.to_container(OmegaConf.create(old_yaml)))  # type: ignore[arg-type]
    new = _flatten(OmegaConf.to_container(OmegaConf.create(new_yaml)))  # type: ignore[arg-type]
    keys = sorted(
        k
        for k in (set(old) | set(new)) - RESUME_FREE_KEYS
        if not k.startswith(RESUME_FREE_PREFIXES)
    )
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def prepare_run_dir(cfg: Config, run_dir: Path) -> tuple[Path, Path | None]:
    """(the run directory to write, the checkpoint to resume from or None).

    A fresh run never writes over a run that has checkpoints. Resuming writes into one run
    only: `run_dir` when it was named (a checkpoint of another run is forked: its metrics and
    reference cache are copied in, the source is left as it was), else the run the
    checkpoint belongs to. Another stage's run is refused.
    """
    holds_run = bool(ckpt_lib.list_checkpoints(run_dir)) or (run_dir / "final").exists()
    if cfg.resume is None:
        if holds_run:
            raise CheckpointError(
                f"run_dir={run_dir} already holds a run: add resume=auto to continue it, or "
                "choose another run_dir"
            )
        return run_dir, None
    found = ckpt_lib.find_resume_checkpoint(cfg.resume, run_dir, cfg.stage.name)
    if found is None:
        console.print(f"resume={cfg.resume}: no checkpoint found, starting fresh in {run_dir}")
        return run_dir, None
    saved_stage = _saved_stage(found)
    if saved_stage is not None and saved_stage != cfg.stage.name:
        raise CheckpointError(
            f"resume={cfg.resume} is a stage={saved_stage} run and this is stage="
            f"{cfg.stage.name}: to start {cfg.stage.name} from its adapter use "
            f"model.adapter={found.parent.parent} (resume continues a run of the same stage)"
        )
    source = found.parent.parent
    if source.resolve() == run_dir.resolve():
        return run_dir, found
    if ckpt_lib.is_default_run_dir(run_dir, cfg.stage.name):
        # No run_dir named: continue the checkpoint's own run; drop the empty directory Hydra
        # made for this invocation (its lock file aside).
        if run_dir.is_dir() and not any(p.name != ".lock" for p in run_dir.iterdir()):
            shutil.rmtree(run_dir, ignore_errors=True)
        return source, found
    if holds_run:
        raise CheckpointError(
            f"run_dir={run_dir} already holds a run: fork resume={cfg.resume} into a new "
            "run_dir, or continue that run with resume=auto"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "ref_logps.pt"):  # the history up to the checkpoint
        if (source / name).is_file():
            shutil.copy2(source / name, run_dir / name)
    if (source / "rounds").is_dir():  # rejection sampling's rounds (later ones are dropped)
        shutil.copytree(source / "rounds", run_dir / "rounds", dirs_exist_ok=True)
    console.print(f"resume: forking {found} into {run_dir} ({source} is left unchanged)")
    return run_dir, found


def _saved_stage(checkpoint: Path) -> str | None:
    path = checkpoint / "config.yaml"
    if not path.is_file():
        return None
    saved = OmegaConf.to_container(OmegaConf.create(path.read_text()))
    stage = saved.get("stage") if isinstance(saved, dict) else None
    return stage.get("name") if isinstance(stage, dict) else None


def run(cfg: Config, config_yaml: str, run_dir: Path) -> dict:
    """Train one stage end to end; returns the summary rows.

    One process writes a run: rank 0 locks `run_dir` (and the run it continues, when that is
    another), and a second process on the same run stops with one line. A user mistake found
    before anything was trained leaves no trace: a run directory that was empty (Hydra makes
    it) and holds no checkpoint and no metrics is removed again, by the process that locked
    it."""
    dist.init(cfg.dist.timeout_s)
    console.quiet = not dist.is_main()
    with ExitStack() as locks:
        created = False  # this process locked an empty run_dir: it may remove it again
        decided: tuple | str = ""
        if dist.is_main():
            was_empty = not run_dir.exists() or not any(run_dir.iterdir())
            try:
                locks.enter_context(ckpt_lib.RunLock(run_dir))
                created = was_empty
                decided = prepare_run_dir(cfg, run_dir)
                if decided[0].resolve() != run_dir.resolve():  # continuing another run, in it
                    locks.enter_context(ckpt_lib.RunLock(decided[0]))
            except UserError as err:
                decided = str(err)
        # Rank 0 decides where the run goes (and what it resumes); every rank follows.
        decided = dist.broadcast_object(decided)
        try:
            if isinstance(decided, str):
                raise CheckpointError(decided)
            return _run_in(cfg, config_yaml, run_dir, *decided)
        except UserError:
            if created and run_dir.exists() and not _holds_results(run_dir):
                shutil.rmtree(run_dir, ignore_errors=True)
                for parent in NEW_PARENTS:  # deepest first
                    if parent.is_dir() and not any(parent.iterdir()):
                        parent.rmdir()
            raise


def _holds_results(run_dir: Path) -> bool:
    """Anything worth keeping: a checkpoint, final/, or metrics of trained steps."""
    metrics = run_dir / "metrics.jsonl"
    return (
        bool(ckpt_lib.list_checkpoints(run_dir))
        or (run_dir / "final").exists()
        or (metrics.is_file() and metrics.stat().st_size > 0)
    )


def _run_in(
    cfg: Config, config_yaml: str, hydra_dir: Path, run_dir: Path, resume_from: Path | None
) -> dict:
    if (
        not dist.is_main()
        and hydra_dir != run_dir
        and hydra_dir.is_dir()
        and not any(hydra_dir.iterdir())
    ):
        hydra_dir.rmdir()  # the empty directory Hydra made for this rank's own timestamp
    if dist.is_main():
        for leftover in ckpt_lib.remove_leftovers(run_dir):
            console.print(f"removed {leftover} (left by an interrupted save)")
    return _run(cfg, config_yaml, run_dir, resume_from)


def _run(cfg: Config, config_yaml: str, run_dir: Path, resume_from: Path | None) -> dict:
    # Signals are caught from here on: the model and data load, the stage prepares (the
    # reference precompute), then the loop saves and stops at its next stop point.
    with StopFlag() as stop:
        return _run_stopping(cfg, config_yaml, run_dir, resume_from, stop)


def _run_stopping(
    cfg: Config, config_yaml: str, run_dir: Path, resume_from: Path | None, stop: StopFlag
) -> dict:
    check_trackers(cfg.log)  # a missing tensorboard / wandb package, before anything is written
    if resume_from is not None:
        saved = (
            (resume_from / "config.yaml").read_text()
            if (resume_from / "config.yaml").exists()
            else ""
        )
        diffs = config_differences(saved, config_yaml) if saved else []
        if diffs and not cfg.resume_force:
            more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
            raise CheckpointError(
                f"resume={cfg.resume}: the config changed since {resume_from} ("
                + "; ".join(diffs[:3])
                + f"{more}): resume with the same settings, or add resume_force=true to "
                "continue with the new ones"
            )
        for diff in diffs:
            console.print(f"[yellow]warning:[/] resuming with a changed config: {diff}")
        console.print(f"resuming from {resume_from}")
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.yaml").exists():
            (run_dir / "config.yaml").write_text(config_yaml)

    quiet_libraries()
    allow_remote_code(cfg.model.trust_remote_code)  # for reward.model / ref runs too
    terms = None
    if isinstance(cfg.stage, SamplingConfig):
        # A typo (or an unknown reward.kwargs, or environment) fails here, before any loading.
        terms = reward_terms(cfg.reward)
        env_factory(cfg.stage)
    seed_everything(cfg.train.seed)
    device = dist.local_device(cfg.device) or resolve_device(cfg.device)
    amp = autocast_dtype(cfg.train.precision, device)
    tokenizer = load_tokenizer(cfg.model)
    cls = stage_class(cfg.stage.name)
    train_examples, eval_examples, reports = load_datasets(
        cfg.data,
        tokenizer,
        cls.data_kind,
        cfg.train.seed,
        completion_only=getattr(cfg.stage, "completion_only", True),
        only_last_turn=getattr(cfg.stage, "train_on_turns", "all") == "last",
        tools=stage_tools(cfg.stage),
    )
    if terms is not None:  # each reward function's arguments: from the config or the data
        columns = {k for ex in train_examples + eval_examples for k in ex.get("columns", {})}
        check_inputs(terms, columns, getattr(cfg.stage, "multi_turn", False))
        if not getattr(cfg.stage, "env", None) and not all(
            ex["prompt_ids"] for ex in train_examples + eval_examples
        ):
            raise UserError(
                f"data.path={cfg.data.path}: rows without a prompt (seed rows) need an "
                "environment that writes the first message: set stage.env=module:Class (its "
                "reset(row) returns it)"
            )
    for report in reports:
        console.print("data: " + report.line())
    if eval_examples:
        console.print(f"data: {len(train_examples)} train / {len(eval_examples)} eval examples")

    model = load_model(cfg, device, tokenizer)
    trainable, total = count_parameters(model)
    console.print(
        f"model: {cfg.model.name_or_path} on {device} (quant={cfg.quant.mode}, peft={cfg.peft.method}, "
        f"autocast={'bf16' if amp else 'off'}): {trainable:,} trainable of {total:,} parameters"
    )
    stage = cls(cfg, model, tokenizer, device, amp)
    stage.stop_requested = lambda: bool(stop.signum)
    try:
        stage.prepare(train_examples, eval_examples, run_dir)  # e.g. the reference precompute
    except StopRequested:
        name = signal.Signals(stop.signum or signal.SIGINT).name
        raise Interrupted(
            f"{name}: stopped before the first step (nothing trained, no checkpoint); run the "
            "same command again to start",
            128 + (stop.signum or signal.SIGINT),
        ) from None
    if cfg.dist.strategy == "fsdp":
        dist.fsdp_wrap(model)  # after the stage set up its adapters and reference
    if dist.world_size() > 1:
        # Same initial weights everywhere (seeded above); from here each rank's dropout and
        # sampling draw their own random numbers.
        torch.manual_seed(cfg.train.seed + 1_000_003 * dist.rank())
        console.print(f"distributed: {dist.world_size()} ranks, {device.type}")
    rows = train(
        stage,
        train_examples,
        eval_examples,
        run_dir=run_dir,
        config_yaml=config_yaml,
        resume_from=resume_from,
        stop=stop,
    )
    summary_table(f"rlhf train stage={cfg.stage.name}: done", rows)
    return rows
