"""Data: load rows -> normalise the format -> render (chat template or raw) -> tokenize, mask,
truncate -> collate.

Row formats (after the column mapping in `data.columns`):
- `prompt` + `completion` (or `prompt` + `chosen` for SFT on preferred answers), strings or
  message lists;
- `messages`: a conversation, every assistant turn trained (or only the last);
- `prompt` + `chosen` + `rejected`: a preference pair (strings or message lists; a list that
  repeats the prompt is split at its last assistant turn);
- `prompt` + `responses`: K >= 2 ranked responses, best first (Plackett-Luce);
- `chosen` + `rejected` transcripts in Anthropic-HH style, split at the last assistant turn;
- `text`: plain language modelling on the whole text;
- `prompt` + `completion` + `label`: unpaired feedback (kto), the label true for a desirable
  completion.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rlhf_cli.config import DataConfig, ReasoningGymConfig
from rlhf_cli.core.errors import DataError, first_line
from rlhf_cli.envs import reasoning_gym

EPISODES = "episodes:"  # data.path=episodes:N: N seed rows for an environment's own prompts
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


HH_TURN = re.compile(r"\n\n(Human|Assistant):")


# ---------------------------------------------------------------------------------------------
# loading


def builtin_names() -> list[str]:
    assets = resources.files("rlhf_cli") / "assets"
    return sorted(p.name[: -len(".jsonl")] for p in assets.iterdir() if p.name.endswith(".jsonl"))


def builtin_path(name: str) -> Path:
    if name not in builtin_names():
        raise DataError(
            f"data.path=builtin:{name}: no such shipped dataset; choose one of "
            + ", ".join(f"builtin:{n}" for n in builtin_names())
        )
    return Path(str(resources.files("rlhf_cli") / "assets" / f"{name}.jsonl"))


def read_text(path: Path) -> str:
    """A data file's text: UTF-8 (a leading byte-order mark dropped); anything else is a
    DataError naming the first bad byte."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not UTF-8 (byte 0x{err.object[err.start]:02x} on line {line}); "
            "re-save the file as UTF-8"
        ) from err


def read_jsonl(path: Path, stats: Counter, on_bad_row: str) -> list[dict]:
    text = read_text(path)
    if text.lstrip().startswith("["):  # a JSON list saved under .jsonl
        return json_list_rows(path, text, stats, on_bad_row)
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if on_bad_row == "error":
                raise DataError(
                    f"{path}: line {lineno} is not valid JSON ({err.msg} at column "
                    f"{err.colno}); fix it or set data.on_bad_row=drop"
                ) from err
            stats["dropped: malformed JSON"] += 1
            stats["_load_dropped"] += 1
            stats.setdefault("_bad_lines", []).append(lineno)  # type: ignore[arg-type]
            continue
        if not isinstance(row, dict):
            if on_bad_row == "error":
                raise DataError(f"{path}: line {lineno} is not a JSON object")
            stats["dropped: not an object"] += 1
            stats["_load_dropped"] += 1
            continue
        rows.append(row)
    return rows


