"""The ground truth of the controlled-sentiment demo (`make demo`): word lists of a tiny review
language and a sentiment score that reads any text.

A miniature of the DPO paper's IMDb experiment (Rafailov et al. 2023, section 6.1), where a
sentiment classifier is the reward: here the "classifier" is exact, so the reward a policy
earns is measured, not estimated. `scripts/make_reviews.py` writes the mixed-sentiment reviews
the reference model is fine-tuned on (`reviews()`, written by `scripts/make_reviews.py`).

Use it as a reward function: `reward.fn=rlhf_cli.sentiment:score`.
"""

from __future__ import annotations

import random
import re

# Every word is one to three tokens of the tiny model's tokenizer (trained on the shipped data).
POSITIVE = (
    "good",
    "perfect",
    "great",
    "lovely",
    "clever",
    "bright",
    "fun",
    "nice",
    "smart",
    "warm",
    "strong",
    "clear",
)
NEGATIVE = (
    "bad",
    "bland",
    "cheap",
    "slow",
    "awful",
    "boring",
    "dull",
    "poor",
    "silly",
    "weak",
    "ugly",
    "stale",
)
# Adjectives that carry no sentiment: reviews mix them in, the score ignores them.
NEUTRAL = ("long", "short", "simple", "quiet", "old", "new", "plain", "big")
# A negator flips the sentiment word right after it ("not good" counts as negative).
NEGATORS = ("not", "never", "hardly")

_WORD = re.compile(r"[a-z]+")
_POLARITY = {**{w: 1 for w in POSITIVE}, **{w: -1 for w in NEGATIVE}}


def counts(text: str) -> tuple[int, int]:
    """(positive, negative) sentiment words in `text`, a negator flipping the next word."""
    pos = neg = 0
    flip = False
    for word in _WORD.findall(text.lower()):
        polarity = _POLARITY.get(word, 0) * (-1 if flip else 1)
        pos += polarity > 0
        neg += polarity < 0
        flip = word in NEGATORS
    return pos, neg


def sentiment(text: str) -> float:
    """(positive - negative) / (positive + negative) sentiment words: +1 all positive, -1 all
    negative, 0 balanced or none. Mixed-sentiment reviews average 0."""
    pos, neg = counts(text)
    return (pos - neg) / (pos + neg) if pos + neg else 0.0


def score(prompts: list[str], responses: list[str], **_: object) -> list[float]:
    """Reward function (reward.fn=rlhf_cli.sentiment:score): the sentiment of each response."""
    return [sentiment(r) for r in responses]


# -- the corpus ------------------------------------------------------------------------------

TITLES = (
    "Blue River", "The Last Train", "Night Garden", "Paper Moon", "Silent Harbor",
    "Red Desert", "The Glass House", "Winter Road", "Iron Bridge", "The Tenth Door",
    "Summer Storm", "Black Lake", "City of Dust", "Golden Field", "The Lost Map",
    "Salt and Stone", "Northern Lights", "The Clockmaker", "Harbor Town", "Seven Doors",
    "The Long Walk", "Green Valley", "Broken Compass", "The Far Shore", "Stone Garden",
    "Midnight Express", "The Painter", "Open Sky", "The Lighthouse", "Falling Leaves",
)  # fmt: skip
ASPECTS = (
    "plot", "cast", "music", "acting", "ending", "story", "script", "pacing", "humor", "lead",
)  # fmt: skip
PROMPTS = (
    "Write a short review of the film {title}.",
    "Review the movie {title}.",
    "What did you think of {title}?",
)
SENTENCES = (
    "The {a} was {x} and the {b} was {y}.",
    "The {a} was {x}, but the {b} was {y}.",
    "The {a} was {x}. The {b} was {y}.",
    "I found the {a} {x} and the {b} {y}.",
)
ENDINGS = ("Overall it was {z}.", "Overall a {z} film.", "")


def _adjective(rng: random.Random) -> str:
    """Positive 40%, negative 40%, neutral 20%: sentiment 0 on average."""
    u = rng.random()
    return rng.choice(POSITIVE if u < 0.4 else NEGATIVE if u < 0.8 else NEUTRAL)


def review_prompts() -> list[str]:
    """Every distinct prompt of the corpus (90)."""
    return [p.format(title=t) for t in TITLES for p in PROMPTS]


def reviews(n: int = 800, seed: int = 20240923) -> list[dict]:
    """`n` rows {prompt, completion}: a request for a review of a made-up film and a two- or
    three-sentence review whose adjective slots are independently positive, negative or neutral
    (deterministic for a seed)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.sample(ASPECTS, 2)
        text = rng.choice(SENTENCES).format(a=a, b=b, x=_adjective(rng), y=_adjective(rng))
        ending = rng.choice(ENDINGS).format(z=_adjective(rng))
        prompt = rng.choice(PROMPTS).format(title=rng.choice(TITLES))
        rows.append({"prompt": prompt, "completion": f"{text} {ending}".strip()})
    return rows
