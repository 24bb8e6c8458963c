"""The data pipeline with the tiny tokenizer: file formats, row formats, prompt masking,
truncation, column mapping, bad rows, eval hold-out, builtin data and collation."""

from __future__ import annotations

import copy
import csv
import json
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest
import torch
from conftest import compose

from rlhf_cli.config import ColumnsConfig, DataConfig, ModelConfig
from rlhf_cli.core.errors import DataError
from rlhf_cli.data.batches import collate_preference, collate_sft
from rlhf_cli.data.examples import Renderer, build_examples, load_datasets
from rlhf_cli.data.rows import builtin_path, load_rows, split_hh
from rlhf_cli.losses import IGNORE_INDEX

FILE_FORMATS = ["jsonl", "json", "csv", "parquet"]


@pytest.fixture(scope="module")
def tok():
    from rlhf_cli.model.load import load_tokenizer

    return load_tokenizer(ModelConfig())


def write(tmp_path: Path, fmt: str, rows: list[dict], name: str = "data") -> Path:
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=2))
    elif fmt == "csv":
        columns = sorted({k for r in rows for k in r})
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "parquet":
        import datasets

        datasets.disable_progress_bars()
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        raise AssertionError(fmt)
    return path


def load(path, tok, kind="sft", seed=0, **cfg):
    """(train, eval, report) through the public entry point."""
    only_last = cfg.pop("only_last_turn", False)
    completion_only = cfg.pop("completion_only", True)
    train, evals, reports = load_datasets(
        DataConfig(path=str(path), **cfg),
        tok,
        kind,
        seed,
        completion_only=completion_only,
        only_last_turn=only_last,
    )
    return train, evals, reports[0]


def build(rows, tok, kind="sft", **cfg):
    """build_examples on in-memory rows: (examples, report)."""
    only_last = cfg.pop("only_last_turn", False)
    return build_examples(
        rows,
        "rows",
        DataConfig(**cfg),
        Renderer(tok),
        kind,
        Counter(),
        only_last_turn=only_last,
    )


def labelled(tok, ex) -> str:
    """The text of the tokens that carry a label."""
    return tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX])


def masked(tok, ex) -> str:
    return tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab == IGNORE_INDEX])


def assert_consistent_report(report, n_rows: int, kept: int):
    assert report.rows == n_rows
    assert report.kept == kept
    assert report.rows == report.kept + sum(report.dropped.values())


PC_ROWS = [
    {"prompt": "What is the capital of France?", "completion": "Paris is the capital."},
    {"prompt": "Name a primary color.", "completion": "Red is a primary color."},
    {"prompt": "How many legs does a spider have?", "completion": "A spider has eight legs."},
]


# --------------------------------------------------------------------------- file formats


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_prompt_completion_from_each_file_format(tmp_path, tok, fmt):
    path = write(tmp_path, fmt, PC_ROWS)
    train, evals, report = load(path, tok)
    assert evals == []
    assert report.fmt == "prompt_completion"
    assert_consistent_report(report, 3, 3)
    for ex, row in zip(train, PC_ROWS):
        assert labelled(tok, ex).startswith(row["completion"])
        assert row["prompt"] in masked(tok, ex)
        assert row["completion"] not in masked(tok, ex)


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_prompt_chosen_is_used_for_sft(tmp_path, tok, fmt):
    rows = [{"prompt": r["prompt"], "chosen": r["completion"]} for r in PC_ROWS]
    train, _, report = load(write(tmp_path, fmt, rows), tok)
    assert report.fmt == "prompt_completion"
    assert_consistent_report(report, 3, 3)
    for ex, row in zip(train, rows):
        assert labelled(tok, ex).startswith(row["chosen"])
        assert row["prompt"] in masked(tok, ex)


def test_json_object_holding_a_list_of_rows(tmp_path, tok):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": PC_ROWS}, indent=1))
    train, _, report = load(path, tok)
    assert report.kept == 3


CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a fruit please."},
    {"role": "assistant", "content": "Apple is a fruit."},
    {"role": "user", "content": "Now name a color."},
    {"role": "assistant", "content": "Blue is a color."},
]
USER_TEXT = ["You are terse.", "Name a fruit please.", "Now name a color."]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_messages_label_exactly_the_assistant_turns(tmp_path, tok, fmt):
    path = write(tmp_path, fmt, [{"messages": CHAT}])
    train, _, report = load(path, tok)
    assert report.fmt == "messages"
    (ex,) = train
    text = labelled(tok, ex)
    assert "Apple is a fruit." in text and "Blue is a color." in text
    for user in USER_TEXT:
        assert user not in text
        assert user in masked(tok, ex)
    # only assistant content (and the end-of-turn tokens) is trained
    rest = text.replace("Apple is a fruit.", "").replace("Blue is a color.", "")
    assert rest.replace(tok.eos_token, "").strip() == ""
    assert ex["input_ids"][-1] == tok.eos_token_id


def test_messages_only_last_turn(tmp_path, tok):
    path = write(tmp_path, "jsonl", [{"messages": CHAT}])
    (ex,), _, _ = load(path, tok, only_last_turn=True)
    text = labelled(tok, ex)
    assert "Blue is a color." in text
    assert "Apple is a fruit." not in text
    assert "Apple is a fruit." in masked(tok, ex)
    assert text.replace("Blue is a color.", "").replace(tok.eos_token, "").strip() == ""


def test_messages_without_assistant_turn_is_dropped(tok):
    rows = [{"messages": CHAT}, {"messages": CHAT[:2]}]
    examples, report = build(rows, tok)
    assert len(examples) == 1
    assert_consistent_report(report, 2, 1)


def test_completion_only_false_trains_on_everything(tok):
    (ex,), _ = build_examples(
        PC_ROWS[:1], "rows", DataConfig(), Renderer(tok), "sft", Counter(), completion_only=False
    )
    assert ex["labels"] == ex["input_ids"]


# --------------------------------------------------------------------------- preference


PREF_STRINGS = [
    {"prompt": "Say hello.", "chosen": "Hello there, friend.", "rejected": "Go away now."},
    {"prompt": "Add 2 and 3.", "chosen": "2 + 3 = 5.", "rejected": "It is 7."},
]


def _decoded(tok, ex) -> dict[str, str]:
    chosen, rejected = ex["responses_ids"]
    return {
        "prompt": tok.decode(ex["prompt_ids"]),
        "chosen": tok.decode(chosen),
        "rejected": tok.decode(rejected),
    }


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_preference_strings(tmp_path, tok, fmt):
    train, _, report = load(write(tmp_path, fmt, PREF_STRINGS), tok, kind="preference")
    assert report.fmt == "preference"
    assert_consistent_report(report, 2, 2)
    for ex, row in zip(train, PREF_STRINGS):
        d = _decoded(tok, ex)
        assert row["prompt"] in d["prompt"]
        assert row["chosen"] not in d["prompt"] and row["rejected"] not in d["prompt"]
        assert (
            d["chosen"].startswith(row["chosen"]) and ex["responses_ids"][0][-1] == tok.eos_token_id
        )
        assert d["rejected"].startswith(row["rejected"])
        assert ex["responses_ids"][1][-1] == tok.eos_token_id
        assert row["prompt"] not in d["chosen"]


def _msg(role, content):
    return {"role": role, "content": content}


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_preference_message_lists(tmp_path, tok, fmt):
    rows = [
        {
            "prompt": [_msg("system", "Be kind."), _msg("user", "Say hello.")],
            "chosen": [_msg("assistant", "Hello there, friend.")],
            "rejected": [_msg("assistant", "Go away now.")],
        }
    ]
    (ex,), _, report = load(write(tmp_path, fmt, rows), tok, kind="preference")
    assert report.fmt == "preference"
    d = _decoded(tok, ex)
    assert "Be kind." in d["prompt"] and "Say hello." in d["prompt"]
    assert d["chosen"].startswith("Hello there, friend.")
    assert d["rejected"].startswith("Go away now.")