def load_rows(
    path: str,
    *,
    name: str | None,
    split: str,
    on_bad_row: str,
    stats: Counter,
    generated: ReasoningGymConfig | None = None,
):
    """All rows of a local file, a shipped dataset, a hub dataset or a generator
    (reasoning_gym:TASK, with `generated` its settings), as a list of dicts."""
    if path.startswith(reasoning_gym.PREFIX):
        return reasoning_gym.rows(path, generated or ReasoningGymConfig())
    if path.startswith(EPISODES):
        count = path[len(EPISODES) :]
        if not count.isdigit() or int(count) < 1:
            raise DataError(f"data.path={path}: write episodes:N with N a whole number >= 1")
        return [{"seed": i} for i in range(int(count))]
    if path.startswith("builtin:"):
        return read_jsonl(builtin_path(path[len("builtin:") :]), stats, on_bad_row)
    local = Path(path).expanduser()
    suffix = local.suffix.lower()
    if local.is_file():
        if suffix == ".jsonl" or (suffix == ".json" and _looks_like_jsonl(local)):
            return read_jsonl(local, stats, on_bad_row)
        if suffix == ".json":
            return json_list_rows(local, read_text(local), stats, on_bad_row)
        if suffix in LOCAL_SUFFIXES:
            return _load_with_datasets(LOCAL_SUFFIXES[suffix], data_files=str(local))
        raise DataError(
            f"data.path={path}: unsupported file type {suffix or '(none)'}; use "
            + ", ".join(LOCAL_SUFFIXES)
        )
    if local.is_dir():
        return _load_with_datasets(str(local), split=split, name=name)
    if suffix in LOCAL_SUFFIXES or path.startswith((".", "/", "~")):
        raise DataError(f"data.path={path}: no such file")
    return _load_with_datasets(path, split=split, name=name)


def json_list_rows(path: Path, text: str, stats: Counter, on_bad_row: str) -> list[dict]:
    """The rows of a JSON list (or of a {"name": [rows]} object)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from err
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows (or JSON lines)")
    rows = []
    for index, row in enumerate(data):
        if isinstance(row, dict):
            rows.append(row)
        elif on_bad_row == "error":
            raise DataError(f"{path}: element {index} of the list is not a JSON object")
        else:
            stats["dropped: not an object"] += 1
            stats["_load_dropped"] += 1
    return rows


def _looks_like_jsonl(path: Path) -> bool:
    first = next((line.strip() for line in read_text(path).splitlines() if line.strip()), "")
    return first.startswith("{") and first.endswith("}")


def _load_with_datasets(source: str, split: str = "train", name: str | None = None, **kw):
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(source, name, split=split, **kw)
    except Exception as err:  # datasets raises many types; all mean "cannot load this"
        first = first_line(err)
        raise DataError(f"could not load dataset {source!r} (split {split!r}): {first}") from err
    return ds.to_list()


# ---------------------------------------------------------------------------------------------
# normalising formats


Message = dict[str, str]


@dataclass
class Conversation:
    """One training text: a prompt (messages or a string) and what follows it."""

    prompt: list[Message] | str
    responses: dict[str, Message | str] = field(default_factory=dict)  # completion/chosen/...
    turns: list[Message] | None = None  # a whole multi-turn chat (SFT on messages)
    margin: float | None = None
    label: bool | None = None  # unpaired feedback: desirable or not


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def _nonempty(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    if _is_messages(value):
        return all(isinstance(m["content"], str) for m in value)
    return False


def split_hh(transcript: str) -> tuple[str, str]:
    """'\\n\\nHuman: q\\n\\nAssistant: a' -> ('\\n\\nHuman: q\\n\\nAssistant:', ' a')."""
    cut = transcript.rfind("\n\nAssistant:")
    if cut < 0:
        raise ValueError("no '\\n\\nAssistant:' turn")
    cut += len("\n\nAssistant:")
    return transcript[:cut], transcript[cut:]


def hh_to_messages(transcript: str) -> list[Message]:
    parts = HH_TURN.split(transcript)
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append(
            {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        )
    return messages


def detect_format(columns: set[str], cfg: DataConfig, sample: dict) -> str:
    c = cfg.columns
    if cfg.format != "auto":
        return cfg.format
    if c.messages in columns:
        return "messages"
    if {c.prompt, c.responses} <= columns:
        return "ranked"
    if {c.prompt, c.completion, c.label} <= columns:
        return "unpaired"
    if {c.prompt, c.chosen, c.rejected} <= columns:
        return "preference"
    if {c.chosen, c.rejected} <= columns:
        # Message lists that carry their own prompt are preference pairs; strings are HH.
        return "preference" if _is_messages(sample.get(c.chosen)) else "hh"
    if c.prompt in columns and (c.completion in columns or c.chosen in columns):
        return "prompt_completion"
    if c.text in columns:
        return "text"
    if c.prompt in columns:
        return "prompt"
    if c.seed in columns:
        return "seed"
    raise DataError(
        "could not tell the data format from its columns "
        f"({', '.join(sorted(columns)) or 'none'}): expected {c.prompt}+{c.completion}, "
        f"{c.messages}, {c.prompt}+{c.chosen}+{c.rejected}, {c.prompt}+{c.responses}, "
        f"{c.chosen}+{c.rejected} (HH), {c.text} or {c.seed} (an environment's own prompts); "
        "map yours with data.columns.prompt=<column> etc."
    )


REQUIRED = {
    "prompt_completion": ("prompt", "completion|chosen"),
    "messages": ("messages",),
    "preference": ("chosen", "rejected"),
    "ranked": ("prompt", "responses"),
    "prompt": ("prompt",),
    "hh": ("chosen", "rejected"),
    "text": ("text",),
    "unpaired": ("prompt", "completion", "label"),
    "seed": ("seed",),
}


def parse_label(value: Any) -> bool:
    """A desirable/undesirable label: a bool, 0/1, or true/false/yes/no/desirable/... text."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "yes", "1", "desirable", "good", "positive"):
            return True
        if word in ("false", "no", "0", "undesirable", "bad", "negative"):
            return False
    raise ValueError(f"label {value!r} is not true/false")


