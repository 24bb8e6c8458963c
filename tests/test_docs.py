"""The docs hold together: every relative link in README.md and docs/*.md resolves (a `#anchor`
into a markdown file names one of its headings, by GitHub's slug rule), every `make <target>`
they name is a Makefile target, every docs page is linked from the README, and the README stays
a short front page. Each check lists every problem it finds. Plain text only: no model, no torch.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE = re.compile(r"`[^`]+`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose(text: str) -> str:
    """The text outside code blocks and inline code."""
    return INLINE.sub("", FENCE.sub("", text))


def code(text: str) -> list[str]:
    """The code blocks and inline code spans."""
    blocks = FENCE.findall(text)
    return blocks + INLINE.findall(FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    targets = LINK.findall(prose(path.read_text(encoding="utf-8")))
    return [t for t in targets if not re.match(r"(https?|mailto):", t)]


def test_relative_links_resolve():
    problems = []
    for page in PAGES:
        for target in links(page):
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                problems.append(f"{rel(page)}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{rel(page)}: {target}: no heading #{anchor} in {rel(dest)}")
    assert problems == []


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set()
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-/$() ]+?)\s*:(?!=)(.*)", line)
        if m:
            targets.update(m.group(1).split())
    return targets - {".PHONY"}


def test_make_targets_exist():
    targets = makefile_targets()
    problems = []
    for page in PAGES:
        for snippet in code(page.read_text(encoding="utf-8")):
            for m in re.finditer(r"\bmake((?:\s+[a-z][\w.\-]*)+)", snippet):
                for name in m.group(1).split():
                    if name not in targets:
                        problems.append(f"{rel(page)}: make {name}: not a Makefile target")
    assert problems == []


def train_commands(text: str) -> list[str]:
    """Every `rlhf train ...` command of the code blocks, continuation lines joined; those with
    placeholders for options (`...`) left out."""
    commands = []
    for block in FENCE.findall(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            output = ": " in line  # a line a run printed ("rlhf train stage=sft: done")
            if re.match(r"(\S*/)?rlhf train\b", line) and "..." not in line and not output:
                commands.append(line)
    return commands


@pytest.mark.slow
def test_train_commands_compose(capsys):
    """Each documented `rlhf train` command names keys, groups and options that exist and
    values that pass validation: composed as the CLI composes it (a sweep's every job), nothing
    run. A placeholder (`runs/sft/<time>`) stands for a path."""
    from conftest import compose

    from rlhf_cli.compose import sweep_jobs

    problems = []
    for page in PAGES:
        for command in train_commands(page.read_text(encoding="utf-8")):
            words = shlex.split(re.sub(r"<[^>\s]+>", "placeholder", command))[2:]
            overrides = [w for w in words if "=" in w and not w.startswith(("-", "launch."))]
            try:
                for job in sweep_jobs(overrides) if "-m" in words else [overrides]:
                    compose(*job)
            except SystemExit:
                problems.append(f"{rel(page)}: {command}: {capsys.readouterr().err.strip()}")
    assert problems == []


def test_every_docs_page_linked_from_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(README)}
    assert [rel(p) for p in DOCS if p.resolve() not in linked] == []


def test_readme_is_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) < 350
