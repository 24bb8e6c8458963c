"""Examples: conversations rendered by the chat template (or the fallback one), tokenized,
masked and truncated; `load_datasets` makes a stage's train and eval examples."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, NotRequired, TypedDict

from rlhf_cli.config import DataConfig
from rlhf_cli.core.errors import DataError
from rlhf_cli.data.rows import (
    Conversation,
    Message,
    check_columns,
    detect_format,
    load_rows,
    normalise,
)
from rlhf_cli.losses import IGNORE_INDEX

# ---------------------------------------------------------------------------------------------
# rendering and tokenizing


class Renderer:
    """Turns conversations into (text, trainable) segments, then token ids.

    Chat rows use the tokenizer's chat template (or model.chat_template, or a ChatML fallback
    for base models). Plain string rows go through the same template when the tokenizer has
    one of its own, and are concatenated raw otherwise (a base model on pre-formatted text).
    """

    def __init__(self, tokenizer, template: str | None = None, tools: list | None = None):

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
    if kind != "prompt" and fmt == "seed":
        raise DataError(
            f"{source}: seed rows only start an environment's conversations (an online stage "
            "with stage.env); this stage trains on text"
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
        cfg.path,
        name=cfg.name,
        split=cfg.split,
        on_bad_row=cfg.on_bad_row,
        stats=stats,
        generated=cfg.reasoning_gym,
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
            # generated eval rows: the next seed's, not the training rows again
            generated=replace(cfg.reasoning_gym, seed=cfg.reasoning_gym.seed + 1),
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


# Used for conversations when the tokenizer has no template of its own (a base model):
# ChatML written as plain text, so no new embeddings are needed.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
