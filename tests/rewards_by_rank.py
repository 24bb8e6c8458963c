"""A reward function for tests under torchrun: rank 0's responses score by their length, every
other rank's score 0 (all groups flat), so dynamic sampling fills rank 0 at once and leaves the
others short until the last try."""

from __future__ import annotations

import os


def rank_zero_length(prompts: list[str], responses: list[str]) -> list[float]:
    if os.environ.get("RANK", "0") != "0":
        return [0.0] * len(responses)
    return [float(len(r)) for r in responses]