@pytest.mark.parametrize("prompt", ["Say hello.", None], ids=["prompt-string", "prompt-null"])
def test_preference_lists_that_repeat_the_prompt(tmp_path, tok, prompt):
    """UltraFeedback style: chosen/rejected are whole chats that start with the prompt."""
    rows = [
        {
            "prompt": prompt,
            "chosen": [_msg("user", "Say hello."), _msg("assistant", "Hello there, friend.")],
            "rejected": [_msg("user", "Say hello."), _msg("assistant", "Go away now.")],
        }
    ]
    (ex,), _, report = load(write(tmp_path, "jsonl", rows), tok, kind="preference")
    assert_consistent_report(report, 1, 1)
    d = _decoded(tok, ex)
    assert d["prompt"].count("Say hello.") == 1
    assert "Hello there" not in d["prompt"]
    assert d["chosen"].startswith("Hello there, friend.") and "Say hello." not in d["chosen"]
    assert d["rejected"].startswith("Go away now.") and "Say hello." not in d["rejected"]


def test_preference_margin_is_carried(tok):
    rows = [dict(PREF_STRINGS[0], margin=2.5), PREF_STRINGS[1]]
    examples, _ = build(rows, tok, kind="preference")
    assert [ex["margin"] for ex in examples] == [2.5, None]


def test_sft_data_for_a_preference_stage_is_refused(tok):
    with pytest.raises(DataError, match="preference pairs"):
        build(PC_ROWS, tok, kind="preference")


# --------------------------------------------------------------------------- HH transcripts


HH_PREFIX = "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: And 3+3?\n\nAssistant:"


def test_split_hh_at_the_last_assistant_turn():
    prompt, answer = split_hh(HH_PREFIX + " It is 6.")
    assert prompt == HH_PREFIX
    assert answer == " It is 6."
    with pytest.raises(ValueError):
        split_hh("\n\nHuman: no answer here")


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_hh_transcripts_multi_turn(tmp_path, tok, fmt):
    rows = [
        {"chosen": HH_PREFIX + " It is 6.", "rejected": HH_PREFIX + " It is 9."},
        {
            "chosen": "\n\nHuman: Hi?\n\nAssistant: Hello, how can I help?",
            "rejected": "\n\nHuman: Hi?\n\nAssistant: What.",
        },
    ]
    train, _, report = load(write(tmp_path, fmt, rows), tok, kind="preference")
    assert report.fmt == "hh"
    assert_consistent_report(report, 2, 2)
    d = _decoded(tok, train[0])
    # the prompt holds every earlier turn, up to the last "Assistant:"
    assert HH_PREFIX in d["prompt"]
    assert "It is 6" not in d["prompt"] and "It is 9" not in d["prompt"]
    assert d["chosen"].strip().startswith("It is 6.") and "Human" not in d["chosen"]
    assert d["rejected"].strip().startswith("It is 9.") and "Human" not in d["rejected"]


def test_hh_pairs_with_different_histories_are_dropped(tok):
    rows = [
        {"chosen": HH_PREFIX + " It is 6.", "rejected": HH_PREFIX + " It is 9."},
        {"chosen": "\n\nHuman: A?\n\nAssistant: B.", "rejected": "\n\nHuman: C?\n\nAssistant: D."},
    ]
    examples, report = build(rows, tok, kind="preference")
    assert len(examples) == 1
    assert_consistent_report(report, 2, 1)
    with pytest.raises(DataError, match="row 2"):
        build(rows, tok, kind="preference", on_bad_row="error")


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_text_trains_on_the_whole_text(tmp_path, tok, fmt):
    rows = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "Hello world."}]
    train, _, report = load(write(tmp_path, fmt, rows), tok)
    assert report.fmt == "text"
    assert_consistent_report(report, 2, 2)
    for ex, row in zip(train, rows):
        assert ex["labels"] == ex["input_ids"]
        assert row["text"] in tok.decode(ex["input_ids"])
        assert ex["input_ids"][-1] == tok.eos_token_id


