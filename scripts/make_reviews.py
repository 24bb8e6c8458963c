"""Write the mixed-sentiment film reviews of the controlled-sentiment demo (`make demo`).

    python scripts/make_reviews.py                  # writes runs/demo/reviews.jsonl
    python scripts/make_reviews.py --out DIR -n 800

Rows are `{"prompt", "completion"}`: a request for a review of a made-up film, and a two- or
three-sentence review built from the word lists of `rlhf_cli/sentiment.py` (see `reviews()`
there). Each adjective slot is independently positive (40%), negative (40%) or neutral (20%), so
the reviews average a sentiment of 0 and the model fine-tuned on them (the reference) is neutral
on average. Deterministic for a seed. `conf/data/reviews.yaml` (`data=reviews`) reads this file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from rlhf_cli.sentiment import reviews, sentiment  # noqa: E402


def write_reviews(out: Path, n: int = 800, seed: int = 20240923) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reviews(n, seed)), encoding="ascii")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("-n", type=int, default=800)
    parser.add_argument("--seed", type=int, default=20240923)
    args = parser.parse_args(argv)
    path = write_reviews(args.out, args.n, args.seed)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    mean = sum(sentiment(r["completion"]) for r in rows) / len(rows)
    print(f"wrote {path} ({len(rows)} rows, mean sentiment {mean:+.3f})")


if __name__ == "__main__":
    main()
