"""The rm and dpo stages on the tiny model: step-0 identities, learning, reference handling,
precomputed reference, resume, scoring."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import adapter, assert_resume_equals, max_diff, read_metrics, rlhf, train_in_process

from rlhf_cli.core.errors import DataError
from rlhf_cli.data.rows import builtin_path

PAIRS = ("data.eval_size=0", "train.micro_batch_size=4", "data.max_samples=64")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def learn_pairs(data: Path) -> tuple[str, ...]:
    """60 steps of 8 pairs from `data`, evaluated on the same pairs: can a stage fit them?"""
    return (
        f"data.path={data}",
        f"data.eval_path={data}",
        "data.eval_size=0",
        "train.micro_batch_size=8",
        "train.max_steps=60",
        "optim.lr=2e-3",
        "train.save_every=0",
    )


def shipped_pairs(n: int) -> list[dict]:
    lines = builtin_path("preference").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def test_dpo_step0_loss_is_log2_and_rewards_zero(tmp_path):
    train_in_process(tmp_path / "r", "stage=dpo", *PAIRS, "train.max_steps=2")
    first = read_metrics(tmp_path / "r")[0]
    # policy == reference at step 0 (fresh LoRA: B = 0), so h = 0 and -log sigmoid(0) = log 2
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert first["rewards/rejected"] == pytest.approx(0, abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0


def test_dpo_learns_the_training_pairs(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", shipped_pairs(48))
    train_in_process(
        tmp_path / "r",
        "stage=dpo",
        f"data.path={data}",
        f"data.eval_path={data}",
        "data.eval_size=0",
        "train.micro_batch_size=8",
        "train.max_steps=100",
        "optim.lr=2e-3",
        "stage.beta=0.1",
        "train.save_every=0",
    )
    first = read_metrics(tmp_path / "r")[0]
    final = read_metrics(tmp_path / "r", "eval")[-1]
    assert first["rewards/accuracies"] == 0  # policy == reference: no pair ranked right yet
    assert final["rewards/accuracies"] > 0.9, final
    assert final["rewards/margins"] > 0.5


def test_rm_separates_a_toy_preference_set(tmp_path):
    rng = random.Random(0)
    prompts = [json.loads(x)["prompt"] for x in builtin_path("prompts").read_text().splitlines()]
    good = [
        "Sure, happy to help with that.",
        "Of course! Here is a clear answer.",
        "Great question, here is what I know.",
    ]
    bad = ["No. Figure it out yourself.", "Whatever, I do not care.", "Go away, not my problem."]
    rows = [
        {"prompt": p, "chosen": rng.choice(good), "rejected": rng.choice(bad)} for p in prompts[:64]
    ]
    rng.shuffle(rows)  # the order of chosen/rejected is in the columns, not in position
    data = write_jsonl(tmp_path / "toy.jsonl", rows)
    train_in_process(
        tmp_path / "r",
        "stage=rm",
        *learn_pairs(data),
    )
    last = read_metrics(tmp_path / "r", "eval")[-1]
    assert last["accuracy"] > 0.9, last
    assert last["rewards/chosen"] > last["rewards/rejected"]
    assert (tmp_path / "r" / "final" / "reward_head.safetensors").is_file()

    scored = rlhf("score", str(tmp_path / "r"), str(data), f"out={tmp_path / 's.jsonl'}")
    assert scored.returncode == 0, scored.stderr
    scores = [json.loads(x)["scores"] for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(scores) == 64 and sum(c > r for c, r in scores) / 64 > 0.9
    again = rlhf("score", str(tmp_path / "r"), str(data), f"out={tmp_path / 's.jsonl'}")
    assert again.returncode == 2 and "force=true" in again.stderr  # never overwrites silently


def test_precomputed_reference_gives_the_same_losses(tmp_path):
    common = ("stage=dpo", *PAIRS, "train.max_steps=4", "optim.lr=2e-3")
    train_in_process(tmp_path / "live", *common)
    train_in_process(tmp_path / "pre", *common, "ref.precompute=true")
    assert (tmp_path / "pre" / "ref_logps.pt").is_file()
    live, pre = read_metrics(tmp_path / "live"), read_metrics(tmp_path / "pre")
    for a, b in zip(live, pre):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    # Adam moves a weight by about lr a step whatever its gradient's size, so the rounding of
    # the other batch shapes (7.9e-5 after 4 steps on an AVX-512 host) shows on weights whose
    # gradient is near 0; another reference would change the losses above.
    assert max_diff(adapter(tmp_path / "live"), adapter(tmp_path / "pre")) < 5e-4


def test_dpo_from_sft_adapter_uses_it_as_reference(tmp_path):
    train_in_process(
        tmp_path / "sft",
        "stage=sft",
        "data.eval_size=0",
        "train.max_steps=20",
        "optim.lr=3e-3",
        "train.micro_batch_size=8",
    )
    common = ("stage=dpo", *PAIRS, "train.max_steps=2", "peft.dropout=0")
    train_in_process(tmp_path / "dpo", *common, f"model.adapter={tmp_path / 'sft'}")
    train_in_process(tmp_path / "fresh", *common)
    from_sft, fresh = read_metrics(tmp_path / "dpo")[0], read_metrics(tmp_path / "fresh")[0]
    # The policy starts as the SFT policy (its log-probs differ from the raw base's) and the
    # loss is log 2: the reference is the SFT policy too, not the base.
    assert from_sft["logps/chosen"] != pytest.approx(fresh["logps/chosen"], abs=1e-2)
    assert from_sft["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert from_sft["rewards/margins"] == pytest.approx(0, abs=1e-6)
    final = tmp_path / "dpo" / "final"
    assert not (final / "reference").exists()  # only the trained adapter is saved


def test_separate_reference_model(tmp_path):
    from rlhf_cli.model.tiny import tiny_model_dir

    train_in_process(
        tmp_path / "r", "stage=dpo", *PAIRS, "train.max_steps=2", f"ref.model={tiny_model_dir()}"
    )
    # The same weights as the policy's base (quantized the same way): h = 0 at step 0.
    assert read_metrics(tmp_path / "r")[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_resume_equals_uninterrupted(tmp_path, stage):
    args = (
        f"stage={stage}",
        *PAIRS,
        "train.max_steps=6",
        "train.save_every=3",
        "train.keep_last=3",
        "optim.lr=2e-3",
    )
    files = ("reward_head.safetensors",) if stage == "rm" else ()
    assert_resume_equals(tmp_path, args, last_step=3, files=files)


@pytest.mark.parametrize(
    "extra",
    [
        ("stage.loss_type=ipo",),
        ("stage.loss_type=hinge",),
        ("stage.label_smoothing=0.1",),
        ("stage.rpo_alpha=0.5",),
        ("stage.length_normalize=true",),
    ],
)
def test_dpo_variants_train(tmp_path, extra):
    train_in_process(
        tmp_path / "r", "stage=dpo", *PAIRS, "train.max_steps=3", "optim.lr=2e-3", *extra
    )
    losses = [r["loss"] for r in read_metrics(tmp_path / "r")]
    assert all(math.isfinite(x) for x in losses)
    if "stage.loss_type=ipo" in extra:  # (0 - 1/(2 beta))^2 at step 0 with beta = 0.1
        assert losses[0] == pytest.approx(25.0, abs=1e-4)
    if "stage.loss_type=hinge" in extra:  # max(0, 1 - 0) at step 0
        assert losses[0] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_ranked_data_trains_with_plackett_luce(tmp_path, stage):
    rows = []
    for row in shipped_pairs(32):
        rows.append(
            {
                "prompt": row["prompt"],
                "responses": [row["chosen"], "I am not sure.", row["rejected"]],
            }
        )
    data = write_jsonl(tmp_path / "ranked.jsonl", rows)
    train_in_process(
        tmp_path / "r",
        f"stage={stage}",
        f"data.path={data}",
        "data.eval_size=0",
        "train.micro_batch_size=4",
        "train.max_steps=3",
        "optim.lr=2e-3",
    )
    first = read_metrics(tmp_path / "r")[0]
    if stage == "dpo":  # Plackett-Luce over 3 equal rewards: log 3 + log 2
        assert first["loss"] == pytest.approx(math.log(3) + math.log(2), abs=1e-5)
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "r"))


def test_preference_stage_refuses_sft_data(tmp_path):
    with pytest.raises(DataError, match="needs preference pairs"):
        train_in_process(tmp_path / "r", "stage=dpo", "data=sft", "train.max_steps=1")


def test_cli_runs_each_stage_on_defaults(tmp_path):
    for stage in ("rm", "dpo", "kto"):
        res = rlhf(
            "train",
            f"stage={stage}",
            "train.max_steps=2",
            "train.micro_batch_size=4",
            f"run_dir={tmp_path / stage}",
        )
        assert res.returncode == 0, res.stderr
        assert (tmp_path / stage / "final" / "adapter_model.safetensors").is_file()


def test_shared_prompt_forward_equals_one_forward_per_response():
    """Prompt once + responses on its KV cache == prompt + response per row: the same log-probs
    (DPO), last-token scores (RM) and gradients, on rows of different prompt/response lengths
    and a ranked example with three responses."""
    import torch
    from conftest import compose

    from rlhf_cli.data.batches import collate_preference
    from rlhf_cli.data.examples import load_datasets
    from rlhf_cli.model.forward import response_logps, shares_prompt
    from rlhf_cli.model.heads import ScalarHead, sequence_scores
    from rlhf_cli.model.load import load_model, load_tokenizer, resolve_device

    cfg = compose("stage=dpo", "quant=none", "peft.dropout=0", "data.max_samples=8")
    tok = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = load_model(cfg, resolve_device("cpu"), tok)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapter matter
            torch.nn.init.normal_(p, std=0.05)
    head = ScalarHead(model.config.hidden_size)
    torch.nn.init.normal_(head.linear.weight, std=0.1)
    examples, _, _ = load_datasets(cfg.data, tok, "preference", 0)
    examples = examples[:4]
    examples[1] = dict(examples[1], prompt_ids=examples[1]["prompt_ids"][:5])  # short prompt
    ranked = examples[2]["responses_ids"]
    examples[2] = dict(examples[2], responses_ids=[*ranked, ranked[0][:3]])
    assert len({len(ex["prompt_ids"]) for ex in examples}) > 1

    def run(shared: bool):
        batch = collate_preference(examples, tok.pad_token_id, tok.eos_token_id, shared)
        assert ("prompt_ids" in batch) == shared
        model.zero_grad()
        head.zero_grad()
        logps, counts = response_logps(model, batch)
        scores = sequence_scores(model, head, batch)
        (logps.sum() + scores.sum()).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return logps.detach(), counts, scores.detach(), grads + [head.linear.weight.grad.clone()]

    logps, counts, scores, grads = run(shared=False)
    s_logps, s_counts, s_scores, s_grads = run(shared=True)
    assert len(logps) == 9 and torch.equal(counts, s_counts)
    torch.testing.assert_close(s_logps, logps, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(s_scores, scores, atol=1e-5, rtol=1e-5)
    assert all(g.abs().sum() > 0 for g in grads)
    for a, b in zip(grads, s_grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    # Gradient checkpointing drops the KV cache: such a model takes the one-forward path.
    batch = collate_preference(examples, tok.pad_token_id, tok.eos_token_id, shared_prompt=True)
    assert shares_prompt(model, batch)
    from rlhf_cli.model.load import enable_checkpointing

    enable_checkpointing(model, {"use_reentrant": False})
    assert not shares_prompt(model, batch)
    torch.testing.assert_close(response_logps(model, batch)[0].detach(), logps, atol=1e-4, rtol=0)


def assert_same_training(tmp_path, stage: str, a: str, b: str) -> None:
    """Three steps of `stage` with override `a` and with `b`: the same losses (1e-5) and adapter.
    Adam divides by the root of tiny early gradients, which magnifies float summation-order
    noise in the adapter (1.6e-5 seen for rm); a misaligned or unmasked position moves the
    losses themselves."""
    common = (f"stage={stage}", *PAIRS, "train.max_steps=3", "optim.lr=2e-3", "quant=none")
    common += ("peft.dropout=0",)
    train_in_process(tmp_path / "a", *common, a)
    train_in_process(tmp_path / "b", *common, b)
    runs = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert len(runs[0]) == 3
    for x, y in zip(*runs, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
    assert max_diff(adapter(tmp_path / "a"), adapter(tmp_path / "b")) < 1e-4


@pytest.mark.parametrize("stage", ["sft", "dpo", "rm"])
def test_padding_to_a_multiple_does_not_change_training(tmp_path, stage):
    """train.pad_to_multiple_of only adds masked padding: the same training as padding to the
    longest row (64 here, so most batches get dozens of extra positions)."""
    assert_same_training(
        tmp_path, stage, "train.pad_to_multiple_of=1", "train.pad_to_multiple_of=64"
    )


@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_shared_prompt_training_equals_unshared(tmp_path, stage):
    assert_same_training(tmp_path, stage, "train.shared_prompt=true", "train.shared_prompt=false")


@pytest.mark.parametrize("loss_type", ["orpo", "simpo"])
def test_reference_free_losses_follow_their_formulas_and_learn(tmp_path, loss_type):
    """One pair per step, so each logged loss can be rebuilt from the logged rewards (scale x
    mean log-prob per response token): SimPO -log sigma(r_c - r_l - gamma) with scale beta;
    ORPO -c + lambda * -log sigma(log odds) with scale lambda. Then both learn the pairs."""
    from rlhf_cli.losses import orpo_loss, simpo_loss

    data = write_jsonl(tmp_path / "pairs.jsonl", shipped_pairs(48))
    common = ("stage=dpo", f"stage.loss_type={loss_type}")
    one_pair = (f"data.path={data}", "data.eval_size=0", "train.micro_batch_size=1")
    train_in_process(tmp_path / "one", *common, *one_pair, "train.max_steps=2")
    for row in read_metrics(tmp_path / "one"):
        if loss_type == "simpo":  # beta 2.0 (this type's default), gamma 0.5
            c, r = row["rewards/chosen"] / 2.0, row["rewards/rejected"] / 2.0
            want = simpo_loss(torch.tensor([c]), torch.tensor([r]), beta=2.0, gamma=0.5)
        else:
            c, r = row["rewards/chosen"] / 0.1, row["rewards/rejected"] / 0.1
            want = -c + orpo_loss(torch.tensor([c]), torch.tensor([r]), lam=0.1)
            assert row["nll"] == pytest.approx(-c, rel=1e-4)
        assert row["loss"] == pytest.approx(float(want[0]), rel=1e-4)
    train_in_process(tmp_path / "learn", *common, *learn_pairs(data))
    final = read_metrics(tmp_path / "learn", "eval")[-1]
    assert final["rewards/accuracies"] > 0.9, final


def test_simpo_takes_rpo_alpha(tmp_path):
    """CPO-SimPO: stage.rpo_alpha adds alpha x the chosen response's NLL (its token mean, -c) to
    SimPO; one pair per step, so each logged loss is rebuilt from the logged rewards (c =
    rewards/chosen / beta). alpha = 0.7 moves the first step's loss by 0.7 x -c (about 4.8 on the
    tiny model), far beyond the tolerance."""
    from rlhf_cli.losses import simpo_loss

    data = write_jsonl(tmp_path / "pairs.jsonl", shipped_pairs(8))
    train_in_process(
        tmp_path / "r",
        "stage=dpo",
        "stage.loss_type=simpo",
        "stage.rpo_alpha=0.7",
        f"data.path={data}",
        "data.eval_size=0",
        "train.micro_batch_size=1",
        "train.max_steps=2",
    )
    for row in read_metrics(tmp_path / "r"):
        c, r = row["rewards/chosen"] / 2.0, row["rewards/rejected"] / 2.0
        simpo = float(simpo_loss(torch.tensor([c]), torch.tensor([r]), beta=2.0, gamma=0.5)[0])
        assert row["nll"] == pytest.approx(-c, rel=1e-4)
        assert row["loss"] == pytest.approx(simpo + 0.7 * -c, rel=1e-4)


def test_reference_free_loss_types_take_no_reference(tmp_path):
    from conftest import compose

    assert compose("stage=dpo").stage.beta == 0.1
    assert compose("stage=dpo", "stage.loss_type=simpo").stage.beta == 2.0
    assert compose("stage=dpo", "stage.loss_type=simpo", "stage.beta=5").stage.beta == 5.0
    for bad, message in (
        (("stage.loss_type=orpo", "ref.precompute=true"), "uses no reference model"),
        (("stage.loss_type=orpo", "stage.rpo_alpha=1"), "ORPO has already"),
    ):
        res = rlhf("train", "stage=dpo", *bad, cwd=tmp_path)
        assert res.returncode == 2 and message in res.stderr, res.stderr


def test_kto_step0_is_half_then_it_separates_desirable_from_undesirable(tmp_path):
    """Pairs split into a desirable and an undesirable completion each. At step 0 the policy is
    the reference: r = 0 and z0 = 0, so every example costs w / 2 = 0.5. Trained, the implicit
    rewards of held-in desirable completions rise above the undesirable ones."""
    data = write_jsonl(tmp_path / "pairs.jsonl", shipped_pairs(48))
    train_in_process(
        tmp_path / "r",
        "stage=kto",
        *learn_pairs(data),
    )
    first = read_metrics(tmp_path / "r")[0]
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    final = read_metrics(tmp_path / "r", "eval")[-1]
    assert final["rewards/desirable"] - final["rewards/undesirable"] > 0.5, final
    assert final["rewards/desirable"] > 0 > final["rewards/undesirable"]


def test_kto_reads_unpaired_rows_and_resumes_exactly(tmp_path):
    from collections import Counter

    from conftest import compose

    from rlhf_cli.data.examples import Renderer, build_examples
    from rlhf_cli.model.load import load_tokenizer

    rows = [
        {"prompt": p["prompt"], "completion": p[key], "label": label}
        for p, (key, label) in zip(
            shipped_pairs(40),
            [("chosen", True), ("rejected", "false"), ("chosen", "yes"), ("rejected", 0)] * 10,
        )
    ]
    rows.append({"prompt": "Hi.", "completion": "Hello.", "label": "maybe"})
    data = write_jsonl(tmp_path / "unpaired.jsonl", rows)
    cfg = compose("stage=kto", f"data.path={data}")
    stats: Counter = Counter()
    examples, report = build_examples(
        rows, "rows", cfg.data, Renderer(load_tokenizer(cfg.model)), "unpaired", stats
    )
    assert report.fmt == "unpaired" and len(examples) == 40
    assert report.dropped == {"label 'maybe' is not true/false": 1}
    assert [ex["desirable"] for ex in examples[:4]] == [True, False, True, False]
    args = ("stage=kto", f"data.path={data}", "data.eval_size=0", "train.micro_batch_size=4")
    assert_resume_equals(tmp_path, (*args, "train.max_steps=4", "train.save_every=2"), 2)


def test_kto_reference_point_is_the_same_for_any_micro_batching(tmp_path):
    """z0 comes from the mismatched pairs of the whole step (and of the whole evaluation), so a
    step of 4 micro-batches of 1 equals one micro-batch of 4: the losses, z0 (logged as kl) and
    the evaluation on 9 examples, whose last batch of 4 holds one example. Before, a micro-batch
    of one paired its example with itself: z0 = max(0, r) and a desirable example's loss stayed
    w_d / 2; an evaluation tail of one did the same."""
    data = write_jsonl(tmp_path / "pairs.jsonl", shipped_pairs(24))
    common = (
        "stage=kto",
        f"data.path={data}",
        "data.eval_size=9",
        "quant=none",
        "optim.lr=5e-3",
        "train.max_steps=4",
        "train.eval_every=2",
    )
    train_in_process(tmp_path / "a", *common, "train.micro_batch_size=1", "train.grad_accum=4")
    train_in_process(tmp_path / "b", *common, "train.micro_batch_size=4", "train.grad_accum=1")
    for split in ("train", "eval"):
        a, b = read_metrics(tmp_path / "a", split), read_metrics(tmp_path / "b", split)
        assert len(a) == len(b) == (4 if split == "train" else 2)
        # rewards/<class>: class means over the whole step, whatever its micro-batches
        for key in ("loss", "kl", "rewards/desirable", "rewards/undesirable"):
            want = pytest.approx([y[key] for y in b], abs=1e-5)
            assert [x[key] for x in a] == want, (split, key)
    assert read_metrics(tmp_path / "b", "eval")[-1]["kl"] > 0.5  # a reference point at work


def test_eval_on_start_evaluates_the_starting_policy(tmp_path):
    """train.eval_on_start=true adds an evaluation before the first step, logged at step 0: for
    DPO from a fresh adapter the policy is the reference there, so its loss is log 2 and its
    margins 0; the end's evaluation follows as usual."""
    train_in_process(
        tmp_path / "r",
        "stage=dpo",
        *PAIRS,
        "data.eval_size=8",
        "train.max_steps=2",
        "train.eval_on_start=true",
    )
    evals = read_metrics(tmp_path / "r", "eval")
    assert [r["step"] for r in evals] == [0, 2]
    assert evals[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