def test_text_starts_with_bos(tok):
    (ex,), _ = build([{"text": "Hello world."}], tok)
    assert ex["input_ids"][0] == tok.bos_token_id


# --------------------------------------------------------------------------- prompt masking


def test_sft_prompt_masking(tok):
    row = PC_ROWS[0]
    (ex,), _ = build([row], tok)
    # the prompt as the chat template renders it, tokenized independently
    prompt_text = tok.apply_chat_template(
        [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels) > n
    assert ids[:n] == prompt_ids
    assert labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == ids[n:]
    assert IGNORE_INDEX not in labels[n:]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n:], skip_special_tokens=True) == row["completion"]


def test_raw_prompt_completion_without_chat_template(tok):
    """A base tokenizer without a template: raw concatenation, BOS first, EOS last."""
    base = copy.deepcopy(tok)
    base.chat_template = None
    row = PC_ROWS[0]
    renderer = Renderer(base)
    (ex,), _ = build_examples([row], "rows", DataConfig(), renderer, "sft", Counter())
    prompt_ids = base(row["prompt"])["input_ids"]
    n = len(prompt_ids)
    assert ex["input_ids"][0] == base.bos_token_id
    assert ex["input_ids"][:n] == prompt_ids
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    assert ex["labels"][n:] == ex["input_ids"][n:]
    assert ex["input_ids"][-1] == base.eos_token_id
    assert base.decode(ex["input_ids"][n:], skip_special_tokens=True) == row["completion"]


# --------------------------------------------------------------------------- truncation


def test_truncation_keeps_prompt_end_and_response_start(tok):
    long_prompt = " ".join(f"p{i}" for i in range(60)) + " END OF PROMPT"
    long_answer = "START OF ANSWER " + " ".join(f"a{i}" for i in range(80))
    rows = [{"prompt": long_prompt, "completion": long_answer}, PC_ROWS[1]]
    cfg = dict(max_length=48, max_prompt_length=20)
    examples, report = build(rows, tok, **cfg)
    ex = examples[0]
    n_prompt = ex["labels"].index(next(lab for lab in ex["labels"] if lab != IGNORE_INDEX))
    assert n_prompt == 20  # prompt cut to max_prompt_length from the left
    assert len(ex["input_ids"]) == 48  # response cut to max_length - len(prompt)
    prompt_text = tok.decode(ex["input_ids"][:n_prompt])
    assert "END OF PROMPT" in prompt_text and "p0 " not in prompt_text
    response_text = tok.decode(ex["input_ids"][n_prompt:])
    assert response_text.startswith("START OF ANSWER")
    assert "a79" not in response_text
    assert report.truncated == 1  # the short row is untouched
    assert "1 truncated" in report.line()
    assert len(examples[1]["input_ids"]) < 48


def test_preference_truncation(tok):
    long_prompt = " ".join(f"p{i}" for i in range(60)) + " END"
    row = {"prompt": long_prompt, "chosen": "yes " * 50, "rejected": "no"}
    (ex,), report = build([row], tok, kind="preference", max_length=40, max_prompt_length=16)
    assert len(ex["prompt_ids"]) == 16
    assert tok.decode(ex["prompt_ids"]).rstrip().endswith("<|assistant|>")
    assert len(ex["prompt_ids"]) + len(ex["responses_ids"][0]) == 40
    assert ex["responses_ids"][1][-1] == tok.eos_token_id
    assert report.truncated == 1


# --------------------------------------------------------------------------- column mapping


def test_column_mapping(tmp_path, tok):
    rows = [{"question": r["prompt"], "answer": r["completion"]} for r in PC_ROWS]
    path = write(tmp_path, "jsonl", rows)
    cfg = compose(
        f"data.path={path}",
        "data.columns.prompt=question",
        "data.columns.completion=answer",
        "data.eval_size=0",
    ).data
    train, _, reports = load_datasets(cfg, tok, "sft", 0)
    assert reports[0].kept == 3
    for ex, row in zip(train, rows):
        assert labelled(tok, ex).startswith(row["answer"])
        assert row["question"] in masked(tok, ex)


