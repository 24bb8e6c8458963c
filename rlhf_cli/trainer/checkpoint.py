"""A checkpoint is the whole training state: trainable weights (a PEFT adapter, or the full
model, in safetensors), optimizer, scheduler, RNG states, data position, step, counters and the
resolved config. It is written to a temporary directory and renamed into place, so a directory
named `step-N` is always complete; loading uses safetensors and torch.load(weights_only=True).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from rlhf_cli.core.errors import CheckpointError
from rlhf_cli.core.files import temp_dir
from rlhf_cli.core.progress import console

STATE_FILE = "trainer_state.pt"


FULL_WEIGHTS = "model.safetensors"


STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    # weights_only unpickling may hand tuples back as lists.
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def save_weights(
    model,
    out: Path,
    extras: dict[str, torch.nn.Module] | None = None,
    full_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """The trainable weights: a PEFT adapter (or the full model), plus each extra module (a
    reward or value head) as <name>.safetensors. `full_state`: the trainable weights already
    gathered from FSDP shards (saved in the same format)."""
    from safetensors.torch import save_file, save_model

    if is_peft(model):
        # Only the adapter being trained: a frozen reference adapter is not training state.
        kwargs = {"state_dict": full_state} if full_state is not None else {}
        model.save_pretrained(
            out, safe_serialization=True, selected_adapters=[model.active_adapter], **kwargs
        )
    else:
        if full_state is not None:
            tensors, dropped = without_shared(full_state)
            save_file(
                {k: v.contiguous() for k, v in tensors.items()}, str(out / FULL_WEIGHTS), dropped
            )
        else:
            save_model(model, str(out / FULL_WEIGHTS))
        # With its config beside the weights, a full fine-tune is a model directory that
        # transformers loads as it is (AutoModelForCausalLM.from_pretrained(final)).
        for part in ("config", "generation_config"):
            if getattr(model, part, None) is not None:
                getattr(model, part).save_pretrained(out)
    for name, module in (extras or {}).items():
        save_model(module, str(out / f"{name}.safetensors"))


def without_shared(state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, str]]:
    """`state` with one name per shared tensor (tied embeddings), as safetensors' save_model
    keeps it (the first name in sorted order), and {dropped name: kept name}."""
    by_storage: dict[tuple, list[str]] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.shape, t.stride()) if t.numel() else name
        by_storage.setdefault(key, []).append(name)
    dropped = {
        name: sorted(names)[0] for names in by_storage.values() for name in sorted(names)[1:]
    }
    return {k: v for k, v in state.items() if k not in dropped}, dropped


def load_weights(
    model,
    ckpt: Path,
    extras: dict[str, torch.nn.Module] | None = None,
    full_state: dict | None = None,
) -> None:
    """Load what save_weights wrote; with `full_state` (FSDP) only the extra modules, the
    caller loads the sharded weights."""
    from safetensors.torch import load_file, load_model

    for name, module in (extras or {}).items():
        path = ckpt / f"{name}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{ckpt}: no {path.name} (a checkpoint of another stage?)")
        load_model(module, str(path))
    if full_state is not None:
        return
    if is_peft(model):
        from peft import set_peft_model_state_dict

        files = list(ckpt.glob("adapter_model.safetensors")) + list(
            ckpt.glob("*/adapter_model.safetensors")
        )
        if not files:
            raise CheckpointError(f"{ckpt}: no adapter_model.safetensors (a full-model run?)")
        result = set_peft_model_state_dict(model, load_file(str(files[0])))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise CheckpointError(
                f"{ckpt}: adapter does not match this model ({len(unexpected)} unexpected keys, "
                f"e.g. {unexpected[0]}): were peft.r or target_modules changed?"
            )
        return
    path = ckpt / FULL_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: no {FULL_WEIGHTS} (a LoRA run? set peft=lora)")
    load_model(model, str(path))


def weights_finite(
    model,
    extras: dict[str, torch.nn.Module] | None = None,
    full_state: dict[str, torch.Tensor] | None = None,
) -> bool:
    tensors = (
        list(full_state.values())
        if full_state is not None
        else [p for p in model.parameters() if p.requires_grad]
    )
    tensors += [p for m in (extras or {}).values() for p in m.parameters() if p.requires_grad]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    state: dict[str, Any],
    config_yaml: str,
    keep_last: int,
    tokenizer=None,
    name: str | None = None,
    extras: dict[str, torch.nn.Module] | None = None,
    card: str | None = None,
) -> Path:
    """Write checkpoints/step-N (or `name` under run_dir) atomically, with `card` as its
    README.md when given; prune to keep_last."""
    full_state = state.get("trainable")
    if not weights_finite(model, extras, full_state):
        raise CheckpointError(
            "refusing to save non-finite weights (NaN/inf in a trained parameter)"
        )
    from safetensors import SafetensorError

    parent = run_dir if name else run_dir / "checkpoints"
    target = parent / (name or f"step-{step:06d}")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(parent, target.name)
    except OSError as err:
        raise CheckpointError(write_failure(target, run_dir, err)) from err
    try:
        save_weights(model, tmp, extras, full_state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        try:
            torch.save(state, tmp / STATE_FILE)
        except RuntimeError as err:  # torch reports a failed write as an internal assertion
            raise OSError(f"writing {STATE_FILE} failed") from err
        (tmp / "config.yaml").write_text(config_yaml)
        if card is not None:  # replaces the placeholder card PEFT writes
            (tmp / "README.md").write_text(card, encoding="utf-8")
        for f in tmp.rglob("*"):
            if f.is_file():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
        if target.exists():  # e.g. final/ of a resumed run: swap it out, then drop the old one
            old = parent / f".old-{target.name}-{os.getpid()}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except (OSError, SafetensorError) as err:  # a full disk, a file-size limit, a lost mount
        raise CheckpointError(write_failure(target, run_dir, err)) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint is never kept
    if not name:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def write_failure(target: Path, run_dir: Path, err: BaseException) -> str:
    """One line for a checkpoint that could not be written: where, why, what is left."""
    import resource

    cause = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    cause = " ".join(cause.split())
    where = next(p for p in (target, *target.parents) if p.exists())
    notes = [f"{shutil.disk_usage(where).free / 2**30:.1f} GiB free on its disk"]
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        notes.append(f"files limited to {limit:,} bytes (ulimit -f)")
    return (
        f"could not write the checkpoint {target}: {cause} ({'; '.join(notes)}); nothing of it "
        "was kept and the checkpoints before it are intact: make room, then continue with "
        f"rlhf train ... run_dir={run_dir} resume=auto"
    )


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete the temporary directories a killed save left in `run_dir` (`.tmp-*`, `.old-*`,
    in run_dir and run_dir/checkpoints); returns them. Call it holding the run's lock."""
    found = [
        d
        for parent in (run_dir, run_dir / "checkpoints")
        if parent.is_dir()
        for d in parent.iterdir()
        if d.is_dir() and d.name.startswith((".tmp-", ".old-"))
    ]
    for d in found:
        shutil.rmtree(d, ignore_errors=True)
    return found


