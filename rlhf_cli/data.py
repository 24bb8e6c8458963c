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
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import torch

from rlhf_cli.config import DataConfig
from rlhf_cli.errors import DataError, first_line

IGNORE_INDEX = -100
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


def load_rows(path: str, *, name: str | None, split: str, on_bad_row: str, stats: Counter):
    """All rows of a local file, a shipped dataset or a hub dataset, as a list of dicts."""
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
    raise DataError(
        "could not tell the data format from its columns "
        f"({', '.join(sorted(columns)) or 'none'}): expected {c.prompt}+{c.completion}, "
        f"{c.messages}, {c.prompt}+{c.chosen}+{c.rejected}, {c.prompt}+{c.responses}, "
        f"{c.chosen}+{c.rejected} (HH) or "
        f"{c.text}; map yours with data.columns.prompt=<column> etc."
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
    get = row.get
    margin = get(c.margin)
    margin = float(margin) if isinstance(margin, int | float) else None
    if margin is not None and not math.isfinite(margin):
        raise ValueError(f"margin {margin} is not a finite number")
    if fmt == "text":
        text = get(c.text)
        if not _nonempty(text):
            raise ValueError("empty text")
        return Conversation(prompt="", responses={"completion": text})
    if fmt == "prompt" or (
        prompt_only and fmt in ("prompt_completion", "preference", "ranked", "unpaired")
    ):
        prompt = get(c.prompt)
        if not _nonempty(prompt):
            raise ValueError("empty or malformed prompt")
        return Conversation(prompt=prompt)
    if fmt == "messages" and prompt_only:
        turns = get(c.messages)
        if not _nonempty(turns) or not any(m["role"] == "user" for m in turns):
            raise ValueError("messages has no user turn")
        last_user = max(i for i, m in enumerate(turns) if m["role"] == "user")
        return Conversation(prompt=list(turns[: last_user + 1]))
    if fmt == "messages":
        turns = get(c.messages)
        if not _nonempty(turns):
            raise ValueError("messages is not a non-empty list of {role, content}")
        if not any(m["role"] == "assistant" for m in turns):
            raise ValueError("no assistant turn")
        return Conversation(prompt=[], turns=list(turns))
    if fmt == "hh":
        chosen, rejected = get(c.chosen), get(c.rejected)
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
        return Conversation(
            prompt=prompt, responses={"chosen": chosen_resp, "rejected": rejected_resp}
        )

    label = parse_label(get(c.label)) if fmt == "unpaired" else None
    if fmt == "unpaired":
        fmt = "prompt_completion"
    prompt = get(c.prompt)
    responses: dict[str, Any] = {}
    if fmt == "ranked":
        ranked = get(c.responses)
        if not isinstance(ranked, list) or len(ranked) < 2:
            raise ValueError("responses must be a list of at least 2 responses, best first")
        responses = {f"rank{k}": r for k, r in enumerate(ranked)}
    for name in (
        ["chosen", "rejected"] if fmt == "preference" else ["completion"] * (fmt != "ranked")
    ):
        col = getattr(c, name)
        if fmt == "prompt_completion" and col not in row:
            col = c.chosen  # SFT on the preferred answers of a preference set
        responses[name] = get(col)
    if not all(_nonempty(r) for r in responses.values()):
        raise ValueError("empty or malformed response")
    if prompt is None or (not _nonempty(prompt) and prompt != ""):
        # A message-list response that carries its own prompt (e.g. UltraFeedback's chosen).
        if not all(_is_messages(r) for r in responses.values()):
            raise ValueError("empty or malformed prompt")
        prompt = None
    history = None  # the messages in front of the answers, when the responses carry them
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


# ---------------------------------------------------------------------------------------------
# rendering and tokenizing


class Renderer:
    """Turns conversations into (text, trainable) segments, then token ids.

    Chat rows use the tokenizer's chat template (or model.chat_template, or a ChatML fallback
    for base models). Plain string rows go through the same template when the tokenizer has
    one of its own, and are concatenated raw otherwise (a base model on pre-formatted text).
    """

    def __init__(self, tokenizer, template: str | None = None, tools: list | None = None):
        from rlhf_cli.models import FALLBACK_CHAT_TEMPLATE

        self.tokenizer = tokenizer
        self.has_own_template = bool(getattr(tokenizer, "chat_template", None))
        self.template = template or tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
        # Tool functions (stage.tools) for a template that describes tools in its prompt.
        self.tools = tools if tools and "tools" in self.template else None

    def chat(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **({"tools": self.tools} if self.tools else {}),
            )
        except TemplateError as err:  # e.g. raise_exception("roles must alternate"): this row
            raise ValueError(f"the chat template refused it: {err}") from err

    def conversation_segments(
        self, turns: list[Message], only_last: bool
    ) -> list[tuple[str, bool]]:
        """Split a rendered chat into (text, is_trained) pieces at assistant turns."""
        last = max(i for i, m in enumerate(turns) if m["role"] == "assistant")
        segments, done = [], ""
        for i, message in enumerate(turns[: last + 1]):
            if message["role"] == "assistant" and (i == last or not only_last):
                head = self.chat(turns[:i], add_generation_prompt=True)
                full = self.chat(turns[: i + 1])
                if not (head.startswith(done) and full.startswith(head)):
                    raise ValueError("the chat template does not render prefixes consistently")
                segments += [(head[len(done) :], False), (full[len(head) :], True)]
                done = full
        return [(text, trained) for text, trained in segments if text]

    def prompt_and_responses(self, conv: Conversation) -> tuple[str, dict[str, str], bool]:
        """(prompt text, {name: response text}, whether the text came from a chat template)."""
        if isinstance(conv.prompt, list):
            head = self.chat(conv.prompt, add_generation_prompt=True)
            out = {}
            for name, resp in conv.responses.items():
                full = self.chat([*conv.prompt, resp])  # type: ignore[list-item]
                if not full.startswith(head):
                    raise ValueError("the chat template does not render prefixes consistently")
                out[name] = full[len(head) :]
            return head, out, True
        if self.has_own_template and conv.prompt:
            as_chat = Conversation(
                prompt=[{"role": "user", "content": conv.prompt}],
                responses={
                    k: {"role": "assistant", "content": v} for k, v in conv.responses.items()
                },
            )
            return self.prompt_and_responses(as_chat)
        return conv.prompt, dict(conv.responses), False  # type: ignore[arg-type]

    def encode(self, text: str, first: bool) -> list[int]:
        # Raw text gets the tokenizer's BOS at its start; chat templates write their own.
        return self.tokenizer(text, add_special_tokens=first)["input_ids"] if text else []

    def encode_response(self, text: str, first: bool = False) -> list[int]:
        ids = self.encode(text, first)
        eos = self.tokenizer.eos_token_id
        # A chat template may end the turn with EOS plus a newline: keep what it writes, but make
        # sure the model sees EOS somewhere at the end of its answer.
        if eos not in ids[-2:]:
            ids.append(eos)
        return ids


class PromptExample(TypedDict):
    prompt_ids: list[int]  # rendered like a training prompt (chat: with the generation prompt)
    prompt_text: str  # the user's words, for reward functions
    columns: NotRequired[dict[str, Any]]  # the row's other columns (an answer), for rewards


def tokenize_prompt(
    conv: Conversation, renderer: Renderer, cfg: DataConfig
) -> tuple[PromptExample, bool]:
    text, _, chat = renderer.prompt_and_responses(conv)
    ids = renderer.encode(text, first=not chat)
    truncated = len(ids) > cfg.max_prompt_length
    if isinstance(conv.prompt, list):
        words = next(m["content"] for m in reversed(conv.prompt) if m["role"] == "user")
    else:
        words = conv.prompt
    return PromptExample(prompt_ids=ids[-cfg.max_prompt_length :], prompt_text=words), truncated


class UnpairedExample(TypedDict):
    prompt_ids: list[int]
    responses_ids: list[list[int]]  # one completion
    margin: None
    desirable: bool


def unpaired_examples(pair: PreferenceExample, label: bool | None) -> list[UnpairedExample]:
    """A tokenized unpaired row (its label) or preference pair (chosen desirable, rejected not)
    as unpaired examples."""
    if label is not None:
        return [UnpairedExample(**pair, desirable=label)]  # type: ignore[typeddict-item]
    prompt, (chosen, rejected) = pair["prompt_ids"], pair["responses_ids"]
    return [
        UnpairedExample(prompt_ids=prompt, responses_ids=[chosen], margin=None, desirable=True),
        UnpairedExample(prompt_ids=prompt, responses_ids=[rejected], margin=None, desirable=False),
    ]


class SFTExample(TypedDict):
    input_ids: list[int]
    labels: list[int]


class PreferenceExample(TypedDict):
    prompt_ids: list[int]
    responses_ids: list[list[int]]  # K >= 2 responses, best first: [chosen, rejected] for pairs
    margin: float | None


def _truncate(prompt: list[int], response: list[int], cfg: DataConfig) -> tuple[list, list, bool]:
    """Prompt truncated from the left to max_prompt_length, then the response from the right."""
    truncated = False
    if len(prompt) > cfg.max_prompt_length:
        prompt, truncated = prompt[-cfg.max_prompt_length :], True
    room = cfg.max_length - len(prompt)
    if len(response) > room:
        response, truncated = response[:room], True
    return prompt, response, truncated


def tokenize_sft(
    conv: Conversation,
    renderer: Renderer,
    cfg: DataConfig,
    *,
    completion_only: bool,
    only_last_turn: bool,
) -> tuple[SFTExample, bool]:
    if conv.turns is not None:
        segments = renderer.conversation_segments(conv.turns, only_last_turn)
        chat = True
    else:
        prompt, responses, chat = renderer.prompt_and_responses(conv)
        # SFT on a preference set (or HH transcripts) trains on the chosen answers.
        response = responses["completion"] if "completion" in responses else responses["chosen"]
        segments = [(prompt, False), (response, True)]
    ids: list[list[int]] = []
    first = not chat  # raw text starts with the tokenizer's BOS; chat templates write their own
    for i, (text, trained) in enumerate(segments):
        is_last_trained = trained and not any(t for _, t in segments[i + 1 :])
        if is_last_trained:
            piece = renderer.encode_response(text, first)
        else:
            piece = renderer.encode(text, first)
        first = first and not text
        ids.append(piece)
    # The prompt is everything before the first trained segment.
    n_prompt = next(i for i, (_, trained) in enumerate(segments) if trained)
    prompt_ids = [t for piece in ids[:n_prompt] for t in piece]
    rest_ids, rest_labels = [], []
    for (_, trained), piece in zip(segments[n_prompt:], ids[n_prompt:]):
        rest_ids += piece
        rest_labels += piece if (trained or not completion_only) else [IGNORE_INDEX] * len(piece)
    prompt_ids, rest_ids, truncated = _truncate(prompt_ids, rest_ids, cfg)
    rest_labels = rest_labels[: len(rest_ids)]
    prompt_labels = prompt_ids if not completion_only else [IGNORE_INDEX] * len(prompt_ids)
    labels = prompt_labels + rest_labels
    if sum(label != IGNORE_INDEX for label in labels) < 1:
        raise ValueError("no trainable token left")
    return SFTExample(input_ids=prompt_ids + rest_ids, labels=labels), truncated


def tokenize_preference(
    conv: Conversation, renderer: Renderer, cfg: DataConfig
) -> tuple[PreferenceExample, bool]:
    prompt, responses, chat = renderer.prompt_and_responses(conv)
    prompt_ids = renderer.encode(prompt, first=not chat)
    first = not chat and not prompt_ids  # no prompt: the response opens the raw text
    out, any_truncated = [], False
    for text in responses.values():  # in rank order: chosen, rejected (or rank0, rank1, ...)
        _, ids, truncated = _truncate(prompt_ids, renderer.encode_response(text, first), cfg)
        out.append(ids)
        any_truncated = any_truncated or truncated
    prompt_ids = prompt_ids[-cfg.max_prompt_length :]
    return PreferenceExample(
        prompt_ids=prompt_ids, responses_ids=out, margin=conv.margin
    ), any_truncated


# ---------------------------------------------------------------------------------------------
# building a dataset


@dataclass
class DataReport:
    source: str
    fmt: str
    rows: int
    kept: int
    truncated: int
    dropped: dict[str, int]
    bad_lines: list[int]

    def line(self) -> str:
        dropped = sum(self.dropped.values())
        text = (
            f"{self.source}: {self.rows} rows ({self.fmt}), {self.kept} kept, "
            f"{self.truncated} truncated, {dropped} dropped"
        )
        if dropped:
            text += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) + ")"
        if self.bad_lines:
            shown = ", ".join(map(str, self.bad_lines[:5])) + (
                ", ..." if len(self.bad_lines) > 5 else ""
            )
            text += f"; malformed JSON on line(s) {shown}"
        return text