def test_column_mapping_for_preference_and_messages(tok):
    pref = [{"q": "Say hello.", "good": "Hello.", "bad": "No."}]
    cols = ColumnsConfig(prompt="q", chosen="good", rejected="bad")
    (ex,), report = build(pref, tok, kind="preference", columns=cols)
    assert report.fmt == "preference"
    assert tok.decode(ex["responses_ids"][0]).startswith("Hello.")
    (ex,), report = build([{"conv": CHAT}], tok, columns=ColumnsConfig(messages="conv"))
    assert report.fmt == "messages"
    assert "Blue is a color." in labelled(tok, ex)


def test_missing_column_names_it_and_lists_the_columns(tmp_path, tok):
    rows = [{"question": "q?", "answer": "a."}]
    path = write(tmp_path, "jsonl", rows)
    cols = ColumnsConfig(prompt="question", completion="response")
    with pytest.raises(DataError) as exc:
        load(path, tok, format="prompt_completion", columns=cols)
    msg = str(exc.value)
    assert "'response'" in msg
    assert "answer, question" in msg
    assert "data.columns.completion" in msg


def test_missing_mapped_column_named_with_auto_format(tmp_path, tok):
    path = write(tmp_path, "jsonl", [{"question": "q?", "answer": "a."}])
    cols = ColumnsConfig(prompt="question", completion="response")
    with pytest.raises(DataError) as exc:
        load(path, tok, columns=cols)
    msg = str(exc.value)
    assert "answer, question" in msg  # passes today
    assert "response" in msg


# --------------------------------------------------------------------------- bad rows


BAD_COMPLETIONS = {"empty": "", "blank": "   ", "null": None, "number": 42, "list": ["a", "b"]}


@pytest.mark.parametrize("bad", BAD_COMPLETIONS.values(), ids=BAD_COMPLETIONS.keys())
def test_bad_row_dropped_and_counted(tmp_path, tok, bad):
    rows = [PC_ROWS[0], {"prompt": "Anything?", "completion": bad}, PC_ROWS[1]]
    path = write(tmp_path, "jsonl", rows)
    train, _, report = load(path, tok, on_bad_row="drop")
    assert len(train) == 2
    assert_consistent_report(report, 3, 2)
    assert sum(report.dropped.values()) == 1
    assert "1 dropped" in report.line()


@pytest.mark.parametrize("bad", BAD_COMPLETIONS.values(), ids=BAD_COMPLETIONS.keys())
def test_bad_row_errors_naming_the_row(tmp_path, tok, bad):
    rows = [PC_ROWS[0], PC_ROWS[1], {"prompt": "Anything?", "completion": bad}]
    path = write(tmp_path, "jsonl", rows)
    with pytest.raises(DataError, match=r"row 3\b"):
        load(path, tok, on_bad_row="error")


def test_bad_prompt_is_dropped(tok):
    rows = [PC_ROWS[0], {"prompt": 7, "completion": "x"}, {"completion": "no prompt"}]
    examples, report = build(rows, tok)
    assert len(examples) == 1
    assert_consistent_report(report, 3, 1)


def test_csv_empty_cell_is_a_bad_row(tmp_path, tok):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nWhat is 1+1?,Two.\nAnd 2+2?,\n")
    train, _, report = load(path, tok)
    assert len(train) == 1
    assert_consistent_report(report, 2, 1)


# The broken row is on line 4 (line 3 is blank and still counts as a line of the file).
MALFORMED = (
    "\n".join(
        [
            json.dumps(PC_ROWS[0]),
            json.dumps(PC_ROWS[1]),
            "",
            '{"prompt": "x", oops',
            json.dumps(PC_ROWS[2]),
        ]
    )
    + "\n"
)


def test_malformed_jsonl_line_error_names_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text(MALFORMED)
    with pytest.raises(DataError, match=r"line 4\b") as exc:
        load(path, tok, on_bad_row="error")
    assert str(path) in str(exc.value)