def _same_answer(a: Any, b: Any) -> bool:
    """Two answers (strings or assistant messages) with the same text: a pair with nothing to
    prefer."""
    text = lambda x: x.get("content") if isinstance(x, dict) else x  # noqa: E731
    return isinstance(text(a), str) and text(a).strip() == str(text(b)).strip()


def check_columns(columns: set[str], fmt: str, cfg: DataConfig, source: str) -> None:
    for need in REQUIRED[fmt]:
        names = [getattr(cfg.columns, n) for n in need.split("|")]
        if not any(n in columns for n in names):
            raise DataError(
                f"{source}: column {' or '.join(repr(n) for n in names)} not found "
                f"(format {fmt}); the columns are: {', '.join(sorted(columns)) or 'none'}. "
                f"Map one with data.columns.{need.split('|')[0]}=<column>"
            )


def normalise(row: dict, fmt: str, cfg: DataConfig, prompt_only: bool = False) -> Conversation:
    """Row -> Conversation (only its prompt when `prompt_only`); raises ValueError for an empty
    or malformed row."""
    c = cfg.columns
    margin = row.get(c.margin)
    margin = float(margin) if isinstance(margin, int | float) else None
    if margin is not None and not math.isfinite(margin):
        raise ValueError(f"margin {margin} is not a finite number")
    if fmt == "seed":
        if not prompt_only:
            raise ValueError("a seed row has no text to train on (online stages with stage.env)")
        return Conversation(prompt="")
    if fmt == "text":
        text = row.get(c.text)
        if not _nonempty(text):
            raise ValueError("empty text")
        return Conversation(prompt="", responses={"completion": text})
    if fmt == "prompt" or (
        prompt_only and fmt in ("prompt_completion", "preference", "ranked", "unpaired")
    ):
        prompt = row.get(c.prompt)
        if not _nonempty(prompt):
            raise ValueError("empty or malformed prompt")
        return Conversation(prompt=prompt)
    if fmt == "messages":
        return _messages(row.get(c.messages), prompt_only)
    if fmt == "hh":
        return _hh(row.get(c.chosen), row.get(c.rejected))
    label = parse_label(row.get(c.label)) if fmt == "unpaired" else None
    if fmt == "unpaired":
        fmt = "prompt_completion"
    prompt, responses = _responses(row, fmt, c)
    prompt, responses = _answers(prompt, responses)
    if fmt == "preference" and _same_answer(responses["chosen"], responses["rejected"]):
        raise ValueError("chosen and rejected are the same answer")
    if isinstance(prompt, list) != isinstance(next(iter(responses.values())), dict):
        # Mixed forms: turn the strings into messages.
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        responses = {
            k: v if isinstance(v, dict) else {"role": "assistant", "content": v}
            for k, v in responses.items()
        }
    return Conversation(prompt=prompt, responses=responses, margin=margin, label=label)


