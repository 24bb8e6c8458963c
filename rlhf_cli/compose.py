"""Hydra composition with one-line errors: the config groups' options, a checked compose (an
unknown key or option is one line naming what exists) and a sweep's jobs."""

from __future__ import annotations

import re

from rlhf_cli.config import config_dir, register_configs
from rlhf_cli.core.errors import UserError, fail


def one_line(err: BaseException) -> str:
    """A Hydra/OmegaConf composition error as one line: what failed and why."""
    from hydra.errors import MissingConfigException

    chain: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    missing = next((c for c in chain if isinstance(c, MissingConfigException)), None)
    if missing is not None:
        m = re.search(r"Could not find '([^/']+)/([^']+)'", str(missing))
        if m:
            group, name = m.groups()
            return (
                f"{group}={name}: no such option; choose one of: {', '.join(group_options(group))}"
            )
    parts = []
    for c in chain[:2]:
        lines = [ln.strip() for ln in str(c).splitlines() if ln.strip()]
        # Hydra's "use +key=value" hint only helps for free-form dicts (reward.kwargs).
        drop = ("full_key:", "object_type=", "reference_type=")
        lines = [
            ln
            for ln in lines
            if not ln.startswith(drop) and not (ln.startswith("To append") and "kwargs." not in ln)
        ]
        text = re.sub(r"\s*(reference_type|object_type)=(\w+\[[^\]]*\]|\S+)", "", " ".join(lines))
        text = text.rstrip(".")
        if text and "$VALUE" not in text:
            parts.append(text)
    return ": ".join(parts) or type(err).__name__


def group_options(group: str) -> list[str]:
    return sorted(f.stem for f in (config_dir() / group).glob("*.yaml"))


def compose_checked(overrides: list[str]):
    """Compose and validate the config for one set of overrides; exit with one line if bad."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            cfg = compose("config", overrides=overrides)
        return OmegaConf.to_object(cfg)
    except UserError as err:
        fail(f"config: {err}")
    except Exception as err:  # Hydra/OmegaConf composition errors
        fail(f"config: {one_line(err)} (`rlhf train --help` lists the keys)")
    finally:
        GlobalHydra.instance().clear()


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Every job of a multirun, as override lists (Hydra's own sweep expansion)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:
        fail(f"config: {one_line(err)}")
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [job for batch in batches for job in batch]