def test_malformed_jsonl_line_dropped_and_reported(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text(MALFORMED)
    train, _, report = load(path, tok, on_bad_row="drop")
    assert len(train) == 3
    assert report.bad_lines == [4]
    assert_consistent_report(report, 4, 3)
    line = report.line()
    assert "malformed JSON on line(s) 4" in line
    assert "1 dropped" in line


def test_non_object_jsonl_line_counted_as_a_row(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PC_ROWS[0]) + "\n[1, 2]\n" + json.dumps(PC_ROWS[1]) + "\n")
    train, _, report = load(path, tok, on_bad_row="drop")
    assert len(train) == 2
    assert sum(report.dropped.values()) == 1
    assert report.rows == report.kept + sum(report.dropped.values()) == 3


def test_non_object_jsonl_line_errors(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PC_ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"line 2\b"):
        load(path, tok, on_bad_row="error")


def test_non_object_in_json_list_is_not_silently_lost(tmp_path, tok):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([PC_ROWS[0], "not a row", PC_ROWS[1]], indent=1))
    with pytest.raises(DataError):
        load(path, tok, on_bad_row="error")


# --------------------------------------------------------------------------- eval split


def _key(ex) -> tuple[int, ...]:
    return tuple(ex["input_ids"])


@pytest.fixture
def twenty_rows(tmp_path):
    rows = [{"prompt": f"Question number {i}?", "completion": f"Answer {i}."} for i in range(20)]
    return write(tmp_path, "jsonl", rows)


@pytest.mark.parametrize(("eval_size", "n_eval"), [(0.25, 5), (0.01, 1), (3, 3), (3.0, 3)])
def test_eval_size_holds_out_rows(twenty_rows, tok, eval_size, n_eval):
    train, evals, _ = load(twenty_rows, tok, eval_size=eval_size)
    assert len(evals) == n_eval
    assert len(train) == 20 - n_eval
    train_keys, eval_keys = {_key(e) for e in train}, {_key(e) for e in evals}
    assert len(train_keys) + len(eval_keys) == 20
    assert not train_keys & eval_keys


def test_eval_split_is_deterministic(twenty_rows, tok):
    a_train, a_eval, _ = load(twenty_rows, tok, eval_size=0.25, seed=3)
    b_train, b_eval, _ = load(twenty_rows, tok, eval_size=0.25, seed=3)
    assert [_key(e) for e in a_eval] == [_key(e) for e in b_eval]
    assert [_key(e) for e in a_train] == [_key(e) for e in b_train]
    # a different seed holds out a different set (for these seeds)
    splits = {
        frozenset(map(_key, load(twenty_rows, tok, eval_size=0.25, seed=s)[1])) for s in range(4)
    }
    assert len(splits) > 1


def test_eval_size_leaving_nothing_is_refused(twenty_rows, tok):
    with pytest.raises(DataError, match="eval_size"):
        load(twenty_rows, tok, eval_size=20)


def test_max_samples_takes_the_first_rows(twenty_rows, tok):
    train, _, report = load(twenty_rows, tok, max_samples=4)
    assert report.kept == 4
    assert [labelled(tok, ex).split(".")[0] for ex in train] == [f"Answer {i}" for i in range(4)]


# --------------------------------------------------------------------------- sources


def test_unknown_builtin_lists_builtin_names():
    shipped = sorted(
        p.name.removesuffix(".jsonl")
        for p in (resources.files("rlhf_cli") / "assets").iterdir()
        if p.name.endswith(".jsonl")
    )
    assert {"sft", "chat", "preference", "hh"} <= set(shipped)
    with pytest.raises(DataError) as exc:
        load_rows("builtin:nope", name=None, split="train", on_bad_row="drop", stats=Counter())
    msg = str(exc.value)
    assert "builtin:nope" in msg
    for name in shipped:
        assert f"builtin:{name}" in msg