def safetensors_complete(path: Path) -> bool:
    """Whether a safetensors file is whole: its header parses and its data ends where the
    file ends (a file cut short by a crash fails)."""
    import json
    import struct

    try:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
        return path.stat().st_size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


def damage(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint directory (None when it is whole): its state loads and
    every safetensors file in it is complete."""
    try:
        load_state(ckpt)
    except CheckpointError as err:
        return str(err).split(":", 1)[-1].strip()
    for f in sorted(ckpt.rglob("*.safetensors")):
        if not safetensors_complete(f):
            return f"{f.relative_to(ckpt)} is incomplete"
    return None


def newest_whole(checkpoints: list[Path]) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that is whole, and a note for each newer one that is damaged."""
    notes = []
    for ckpt in reversed(checkpoints):
        why = damage(ckpt)
        if why is None:
            return ckpt, notes
        notes.append(f"{ckpt} is damaged ({why})")
    return None, notes


class RunLock:
    """An exclusive lock on a run directory (an empty `.lock`, flock): a second process that
    would write the same run stops with one line. Released when the process ends, even when
    it is killed."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.fh = None

    def __enter__(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a")  # never rewritten: the run directory's files stay as they were
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise CheckpointError(
                f"{self.path.parent} is being written by another rlhf process: wait for it to "
                "finish, or choose another run_dir"
            ) from None
        self.fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self.fh is not None:
            self.fh.close()  # closing releases the flock
            self.fh = None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step checkpoints, oldest first (temporary directories are never listed)."""
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    found = []
    for d in ckpt_dir.iterdir():
        m = STEP_DIR.match(d.name)
        if m and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def load_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: not a checkpoint (no {STATE_FILE})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign file
        raise CheckpointError(
            f"{path}: cannot be read ({type(err).__name__}); delete that checkpoint to resume "
            "from the previous one"
        ) from err


def whole_or_fail(checkpoints: list[Path], run_dir: Path) -> Path:
    """The newest whole checkpoint of a run, saying which newer ones were damaged."""

    found, notes = newest_whole(checkpoints)
    for note in notes:
        console.print(f"[yellow]warning:[/] {note}; resuming from an earlier checkpoint")
    if found is None:
        raise CheckpointError(
            f"{run_dir}: every checkpoint is damaged ({'; '.join(notes)}); start a new run"
        )
    return found


TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}$")


def is_default_run_dir(run_dir: Path, stage: str) -> bool:
    """Whether `run_dir` is the default runs/<stage>/<time> (no run_dir= given)."""
    return run_dir.parent.name == stage and bool(TIMESTAMP.match(run_dir.name))


def find_resume_checkpoint(resume: str, run_dir: Path, stage: str) -> Path | None:
    """The checkpoint `resume` points at: auto, a run directory or a checkpoint directory.

    resume=auto takes the newest checkpoint of `run_dir`; only a default run_dir (no run_dir=
    given) falls back to the newest run of the stage beside it."""
    if resume == "auto":
        found = list_checkpoints(run_dir)
        if found:
            return whole_or_fail(found, run_dir)
        siblings = (
            [
                d
                for d in run_dir.parent.glob("*")
                if d.is_dir() and d != run_dir and list_checkpoints(d)
            ]
            if is_default_run_dir(run_dir, stage)
            else []
        )
        if not siblings:
            return None
        newest = max(siblings, key=lambda d: list_checkpoints(d)[-1].stat().st_mtime)
        return list_checkpoints(newest)[-1]
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        why = damage(path)
        if why:
            raise CheckpointError(
                f"resume={resume}: the checkpoint is damaged ({why}); resume from an earlier "
                "one, or from the run directory (its newest whole checkpoint)"
            )
        return path
    if path.is_dir() and list_checkpoints(path):
        return whole_or_fail(list_checkpoints(path), path)
    raise CheckpointError(
        f"resume={resume}: no complete checkpoint there (expected a run directory with "
        f"checkpoints/step-N/{STATE_FILE}, or such a step directory)"
    )
