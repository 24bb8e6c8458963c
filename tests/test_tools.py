"""The tools beside `rlhf train`: sample (greedy determinism, rendering like training), merge
(a plain transformers model that generates what the run generates), eval (reward, KL to the
reference, preference accuracies), plot (PNG files), and their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import rlhf, train_in_process
from test_cli_errors import assert_one_line_error

from rlhf_cli import sentiment
from rlhf_cli.cli import main
from rlhf_cli.core.errors import EXIT_USER_ERROR, UserError
from rlhf_cli.tools.evaluate import evaluate
from rlhf_cli.tools.merge import merge
from rlhf_cli.tools.plot import plot_frontier, plot_metrics
from rlhf_cli.tools.sample import sample

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REWARD = "rlhf_cli.sentiment:score"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A LoRA run on the 4-bit base (lm_head trained in full too) that has moved far enough
    from the base to change its greedy outputs; a 16-prompt file and a 16-pair file."""
    root = tmp_path_factory.mktemp("tools")
    rows = sentiment.reviews(128)
    write_jsonl(root / "reviews.jsonl", rows)
    train_in_process(
        root / "run",
        "data=reviews",
        f"data.path={root / 'reviews.jsonl'}",
        "data.eval_size=0",
        "train.max_steps=12",
        "train.micro_batch_size=8",
        "train.save_every=0",
        "optim.lr=1e-2",
        "peft.modules_to_save=[lm_head]",
    )
    write_jsonl(root / "prompts.jsonl", [{"prompt": r["prompt"]} for r in rows[:16]])
    pairs = [
        {"prompt": r["prompt"], "chosen": r["completion"], "rejected": "Overall it was bad."}
        for r in rows[:16]
    ]
    write_jsonl(root / "pairs.jsonl", pairs)
    return root


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def responses(rows: list[dict]) -> list[str]:
    return [r["response"] for r in rows]


def test_greedy_sampling_is_deterministic_and_rendered_like_training(work):
    prompts = str(work / "prompts.jsonl")
    first = sample(str(work / "run"), prompts, out=str(work / "a.jsonl"), max_new_tokens=12)
    again = sample(str(work / "run"), prompts, max_new_tokens=12, batch_size=5)  # other batches
    assert responses(first) == responses(again)
    assert [json.loads(x) for x in (work / "a.jsonl").read_text().splitlines()] == first
    assert (
        first[0]["prompt"]
        == json.loads((work / "prompts.jsonl").read_text().splitlines()[0])["prompt"]
    )
    # One prompt on the command line is rendered like the same prompt from a file.
    one = sample(str(work / "run"), prompt=first[0]["prompt"], max_new_tokens=12)
    assert responses(one) == responses(first[:1])
    # Sampling: n per prompt, reproducible from the seed.
    drawn = sample(str(work / "run"), prompts, n=2, temperature=1.0, seed=3, max_new_tokens=12)
    assert len(drawn) == 32 and drawn[0]["prompt"] == drawn[1]["prompt"]
    redrawn = sample(str(work / "run"), prompts, n=2, temperature=1.0, seed=3, max_new_tokens=12)
    assert responses(drawn) == responses(redrawn)
    assert len(set(responses(drawn))) > 1