@pytest.mark.parametrize("name", ["missing.jsonl", "sub/missing.csv", "missing.parquet"])
def test_missing_local_file(tmp_path, tok, name):
    path = tmp_path / name
    with pytest.raises(DataError, match="no such file") as exc:
        load(path, tok)
    assert str(path) in str(exc.value)


def test_unsupported_local_file_type(tmp_path, tok):
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load(path, tok)


SHIPPED = [
    ("sft", "sft", "prompt_completion"),
    ("chat", "sft", "messages"),
    ("preference", "preference", "preference"),
    ("hh", "preference", "hh"),
]


@pytest.mark.parametrize(("name", "kind", "fmt"), SHIPPED, ids=[s[0] for s in SHIPPED])
def test_shipped_datasets_load_without_drops(tok, name, kind, fmt):
    cfg = compose(f"data={name}", "data.eval_size=0").data
    assert cfg.path == f"builtin:{name}"
    n_lines = sum(1 for ln in builtin_path(name).read_text().splitlines() if ln.strip())
    train, evals, reports = load_datasets(cfg, tok, kind, 0)
    (report,) = reports
    assert report.fmt == fmt
    assert report.dropped == {}
    assert report.bad_lines == []
    assert report.rows == report.kept == len(train) == n_lines
    assert evals == []


def test_sft_on_shipped_preference_data_trains_on_chosen(tok):
    cfg = compose("data=preference", "data.eval_size=0").data
    train, _, (report,) = load_datasets(cfg, tok, "sft", 0)
    assert report.kept == report.rows
    first = json.loads(builtin_path("preference").read_text().splitlines()[0])
    assert labelled(tok, train[0]).startswith(first["chosen"])


# --------------------------------------------------------------------------- collation


def test_collate_pads_to_longest_in_batch(tok):
    examples, _ = build(PC_ROWS, tok, max_length=512)
    lengths = [len(ex["input_ids"]) for ex in examples]
    assert len(set(lengths)) > 1
    pad_id = tok.pad_token_id
    batch = collate_sft(examples, pad_id)
    width = max(lengths)
    assert width < 512
    for name in ("input_ids", "attention_mask", "labels"):
        assert tuple(batch[name].shape) == (3, width)
    for i, ex in enumerate(examples):
        n = lengths[i]
        assert batch["input_ids"][i, :n].tolist() == ex["input_ids"]
        assert batch["labels"][i, :n].tolist() == ex["labels"]
        assert batch["attention_mask"][i, :n].tolist() == [1] * n
        assert batch["attention_mask"][i, n:].tolist() == [0] * (width - n)
        assert batch["labels"][i, n:].tolist() == [IGNORE_INDEX] * (width - n)
        assert batch["input_ids"][i, n:].tolist() == [pad_id] * (width - n)


