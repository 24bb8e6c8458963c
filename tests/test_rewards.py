"""The shipped verifiable rewards, by hand, and the data columns that reach reward functions."""

from __future__ import annotations

import json

import pytest
from conftest import read_metrics, rlhf, train_in_process
from test_cli_errors import assert_one_line_error

from rlhf_cli import rewards
from rlhf_cli.rewards import final_answer, format_match, math_answer, overlong_penalty


@pytest.mark.parametrize(
    "response, given",
    [
        ("The answer is 42.", "42"),
        ("so \\boxed{\\frac{7}{2}}, done", "\\frac{7}{2}"),
        ("first \\boxed{1} then \\boxed{x^{2}+1}", "x^{2}+1"),  # the last box, nested braces
        ("x = -3.5 and y = 1,234 apples", "1,234"),
        ("the pairs 3,4", "4"),  # a comma between numbers is no thousands separator
        ("it is 3/4 of it", "3/4"),
        ("no number at all", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_final_answer(response, given):
    assert final_answer(response) == given


def test_math_answer_compares_numbers_exactly_and_text_loosely():
    """Math-Verify's rules: numbers to 6 decimal places (0.333 is not 1/3), fractions, a
    percent sign in the response dropped (28% answers 28, as Math-Verify's cases say), text
    compared loosely."""
    responses = [
        "so \\boxed{\\frac{1}{2}}",  # 1/2 == 0.5
        "1,234",  # == 1234
        "The growth was 50%.",  # == 50
        "I get 41",  # != 42
        "\\boxed{\\text{Paris}}",  # == "paris."
        "\\boxed{0.333}",  # != 1/3
        "whatever",  # no answer
        "7",  # the row has none
    ]
    answers = ["0.5", 1234, "50", 42, "paris.", "1/3", "3", None]
    assert math_answer([""] * 8, responses, answers) == [1, 1, 1, 0, 1, 0, 0, 0]


# Right answers the previous hand-written checker scored 0 (issue 35), and two it scored 1 that
# are wrong; Math-Verify gets each right.
HAND = [
    ("The answer is $-\\frac{1}{2}$", "-1/2", 1),
    ("So $\\frac{1}{2}$.", "0.5", 1),  # a \frac outside \boxed (was read as its denominator)
    ("$\\boxed{5 \\text{ dollars}}$", "5", 1),
    ("$\\left(3, 4\\right)$", "(3, 4)", 1),
    ("$\\boxed{14{,}916}$", "14916", 1),
    ("$x = 5$", "5", 1),
    ("$\\frac13$", "1/3", 1),
    ("1 000", "1000", 1),
    ("1000,99", "1000.99", 1),
    ("0.333333", "1/3", 1),
    ("So 47 * 83 = 3901.", "3901", 1),
    ("12,34 euros", "34", 0),
    ("pages 3-5", "-5", 0),
]

# Math-Verify's own published cases (huggingface/Math-Verify tests/test_all.py: number
# extraction, fractions, sets, LaTeX notation, percents): (reference, response, expected).
MATH_VERIFY_CASES = [
    ("-5", "-5", 1),
    ("7425000", "7,425,000", 1),
    ("1000", "1 000", 1),
    ("1000", "1000.0", 1),
    ("1000.0", "1,000.0", 1),
    ("1000.99", "1000,99", 1),
    ("1,22", "1.22", 1),
    ("2.74", "Soucis : 2,74 $ a..", 1),
    ("0.4", ".4", 1),
    ("1000.99", "1,000.99", 1),
    ("1000.99", "$1,000.99", 1),
    ("1000.99", "1,000.99$", 1),
    ("1000.99", "the number is not 10 which is 1,000.99€", 1),
    ("1000.99", "so the number is 10 which is 1,000.99m²", 1),
    ("1000.99", "not it's not 10 it's 1,000.99m²", 1),
    ("0,111", "0.111", 1),
    ("2", "AZYUK2A", 0),
    ("10/9", "\\frac{10}{9}", 1),
    ("-10/9", "-\\frac{10}{9}", 1),
    ("$[0,1)$", "$[0,1)$", 1),
    ("$[0,9)$", "$[0,1)$", 0),
    ("$(0,9)$", "$[0,9)$", 0),
    ("$1$", "$-[0,1)$", 0),
    ("$9$", "Answer \\[ 9 \\]", 1),
    ("$9$", "Answer $ 9 $", 1),
    ("$9$", "Answer $$ 9 $$", 1),
    ("$9$", "Answer \\( 9 \\)", 1),
    ("$10$", "Answer \\( (9+1) \\)", 1),
    ("$9$", "Answer \\[ \n 9 \n \\]", 1),
    ("$9$", "Answer $$ \n 9 \n $$", 1),
    ("$10/9$", "Answer $ \\frac{1}{2} \\$ = \\frac{10}{9} $", 1),
    ("$1/3$", "$\\frac13 $", 1),
    ("$1$", "$\\frac3{3} $", 1),
    ("$\\sqrt{3}$", "$\\sqrt3 $", 1),
    ("$1/3$", "$\\cfrac{1}{3} $", 1),
    ("$1/3$", "$\\dfrac{1}{3} $", 1),
    ("$1/3$", "$\\tfrac{1}{3} $", 1),
    ("$1/3$", "$ 1/3 $", 1),
    ("$1/3$", "$\\left( \\frac{1}{3} \\right)$", 1),
    ("$1/3$", "$\\boxed{\\frac{1}{3}}$", 1),
    ("$1/3$", "$\\frac{1}{3} \\text{meters}$", 1),
    ("$1/3$", "$\\frac{1}{3} \\textbf{meters}$", 1),
    ("$1/3$", "$k = \\frac{1}{3}$", 1),
    ("$28\\%$", "28 percent", 1),
    ("$28\\%$", "28 pct", 1),
    ("$28\\%$", "28 %", 1),
    ("$28\\%$", "$28$ %", 1),
    ("$28\\%$", "$28$ percent", 1),
    ("$28\\%$", "$\\boxed{28}$ pct", 1),
    ("$28\\%$", "28", 1),
    ("$0.28$", "28", 0),
    ("$28/100$", "28", 0),
    ("$28$", "28/100", 0),
    ("$\\frac{28}{100}$", "28", 0),
    ("$28*\\frac{1}{100}$", "28", 0),
    # Math-Verify runs these two with LaTeX extraction alone (an inline formula split over
    # lines is no formula); math_answer also reads plain expressions, so the 9 counts.
    ("$9$", "Answer $ \n 9 \n $", 1),
    ("$9$", "Answer \\( \n 9 \n \\)", 1),
]


@pytest.mark.parametrize("response, answer, expected", HAND)
def test_math_answer_on_the_hand_cases(response, answer, expected):
    assert math_answer([""], [response], [answer]) == [expected]


def test_math_answer_on_math_verifys_published_cases():
    gold = [g for g, _, _ in MATH_VERIFY_CASES]
    responses = [r for _, r, _ in MATH_VERIFY_CASES]
    got = math_answer([""] * len(gold), responses, gold)
    wrong = [case for case, v in zip(MATH_VERIFY_CASES, got) if v != case[2]]
    assert wrong == []


def test_format_match():
    think = "<think>2 + 2\nis 4</think>\n<answer>4</answer>"
    assert format_match([""] * 3, [think, "  " + think + "\n", "<answer>4</answer>"]) == [1, 1, 0]
    assert format_match([""], ["A: 4"], pattern=r"A: \d+") == [1.0]


def test_overlong_penalty_by_hand():
    """L_max = 20, L_cache = 4: free up to 16 tokens; 17 -> (16 - 17) / 4 = -0.25, 18 -> -0.5,
    20 -> -1; beyond L_max -1. The default buffer is L_max / 5 = 4 too."""
    ids = [[0] * n for n in (10, 16, 17, 18, 20, 21)]
    want = [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert overlong_penalty([""] * 6, [""] * 6, ids, 20, overlong_buffer=4) == want
    assert overlong_penalty([""] * 6, [""] * 6, ids, 20) == want
    with pytest.raises(ValueError, match="overlong_buffer"):
        overlong_penalty([""], [""], [[0]], 20, overlong_buffer=0)


def test_functions_get_the_row_columns_they_take():
    """Per-row columns (None where a row lacks one), response_ids and max_new_tokens reach the
    functions that name them (or take **kwargs); a config kwarg is bound once."""
    from rlhf_cli.config import RewardConfig

    inputs = rewards.row_inputs([{"answer": 1, "level": "a"}, {"answer": 2}], [[5], [6, 7]], 16)
    assert inputs == {
        "answer": [1, 2],
        "level": ["a", None],
        "response_ids": [[5], [6, 7]],
        "max_new_tokens": 16,
    }
    (term,) = rewards.reward_terms(RewardConfig(fn="rlhf_cli.rewards:overlong_penalty"))
    assert rewards.call_reward_fn(term, ["p", "q"], ["x", "y"], inputs) == [0.0, 0.0]
    (term,) = rewards.reward_terms(
        RewardConfig(fn="rlhf_cli.rewards:format_match", kwargs={"pattern": "x"})
    )
    assert rewards.call_reward_fn(term, ["p", "q"], ["x", "y"], inputs) == [1.0, 0.0]
    rewards.check_inputs([term], {"answer"})
    with pytest.raises(rewards.UserError, match="'pattern' is both a data column"):
        rewards.check_inputs([term], {"pattern"})
    (term,) = rewards.reward_terms(RewardConfig(fn="rlhf_cli.rewards:math_answer"))
    with pytest.raises(rewards.UserError, match="needs answer: add a data column"):
        rewards.check_inputs([term], {"solution"})


ANSWER_REWARDS = '''
def letter_share(prompts, responses, answer):
    """The share of the response's characters that are its row's answer letter."""
    return [r.count(a) / len(r) if r else 0.0 for r, a in zip(responses, answer)]


def the_answer(prompts, responses, answer, level=None):
    """The row's own answer column as the score (None: -1), to check the alignment."""
    return [float(a) if a is not None else -1.0 for a in answer]
'''


@pytest.fixture
def answer_dir(tmp_path, monkeypatch):
    """A working directory with answer_rewards.py and the shipped prompts, each row with an
    answer column: the letter its response should be full of (the prompt does not name it)."""
    from rlhf_cli.data.rows import builtin_path

    (tmp_path / "answer_rewards.py").write_text(ANSWER_REWARDS)
    lines = builtin_path("prompts").read_text().splitlines()[:48]
    rows = [{**json.loads(line), "answer": "e"} for line in lines]
    (tmp_path / "letters.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_a_reward_on_the_rows_answer_alone_is_learned(answer_dir):
    """The reward is the share of the response's characters that are its row's answer letter:
    without the column there is no reward at all. GRPO on the tiny model raises it (+0.5 in 20
    steps on seed 42). (Two letters that depend on the prompt's topic were not learned by the
    tiny model in 30 steps: 0.08 -> 0.10; the columns' alignment row by row is the next test.)"""
    train_in_process(
        answer_dir / "r",
        "stage=grpo",
        "reward.fn=answer_rewards:letter_share",
        "data.path=letters.jsonl",
        "data.eval_size=0",
        "quant=none",
        "stage.max_new_tokens=16",
        "train.max_steps=20",
        "optim.lr=5e-3",
    )
    scores = [r["score"] for r in read_metrics(answer_dir / "r")]
    start, end = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert end > start + 0.2, scores


@pytest.mark.slow
def test_each_response_is_scored_with_its_own_rows_columns(answer_dir):
    """A function that returns its row's answer: every step's mean score is the mean answer of
    the step's prompts, group copies included (4 prompts a step, answers 1-8, in seeded order),
    online and in rlhf eval; rows without the column get None."""
    rows = [{"prompt": f"Item {i}?", "answer": i} for i in range(1, 9)]
    rows.append({"prompt": "Item 9?", "level": "hard"})
    (answer_dir / "numbers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (
        "stage=grpo",
        "reward.fn=answer_rewards:the_answer",
        "data.path=numbers.jsonl",
        "data.eval_size=0",
        "data.max_samples=8",
        "stage.rollout_batch_size=4",
        "stage.max_new_tokens=4",
        "train.max_steps=2",
        "train.shuffle=false",
    )
    train_in_process(answer_dir / "r", *common)
    assert [r["score"] for r in read_metrics(answer_dir / "r")] == [2.5, 6.5]
    out = answer_dir / "eval.json"
    res = rlhf(
        "eval",
        str(answer_dir / "r"),
        "prompts=numbers.jsonl",
        "reward.fn=answer_rewards:the_answer",
        f"out={out}",
        "max_new_tokens=4",
        cwd=answer_dir,
    )
    assert res.returncode == 0, res.stderr
    scores = [r["score"] for r in json.loads(out.read_text())["responses"]]
    assert scores == [1, 2, 3, 4, 5, 6, 7, 8, -1]
    # Rejection sampling: every sample of a prompt scored with that prompt's answer.
    from rlhf_cli.stages.rs import read_rows

    train_in_process(
        answer_dir / "rs",
        *[a for a in common if not a.startswith(("stage=", "stage.", "train.max_steps"))],
        "stage=rs",
        "stage.n=2",
        "stage.rounds=1",
        "stage.rollout_batch_size=4",
        "stage.max_new_tokens=4",
        "train.micro_batch_size=4",
    )
    for row in read_rows(answer_dir / "rs" / "rounds" / "round-1.jsonl"):
        assert [x["score"] for x in row["samples"]] == [row["prompt_index"] + 1] * 2


@pytest.mark.slow
def test_a_reward_without_its_column_is_one_line_before_sampling(answer_dir):
    res = rlhf(
        "train",
        "stage=grpo",
        "reward.fn=rlhf_cli.rewards:math_answer",
        "data.max_samples=8",
        "data.eval_size=0",
        "run_dir=r",
        cwd=answer_dir,
    )
    assert_one_line_error(res, "rlhf_cli.rewards:math_answer needs answer", "data column")
    assert not (answer_dir / "r").exists()