def test_merged_model_loads_in_plain_transformers_and_samples_like_the_run(work):
    """The run trained on an NF4 base; merging adds the update to the unquantized base, so the
    run is compared with its base unquantized too (quant=none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_cli.model.tiny import tiny_model_dir

    out = merge(str(work / "run"), str(work / "merged"))
    model = AutoModelForCausalLM.from_pretrained(out)  # no peft, no bitsandbytes
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (
        not hasattr(model, "peft_config")
        and getattr(model.config, "quantization_config", None) is None
    )
    ids = tokenizer("The plot was", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert (
        generated.shape[1] == ids["input_ids"].shape[1] + 5 or tokenizer.eos_token_id in generated
    )

    prompts = str(work / "prompts.jsonl")
    run_out = sample(str(work / "run"), prompts, max_new_tokens=16, quant="none")
    merged_out = sample(str(out), prompts, max_new_tokens=16)
    base_out = sample(str(tiny_model_dir()), prompts, max_new_tokens=16)
    assert responses(merged_out) == responses(run_out)
    assert responses(merged_out) != responses(base_out)  # the adapter matters

    with pytest.raises(UserError, match="force=true"):
        merge(str(work / "run"), str(out))
    merge(str(work / "run"), str(out), force=True)
    assert (out / "model.safetensors").is_file() and not list(out.parent.glob(".tmp-*"))


def test_eval_reward_kl_and_pair_accuracies(work):
    result = evaluate(
        str(work / "run"),
        str(work / "prompts.jsonl"),
        reward_fn=REWARD,
        pairs=str(work / "pairs.jsonl"),
        out=str(work / "eval.json"),
        max_new_tokens=16,
        seed=1,
        label="lora",
    )
    assert json.loads((work / "eval.json").read_text()) == result
    for key in ("reward", "reward_std", "kl", "kl_std", "response_length", "eos_fraction", "pairs"):
        assert result[key] is not None, key
    assert result["label"] == "lora" and result["samples"] == 16
    assert result["reference"] == "the base model with the adapter disabled"
    got = [r["score"] for r in result["responses"]]
    assert got == sentiment.score([], [r["response"] for r in result["responses"]])
    assert result["reward"] == pytest.approx(sum(got) / len(got))
    assert result["kl"] == pytest.approx(sum(r["kl"] for r in result["responses"]) / 16)
    assert result["kl"] > 0.1  # a trained adapter is far from the disabled one
    pairs = result["pairs"]
    assert pairs["pairs"] == 16 and pairs["beta"] == 0.1
    for key in ("preference_accuracy", "implicit_accuracy"):
        assert 0 <= pairs[key] <= 1
    # A policy is its own reference: the KL of every sample is exactly 0.
    merged = merge(str(work / "run"), str(work / "merged_for_eval"))
    same = evaluate(str(merged), str(work / "prompts.jsonl"), ref=str(merged), max_new_tokens=8)
    assert same["kl"] == 0.0 and same["reward"] is None
    # Without a reference (a plain model) there is no KL, and no implicit reward.
    plain = evaluate(str(merged), pairs=str(work / "pairs.jsonl"))
    assert "kl" not in plain and plain["pairs"]["implicit_accuracy"] is None


def test_eval_reference_of_a_run_trained_from_an_adapter(work, tmp_path):
    """DPO that continues the SFT adapter: its reference is that adapter, frozen (as in
    training), not the bare base; one small step away, the KL is small but not 0."""
    train_in_process(
        tmp_path / "dpo",
        "stage=dpo",
        f"model.adapter={work / 'run'}",
        f"data.path={work / 'pairs.jsonl'}",
        "data.eval_size=0",
        "train.max_steps=1",
        "train.micro_batch_size=8",
        "train.save_every=0",
        "peft.dropout=0",
    )
    result = evaluate(str(tmp_path / "dpo"), str(work / "prompts.jsonl"), max_new_tokens=8)
    assert result["reference"].startswith("frozen copy of model.adapter=")
    sft = evaluate(str(work / "run"), str(work / "prompts.jsonl"), max_new_tokens=8)
    assert 0 < abs(result["kl"]) < sft["kl"]


def test_eval_with_a_reward_model(work, tmp_path):
    train_in_process(
        tmp_path / "rm",
        "stage=rm",
        "data.max_samples=32",
        "data.eval_size=0",
        "train.max_steps=2",
        "train.micro_batch_size=8",
        "train.save_every=0",
    )
    result = evaluate(
        str(work / "run"),
        str(work / "prompts.jsonl"),
        reward_model=str(tmp_path / "rm"),
        max_new_tokens=8,
    )
    scores = [r["score"] for r in result["responses"]]
    assert len(scores) == 16 and all(isinstance(s, float) for s in scores)
    assert len(set(scores)) > 1


def test_plot_metrics_and_frontier_write_pngs(work, tmp_path):
    png = plot_metrics([str(work / "run")], str(tmp_path / "m.png"))
    assert png.read_bytes().startswith(PNG_MAGIC)
    evals = []
    for i, (kl, reward) in enumerate([(0.0, 0.1), (2.0, 0.5), (2.5, 0.6), (9.0, 0.9)]):
        path = tmp_path / f"e{i}.json"
        path.write_text(
            json.dumps({"label": "B" if i in (1, 2) else f"A{i}", "kl": kl, "reward": reward})
        )
        evals.append(str(path))
    png = plot_frontier(evals, str(tmp_path / "f.png"))
    assert png.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(UserError, match="not logged"):
        plot_metrics([str(work / "run")], str(tmp_path / "x.png"), ["rewards/margins"])


def cli_error(capsys, *args: str) -> str:
    """`rlhf *args` in this process: exit status 2 and exactly one line, `error: ...`."""
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    assert exc.value.code == EXIT_USER_ERROR
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


@pytest.mark.slow
def test_tool_errors_are_one_line(work, tmp_path, capsys):
    run = str(work / "run")
    cases = [
        (("sample", run), ["prompts=FILE"]),
        (("sample", run, "prompt=hi", "temperature=-1"), ["temperature", "-1"]),
        (("sample", run, "prompt=hi", "colour=red"), ["unknown option colour"]),
        (("sample", run, "prompt=hi", "n=2"), ["temperature > 0"]),
        (("sample", str(tmp_path / "nope"), "prompt=hi"), ["nope", "neither a run directory"]),
        (("sample", run, "prompt=hi", f"out={work / 'prompts.jsonl'}"), ["exists", "force=true"]),
        (("eval", run), ["nothing to evaluate"]),
        (("eval", run, "prompts=p.jsonl", "reward.fn=nope.mod:f"), ["cannot import 'nope.mod'"]),
        (("eval", run, "prompts=p.jsonl", "reward.kwargs.x=1"), ["reward.fn"]),
        (("merge", run), ["out=DIR"]),
        (("merge", run, f"out={work / 'prompts.jsonl'}"), ["exists", "force=true"]),
        (("plot", run, f"out={tmp_path / 'p.png'}", "metrics=nope"), ["metrics=nope", "loss"]),
        (("plot", run, "e.json", f"out={tmp_path / 'p.png'}"), ["not both"]),
    ]
    for args, needles in cases:
        line = cli_error(capsys, *args)
        for needle in needles:
            assert needle in line, (args, line)
    assert list(tmp_path.iterdir()) == []
    # The same through the real entry point: no traceback.
    assert_one_line_error(rlhf("eval", run, cwd=tmp_path), "nothing to evaluate")
    assert_one_line_error(rlhf("sample", str(tmp_path / "nope"), "prompt=hi"), "neither")


@pytest.mark.slow
def test_sample_cli_writes_jsonl(work, tmp_path):
    out = tmp_path / "s.jsonl"
    proc = rlhf(
        "sample",
        str(work / "run"),
        "prompt=Review the movie Blue River.",
        f"out={out}",
        "max_new_tokens=8",
    )
    assert proc.returncode == 0, proc.stderr
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert row["prompt"] == "Review the movie Blue River." and isinstance(row["response"], str)
    assert "Blue River" in proc.stderr  # a few samples are shown


def test_sentiment_ground_truth_by_hand():
    assert sentiment.sentiment("The plot was great and the acting was superb.") == 1.0
    assert sentiment.sentiment("The plot was great but the acting was dull.") == 0.0
    assert sentiment.sentiment("Not good. Awful, boring!") == -1.0  # "not good" is negative
    assert sentiment.sentiment("A long film.") == 0.0  # no sentiment words at all
    assert sentiment.score(["p"] * 2, ["good good bad", "never dull"]) == [
        pytest.approx(1 / 3),
        1.0,
    ]
    rows = sentiment.reviews()
    assert rows == sentiment.reviews() and len({r["prompt"] for r in rows}) == 90
    mean = sum(sentiment.sentiment(r["completion"]) for r in rows) / len(rows)
    assert abs(mean) < 0.1  # the SFT corpus is neutral on average