def _messages(turns: Any, prompt_only: bool) -> Conversation:
    """A `messages` row: the whole conversation, or (prompt_only) up to its last user turn."""
    if prompt_only:
        if not _nonempty(turns) or not any(m["role"] == "user" for m in turns):
            raise ValueError("messages has no user turn")
        last_user = max(i for i, m in enumerate(turns) if m["role"] == "user")
        return Conversation(prompt=list(turns[: last_user + 1]))
    if not _nonempty(turns):
        raise ValueError("messages is not a non-empty list of {role, content}")
    if not any(m["role"] == "assistant" for m in turns):
        raise ValueError("no assistant turn")
    return Conversation(prompt=[], turns=list(turns))


def _hh(chosen: Any, rejected: Any) -> Conversation:
    """An Anthropic HH pair: two transcripts that share everything before the last answer."""
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        raise ValueError("HH chosen/rejected must be transcripts (strings)")
    prompt, chosen_resp = split_hh(chosen)
    prompt_r, rejected_resp = split_hh(rejected)
    if prompt_r != prompt:
        raise ValueError("chosen and rejected transcripts differ before the last answer")
    if not (chosen_resp.strip() and rejected_resp.strip()):
        raise ValueError("empty answer")
    if _same_answer(chosen_resp, rejected_resp):
        raise ValueError("chosen and rejected are the same answer")
    return Conversation(prompt=prompt, responses={"chosen": chosen_resp, "rejected": rejected_resp})


def _responses(row: dict, fmt: str, c) -> tuple[Any, dict[str, Any]]:
    """A prompt_completion, preference or ranked row's prompt (None when its responses are
    message lists that carry it) and its responses by name (completion; chosen, rejected;
    rank0, rank1, ...)."""
    prompt = row.get(c.prompt)
    responses: dict[str, Any] = {}
    if fmt == "ranked":
        ranked = row.get(c.responses)
        if not isinstance(ranked, list) or len(ranked) < 2:
            raise ValueError("responses must be a list of at least 2 responses, best first")
        responses = {f"rank{k}": r for k, r in enumerate(ranked)}
    for name in (
        ["chosen", "rejected"] if fmt == "preference" else ["completion"] * (fmt != "ranked")
    ):
        col = getattr(c, name)
        if fmt == "prompt_completion" and col not in row:
            col = c.chosen  # SFT on the preferred answers of a preference set
        responses[name] = row.get(col)
    if not all(_nonempty(r) for r in responses.values()):
        raise ValueError("empty or malformed response")
    if prompt is None or (not _nonempty(prompt) and prompt != ""):
        # A message-list response that carries its own prompt (e.g. UltraFeedback's chosen).
        if not all(_is_messages(r) for r in responses.values()):
            raise ValueError("empty or malformed prompt")
        prompt = None
    return prompt, responses


def _answers(prompt: Any, responses: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Responses given as message lists -> their last (assistant) message; the messages in
    front of them, the same for every response, are the prompt when the row has none."""
    history = None
    for name, resp in list(responses.items()):
        if _is_messages(resp):
            if resp[-1]["role"] != "assistant":
                raise ValueError(f"{name} does not end with an assistant turn")
            if len(resp) > 1:  # the prompt repeated in front of the answer
                if history is not None and list(resp[:-1]) != history:
                    raise ValueError(f"{name} has another message history than the first answer")
                history = list(resp[:-1])
                if prompt is None:
                    prompt = history
                resp = resp[-1]
            responses[name] = resp[0] if isinstance(resp, list) else resp
    if prompt is None:
        raise ValueError("no prompt")
    return prompt, responses