def build_examples(
    rows: list[dict],
    source: str,
    cfg: DataConfig,
    renderer: Renderer,
    kind: str,
    stats: Counter,
    *,
    completion_only: bool = True,
    only_last_turn: bool = False,
):
    """Tokenized examples for `kind` ('sft' or 'preference') and a report of what happened."""
    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    if not rows:
        raise DataError(f"{source}: no rows to train on")
    fmt = detect_format(columns, cfg, rows[0])
    if kind == "sft" and fmt == "prompt":
        fmt = "prompt_completion"  # SFT needs a response: name the missing column below
    if kind == "prompt" and fmt in ("text", "hh"):
        raise DataError(
            f"{source}: this stage samples responses to prompts, but the data ({fmt}) has no "
            f"prompt column; columns: {', '.join(sorted(columns))}. Map one with "
            "data.columns.prompt=<column>"
        )
    if kind == "unpaired" and fmt not in ("unpaired", "preference", "hh"):
        raise DataError(
            f"{source}: this stage needs unpaired feedback (prompt/completion/label) or "
            f"preference pairs (prompt/chosen/rejected, HH) but the data is {fmt}; columns: "
            f"{', '.join(sorted(columns))}"
        )
    if kind == "preference" and fmt not in ("preference", "ranked", "hh"):
        raise DataError(
            f"{source}: this stage needs preference pairs (prompt/chosen/rejected, ranked "
            f"prompt/responses, or HH chosen/rejected) but the data is {fmt}; columns: "
            f"{', '.join(sorted(columns))}"
        )
    check_columns(columns, fmt, cfg, source)
    c = cfg.columns
    examples, truncated = [], 0
    for index, row in enumerate(rows):
        try:
            conv = normalise(row, fmt, cfg, prompt_only=kind == "prompt")
            if kind == "prompt":
                ex, cut = tokenize_prompt(conv, renderer, cfg)
                # Every other column reaches the reward functions (an answer to check against).
                other = {k: v for k, v in row.items() if k not in (c.prompt, c.messages)}
                if other:
                    ex["columns"] = other
            elif kind == "preference":
                ex, cut = tokenize_preference(conv, renderer, cfg)
            elif kind == "unpaired":
                pair, cut = tokenize_preference(conv, renderer, cfg)
                examples.extend(unpaired_examples(pair, conv.label))
                truncated += cut
                continue
            else:
                ex, cut = tokenize_sft(
                    conv,
                    renderer,
                    cfg,
                    completion_only=completion_only,
                    only_last_turn=only_last_turn,
                )
        except (ValueError, TypeError, KeyError) as err:
            if cfg.on_bad_row == "error":
                raise DataError(
                    f"{source}: row {index + 1} is unusable ({err}); fix it or set "
                    "data.on_bad_row=drop"
                ) from err
            stats[f"dropped: {err}"] += 1
            continue
        truncated += cut
        examples.append(ex)
    report = DataReport(
        source=source,
        fmt=fmt,
        rows=len(rows) + stats["_load_dropped"],
        kept=len(examples),
        truncated=truncated,
        dropped={k[len("dropped: ") :]: v for k, v in stats.items() if k.startswith("dropped: ")},
        bad_lines=list(stats.get("_bad_lines", [])),  # type: ignore[arg-type]
    )
    if not examples:
        raise DataError(f"{report.line()}: nothing left to train on")
    return examples, report