def test_collate_pads_to_a_multiple(tok):
    """train.pad_to_multiple_of: every padded width (one-forward rows, left-padded prompts,
    responses) is the longest row rounded up to the multiple; the rows and masks are as
    without it, followed (or, for prompts, preceded) by more padding."""
    examples, _ = build(PC_ROWS, tok, max_length=512)
    plain, padded = (
        collate_sft(examples, tok.pad_token_id),
        collate_sft(examples, tok.pad_token_id, 16),
    )
    width = plain["input_ids"].shape[1]
    assert padded["input_ids"].shape[1] == -(-width // 16) * 16 > width
    for name, value in (
        ("input_ids", tok.pad_token_id),
        ("attention_mask", 0),
        ("labels", IGNORE_INDEX),
    ):
        assert torch.equal(padded[name][:, :width], plain[name])
        assert (padded[name][:, width:] == value).all()

    pairs = [
        {"prompt_ids": [5] * p, "responses_ids": [[6] * r, [7] * (r + 3)], "margin": None}
        for p, r in ((3, 6), (9, 2))
    ]
    plain = collate_preference(pairs, 0, shared_prompt=True)
    padded = collate_preference(pairs, 0, shared_prompt=True, multiple=8)
    for name in ("input_ids", "attention_mask", "labels", "response_ids", "response_mask"):
        n = plain[name].shape[1]
        assert padded[name].shape[1] == -(-n // 8) * 8 > n, name
        assert torch.equal(padded[name][:, :n], plain[name]), name
    n = plain["prompt_ids"].shape[1]
    assert padded["prompt_ids"].shape[1] == 16 and n == 9
    assert torch.equal(padded["prompt_ids"][:, -n:], plain["prompt_ids"])
    assert torch.equal(padded["prompt_mask"][:, -n:], plain["prompt_mask"])
    assert not padded["prompt_mask"][:, :-n].any()
    for name in ("index", "row_example"):
        assert torch.equal(padded[name], plain[name])


def test_preference_message_lists_without_prompt_column(tok):
    """UltraFeedback-style pairs: chosen/rejected conversations that repeat the prompt."""
    user = {"role": "user", "content": "Name a fruit."}
    rows = [
        {
            "chosen": [user, {"role": "assistant", "content": "An apple."}],
            "rejected": [user, {"role": "assistant", "content": "No."}],
        }
    ]
    (ex,), report = build(rows, tok, kind="preference")
    assert report.fmt == "preference"
    assert "Name a fruit." in tok.decode(ex["prompt_ids"])
    assert tok.decode(ex["responses_ids"][0], skip_special_tokens=True).strip() == "An apple."
    assert tok.decode(ex["responses_ids"][1], skip_special_tokens=True).strip() == "No."


def test_sft_on_hh_transcripts_trains_on_chosen_answer(tok):
    rows = [
        {
            "chosen": "\n\nHuman: Hi?\n\nAssistant: Hello there.",
            "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away.",
        }
    ]
    (ex,), report = build(rows, tok, kind="sft")
    assert report.fmt == "hh"
    assert labelled(tok, ex).strip().startswith("Hello there.")
    assert "Human: Hi?" in tok.decode(ex["input_ids"])


# --------------------------------------------------------------------------- encodings, odd files


def test_a_byte_order_mark_keeps_the_first_row(tmp_path, tok):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in PC_ROWS).encode())
    train, _, report = load(path, tok, on_bad_row="error")
    assert_consistent_report(report, 3, 3)
    assert "Paris" in tok.decode(train[0]["input_ids"])


def test_a_file_that_is_not_utf8_names_the_byte_and_line(tmp_path, tok):
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in PC_ROWS]
    lines[1] = lines[1].replace("primary", "primär")
    path.write_bytes("\n".join(lines).encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 \(byte 0xe4 on line 2\); re-save"):
        load(path, tok)


def test_a_json_list_saved_as_jsonl_gives_every_row(tmp_path, tok):
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(PC_ROWS, indent=2))
    train, _, report = load(path, tok, on_bad_row="error")
    assert len(train) == 3
    assert_consistent_report(report, 3, 3)


def test_pairs_with_nothing_to_prefer_are_bad_rows(tok):
    """chosen == rejected (also up to whitespace, and as messages), message histories that
    differ, and a margin of Infinity: each dropped and counted, or an error naming the row."""
    ok = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}
    msgs = lambda user, answer: [  # noqa: E731
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]
    bad = [
        {"prompt": "Hi?", "chosen": "Same.", "rejected": "Same. "},
        {"chosen": msgs("Hi?", "Same."), "rejected": msgs("Hi?", "Same.")},
        {"chosen": msgs("Hi?", "Hello!"), "rejected": msgs("Bye?", "Go away.")},
        {**ok, "margin": float("inf")},
    ]
    examples, report = build([ok, *bad], tok, kind="preference")
    assert len(examples) == 1
    assert_consistent_report(report, 5, 1)
    reasons = " | ".join(report.dropped)
    assert "chosen and rejected are the same answer" in reasons
    assert "another message history" in reasons and "margin inf is not a finite" in reasons
    for row in bad:
        with pytest.raises(DataError, match="row 2"):
            build([ok, row], tok, kind="preference", on_bad_row="error")
