"""One module per stage; each defines a `Stage` subclass. `STAGES` maps stage.name to it."""

from __future__ import annotations

import importlib

STAGES = {
    "sft": "rlhf_cli.stages.sft:SFTStage",
    "rm": "rlhf_cli.stages.rm:RMStage",
    "dpo": "rlhf_cli.stages.dpo:DPOStage",
    "kto": "rlhf_cli.stages.kto:KTOStage",
    "ppo": "rlhf_cli.stages.ppo:PPOStage",
    "grpo": "rlhf_cli.stages.grpo:GRPOStage",
    "rloo": "rlhf_cli.stages.rloo:RLOOStage",
    "reinforce": "rlhf_cli.stages.reinforce:ReinforceStage",
    "rs": "rlhf_cli.stages.rs:RSStage",
}


def stage_class(name: str):
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)