def load_datasets(
    cfg: DataConfig,
    tokenizer,
    kind: str,
    seed: int,
    *,
    completion_only: bool = True,
    only_last_turn: bool = False,
    tools: list | None = None,
):
    """(train examples, eval examples, reports) for a stage; `tools` (functions) are described
    in the prompts where the chat template has a place for them."""
    renderer = Renderer(tokenizer, tools=tools)
    kw = dict(completion_only=completion_only, only_last_turn=only_last_turn)
    stats: Counter = Counter()
    rows = load_rows(
        cfg.path, name=cfg.name, split=cfg.split, on_bad_row=cfg.on_bad_row, stats=stats
    )
    if cfg.max_samples:
        rows = rows[: cfg.max_samples]
    train, report = build_examples(rows, cfg.path, cfg, renderer, kind, stats, **kw)
    reports = [report]
    evals: list = []
    if cfg.eval_path or cfg.eval_split:
        eval_stats: Counter = Counter()
        source = cfg.eval_path or cfg.path
        eval_rows = load_rows(
            source,
            name=cfg.name,
            split=cfg.eval_split or "train",
            on_bad_row=cfg.on_bad_row,
            stats=eval_stats,
        )
        evals, eval_report = build_examples(
            eval_rows, source, cfg, renderer, kind, eval_stats, **kw
        )
        reports.append(eval_report)
    elif cfg.eval_size > 0:
        n_eval = (
            int(cfg.eval_size) if cfg.eval_size >= 1 else max(1, round(cfg.eval_size * len(train)))
        )
        if n_eval >= len(train):
            raise DataError(
                f"data.eval_size={cfg.eval_size} leaves no training rows out of {len(train)}"
            )
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        held = set(order[:n_eval])
        evals = [ex for i, ex in enumerate(train) if i in held]
        train = [ex for i, ex in enumerate(train) if i not in held]
    return train, evals, reports


