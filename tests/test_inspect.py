"""`rlhf data inspect`: the examples a stage would train on, shown as training builds them,
with warnings for silent mistakes; through the CLI, writing nothing."""

from __future__ import annotations

import json

import pytest
from conftest import rlhf
from test_bad_inputs import snapshot


def inspect(tmp_path, *args: str) -> str:
    before = snapshot(tmp_path)
    proc = rlhf("data", "inspect", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert snapshot(tmp_path) == before  # writes nothing
    return proc.stdout


@pytest.mark.slow
def test_preference_pairs_show_prompt_and_both_answers(tmp_path):
    out = inspect(tmp_path, "stage=dpo", "n=1")
    assert "builtin:preference: 400 rows (preference), 400 kept" in out
    assert "--- example 1: prompt 15 tokens; responses 13, 45" in out
    # masked prompt as plain text, each trained answer between [[ ]], ending with EOS
    assert "Please convert 40 degrees Fahrenheit into degrees Celsius.</s><|assistant|>" in out
    assert "chosen\n[[40 degrees Fahrenheit is about 4.4 degrees Celsius.</s>]]" in out
    assert "--- example 2" not in out and "no warnings" in out


@pytest.mark.slow
def test_sft_rows_mark_the_trained_tokens_and_the_real_model_has_no_warning(tmp_path):
    out = inspect(tmp_path, "model=smollm2-135m", "stage=sft", "n=1")
    assert "<|im_start|>assistant\n[[" in out  # the answer is trained, the prompt is not
    assert "<|im_end|>\n]]" in out and "no warnings" in out


@pytest.mark.slow
def test_the_silent_mistakes_are_warned_about(tmp_path):
    rows = [{"text": "<s> a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3}] * 4
    (tmp_path / "bos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = inspect(tmp_path, "data.path=bos.jsonl", "data.eval_size=0", "n=0")
    assert "4 of 4 examples start with BOS twice" in out
    out = inspect(tmp_path, "data.max_length=40", "data.max_prompt_length=24", "n=0")
    assert "trained responses do not end with the EOS the model stops on ('</s>'" in out
    assert "rows are truncated: raise data.max_length" in out


@pytest.mark.slow
def test_a_bad_data_command_is_one_line(tmp_path):
    from test_cli_errors import assert_one_line_error

    assert_one_line_error(rlhf("data", "show", cwd=tmp_path), "unknown data command 'show'")
    assert_one_line_error(rlhf("data", "inspect", "n=x", cwd=tmp_path), "n='x'")
    assert_one_line_error(rlhf("data", "inspect", "stage=nope", cwd=tmp_path), "nope")
