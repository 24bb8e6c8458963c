"""`rlhf merge RUN out=DIR`: fold a run's LoRA adapter into its base and save a plain
transformers model directory (+ tokenizer) that AutoModelForCausalLM.from_pretrained loads
without peft or bitsandbytes.

The base is loaded unquantized (fp32, or `dtype`) for merging: W' = W + (alpha / r) B A cannot be
stored in 4 bits without rounding the update away. A QLoRA adapter was trained against the
NF4-rounded W, so the merged model equals the run sampled with `quant=none`, which is close to,
but not bit-identical with, the run as trained on its 4-bit base.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from rlhf_cli.core.errors import UserError
from rlhf_cli.core.files import temp_dir
from rlhf_cli.core.progress import summary_table
from rlhf_cli.model.load import DTYPES
from rlhf_cli.tools.policy import load_policy, locate
from rlhf_cli.trainer.card import model_card


def check_target(target: Path, run: Path, force: bool) -> None:
    """Refuse an `out=` whose replacement would delete something that is not a merged model."""
    where, source = target.resolve(), run.resolve()
    if where == Path.cwd().resolve() or where in Path.cwd().resolve().parents:
        raise UserError(
            f"out={target} is the current directory (or holds it): name a new directory"
        )
    if where == source or where in source.parents or source in where.parents:
        raise UserError(
            f"out={target} is {run} or holds it (or is inside it): name a new directory"
        )
    if not target.exists():
        return
    if not force:
        raise UserError(
            f"out={target} exists; choose another directory or add force=true to replace it"
        )
    is_model = target.is_dir() and (target / "config.json").is_file()
    if not is_model and not (target.is_dir() and not any(target.iterdir())):
        raise UserError(
            f"out={target} exists and is not a model directory (no config.json): force=true only "
            "replaces a model written before; name a new directory"
        )


def merged_card(found) -> str:
    """The run's model card for its merged model: the config and the run's last metrics."""

    config = (found.weights / "config.yaml").read_text(encoding="utf-8")
    metrics: dict[str, dict] = {"train": {}, "eval": {}}
    for run_dir in (found.weights, found.weights.parent, found.weights.parent.parent):
        path = run_dir / "metrics.jsonl"
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and row.get("split") in metrics:
                    metrics[row["split"]] = row
            break
    return model_card(found.cfg, config, "merged", metrics["train"], metrics["eval"])


def merge(
    run: str, out: str, force: bool = False, dtype: str = "auto", device: str = "cpu"
) -> Path:
    """Merge `run` into a plain model directory `out` (replacing it only when `force`, and only
    when it holds a model: never the current directory, the run or a folder above either)."""
    target = Path(out)
    check_target(target, Path(run), force)
    if dtype not in ("auto", *DTYPES):
        raise UserError(f"dtype={dtype!r} is not one of: auto, {', '.join(DTYPES)}")
    found = locate(run)
    if found.cfg is None:
        raise UserError(f"{run}: a plain model directory already; nothing to merge")
    if dtype == "auto":  # the run's own dtype; `auto` meant fp32 masters for the update
        dtype = "float32" if found.cfg.model.dtype == "auto" else found.cfg.model.dtype
    policy = load_policy(run, device, quant="none", dtype=dtype)
    model = policy.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.config.use_cache = True  # training turned it off; generation wants it
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(target.parent, target.name)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        policy.tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(merged_card(found), encoding="utf-8")
        # Written beside the target, then renamed: a half-written model is never loaded.
        if target.is_dir():  # force=true
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary_table(
        f"rlhf merge {run}",
        {
            "merged": policy.description,
            "dtype": dtype,
            "written to": str(target),
            "load with": f"AutoModelForCausalLM.from_pretrained({str(target)!r})",
        },
    )
    return target