# ---------------------------------------------------------------------------------------------
# batches


class SFTBatch(TypedDict):
    input_ids: torch.Tensor  # (B, T) long, right-padded to the longest row of the batch
    attention_mask: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long, IGNORE_INDEX on prompt and padding


def pad(seqs: list[list[int]], value: int, left: bool = False, multiple: int = 1) -> torch.Tensor:
    """(len(seqs), width) padded on the right, or on the left with `left`: width = the longest
    row rounded up to a multiple of `multiple`."""
    width = -(-max(len(s) for s in seqs) // multiple) * multiple
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        start = width - len(s) if left else 0
        out[i, start : start + len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins whose lengths sum to at most `capacity`: longest
    first, each into the bin it fills the most (the one with the least room that still fits),
    else a new bin; an item longer than `capacity` gets a bin of its own. Ties go by index, so
    the layout is a function of the lengths alone. Each bin lists its items in placing order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
            bins[b].append(i)
            room[b] -= lengths[i]
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def pack_bins(lengths: list[int], limit: int, multiple: int = 1) -> list[list[int]]:
    """The rows to pack items of `lengths` into, rows of at most `limit` tokens (an item
    longer than that: a row of its own): best_fit_decreasing at the row length, among those
    that make 1, 2, ... n rows of the total, that leaves the fewest positions (rows x the
    longest row rounded up to `multiple`); ties: the shorter rows. A batch is as wide as its
    longest row, so a few examples packed at `limit` would pad their one sparse row to it;
    at n rows the length is the longest item's, so packing never pads more than padding does."""
    longest, total = max(lengths), sum(lengths)
    best: tuple[tuple[int, int], list[list[int]]] | None = None
    for r in range(1, len(lengths) + 1):
        cap = max(longest, min(-(-total // r), limit))
        bins = best_fit_decreasing(lengths, cap)
        width = -(-max(sum(lengths[i] for i in b) for b in bins) // multiple) * multiple
        key = (len(bins) * width, width)
        if best is None or key < best[0]:
            best = (key, bins)
    assert best is not None
    return best[1]


class PackedRows(TypedDict):
    """Sequences packed several to a row: no attention mask (the model finds each sequence's
    bounds in the position ids, which restart at 0 where a sequence starts: a block-diagonal
    causal mask, or flash-attention's variable-length kernel)."""

    input_ids: torch.Tensor  # (R, T) sequences end to end, then padding
    labels: torch.Tensor  # (R, T) IGNORE_INDEX on each sequence's first token and padding
    position_ids: torch.Tensor  # (R, T) 0, 1, ... within each sequence (padding: its own run)
    sequence: torch.Tensor  # (R, T) the sequence (logical row) of each position; -1 on padding
    last: torch.Tensor  # (N,) the flat position (r * T + t) of each sequence's last token


def pack_rows(
    seqs: list[list[int]],
    labels: list[list[int]],
    rows: list[list[int]],
    pad_id: int,
    multiple: int = 1,
) -> PackedRows:
    """Sequences (logical rows) placed end to end into physical rows: `rows[r]` lists the
    sequences of row r. The width is the longest row rounded up to `multiple`. Each sequence's
    first label is dropped (IGNORE_INDEX): unpacked, nothing precedes it, so it is never
    predicted; packed, the previous sequence's last token would predict it."""
    width = -(-max(sum(len(seqs[j]) for j in row) for row in rows) // multiple) * multiple
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labs = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    sequence = torch.full((len(rows), width), -1, dtype=torch.long)
    last = torch.zeros(len(seqs), dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for j in row:
            n = len(seqs[j])
            ids[r, t : t + n] = torch.tensor(seqs[j], dtype=torch.long)
            labs[r, t + 1 : t + n] = torch.tensor(labels[j][1:], dtype=torch.long)
            positions[r, t : t + n] = torch.arange(n)
            sequence[r, t : t + n] = j
            last[j] = r * width + t + n - 1
            t += n
        positions[r, t:] = torch.arange(width - t)
    return PackedRows(
        input_ids=ids, labels=labs, position_ids=positions, sequence=sequence, last=last
    )


def is_packed(batch: dict) -> bool:
    return "sequence" in batch


def example_length(ex: dict) -> int:
    """The tokens an example puts through the model: its sequence (sft), its prompt with each
    response (preference, unpaired) or its prompt (online stages)."""
    if "input_ids" in ex:
        return len(ex["input_ids"])
    responses = ex.get("responses_ids") or [[]]
    return sum(len(ex["prompt_ids"]) + len(r) for r in responses)


def row_count(batch: dict) -> int:
    """The rows (responses) of a preference batch, packed or not."""
    return int((batch["index"] >= 0).sum())


def real_tokens(batch: dict) -> int:
    """Tokens of a batch that are not padding, packed or not."""
    if is_packed(batch):
        return int((batch["sequence"] >= 0).sum())
    return int(batch["attention_mask"].sum())


def collate_sft(
    examples: list[SFTExample],
    pad_id: int,
    multiple: int = 1,
    pack: int | None = None,
    slices: bool = False,
) -> SFTBatch | PackedRows:
    """Right-padded to the longest row rounded up to `multiple` (train.pad_to_multiple_of).
    With `pack` (train.packing: data.max_length), the examples are packed into rows of at most
    `pack` tokens (pack_bins; pack_rows), run as one forward (models.packed_states) or, with
    `slices`, one forward per example."""
    ids = [ex["input_ids"] for ex in examples]
    if pack:
        rows = pack_bins([len(s) for s in ids], pack, multiple)
        packed = pack_rows(ids, [ex["labels"] for ex in examples], rows, pad_id, multiple)
        return {**packed, "slices": slices}  # type: ignore[typeddict-item]
    return SFTBatch(
        input_ids=pad(ids, pad_id, multiple=multiple),
        attention_mask=pad([[1] * len(s) for s in ids], 0, multiple=multiple),
        labels=pad([ex["labels"] for ex in examples], IGNORE_INDEX, multiple=multiple),
    )


class PreferenceBatch(TypedDict):
    """B examples with up to K responses each, as N = sum(K_b) concatenated rows, so chosen and
    rejected (and any further ranks) go through ONE forward."""

    input_ids: torch.Tensor  # (N, T) prompt + response, right-padded
    attention_mask: torch.Tensor  # (N, T)
    labels: torch.Tensor  # (N, T): response tokens; IGNORE_INDEX on prompt and padding
    index: torch.Tensor  # (B, K) row of each (example, rank) in the N rows; -1 where absent
    margin: torch.Tensor  # (B,) per-pair margin, NaN where the data has none
    # With shared_prompt: each prompt once, for models.shared_prompt_hidden.
    prompt_ids: NotRequired[torch.Tensor]  # (B, P) left-padded
    prompt_mask: NotRequired[torch.Tensor]  # (B, P)
    response_ids: NotRequired[torch.Tensor]  # (N, R) right-padded, rows as in input_ids
    response_mask: NotRequired[torch.Tensor]  # (N, R)
    row_example: NotRequired[torch.Tensor]  # (N,) the example (prompt) of each row


def ends_at_eos(response: list[int], eos_id: int) -> list[int]:
    """A response as a reward model reads it: up to and including its last EOS, or with EOS
    appended when it has none (cut off by truncation or by max_new_tokens). A chat template
    may write text after EOS (ChatML's newline after <|im_end|>); generation stops at the EOS,
    so training, `rlhf score`, online scoring and `rlhf eval` all score the EOS position."""
    for i in range(len(response) - 1, -1, -1):
        if response[i] == eos_id:
            return response[: i + 1]
    return [*response, eos_id]


def collate_preference(
    examples: list[PreferenceExample],
    pad_id: int,
    eos_id: int | None = None,
    shared_prompt: bool = False,
    multiple: int = 1,
    pack: int | None = None,
    slices: bool = False,
) -> PreferenceBatch:
    """Rows ordered rank-major (all rank-0 responses, then rank 1, ...). With `eos_id`, each
    row ends at its EOS (ends_at_eos: reward models score that position).
    With `shared_prompt` (and a prompt in every example), also the prompts (once each) and the
    responses apart. Every padded
    width is rounded up to a multiple of `multiple`.
    With `pack` (train.packing: data.max_length), the rows are packed instead (pack_rows): an
    example's responses stay together in one row (a preference pair is one unit), examples
    placed by their summed lengths into rows of up to `pack` tokens (pack_bins; an example
    longer than that gets a row of its own); the shared-prompt layout is not built; `slices`:
    as collate_sft's."""
    k_max = max(len(ex["responses_ids"]) for ex in examples)
    index = torch.full((len(examples), k_max), -1, dtype=torch.long)
    ids, labels, responses, row_example = [], [], [], []
    for k in range(k_max):
        for b, ex in enumerate(examples):
            if k >= len(ex["responses_ids"]):
                continue
            response = list(ex["responses_ids"][k])
            if eos_id is not None:
                response = ends_at_eos(response, eos_id)
            index[b, k] = len(ids)
            ids.append(ex["prompt_ids"] + response)
            labels.append([IGNORE_INDEX] * len(ex["prompt_ids"]) + response)
            responses.append(response)
            row_example.append(b)
    margins = [ex.get("margin") for ex in examples]
    margin = torch.tensor([float("nan") if m is None else m for m in margins])
    if pack:
        sizes = [
            sum(len(ids[j]) for j in index[b].tolist() if j >= 0) for b in range(len(examples))
        ]
        rows = [
            [j for b in group for j in index[b].tolist() if j >= 0]
            for group in pack_bins(sizes, pack, multiple)
        ]
        packed = pack_rows(ids, labels, rows, pad_id, multiple)
        return {**packed, "index": index, "margin": margin, "slices": slices}  # type: ignore[typeddict-item]
    batch = PreferenceBatch(
        input_ids=pad(ids, pad_id, multiple=multiple),
        attention_mask=pad([[1] * len(s) for s in ids], 0, multiple=multiple),
        labels=pad(labels, IGNORE_INDEX, multiple=multiple),
        index=index,
        margin=margin,
    )
    # A row without a prompt has no prompt position to predict its first response token from:
    # such a batch takes the plain layout (the same numbers, one forward per row).
    if shared_prompt and all(ex["prompt_ids"] for ex in examples):
        prompts = [ex["prompt_ids"] for ex in examples]
        batch["prompt_ids"] = pad(prompts, pad_id, left=True, multiple=multiple)
        batch["prompt_mask"] = pad([[1] * len(p) for p in prompts], 0, left=True, multiple=multiple)
        batch["response_ids"] = pad(responses, pad_id, multiple=multiple)
        batch["response_mask"] = pad([[1] * len(r) for r in responses], 0, multiple=multiple)
        batch["row_example"] = torch.tensor(row_example, dtype=torch.long)
    return batch
