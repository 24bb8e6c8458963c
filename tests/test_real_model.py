"""A real model in the loop: SmolLM2-135M-Instruct (30 layers, GQA, 49k vocabulary, ChatML
whose template writes a newline after <|im_end|>), offline from `rlhf fetch-model smollm2-135m`
(run by `make install`). Every stage runs on it, with and without the 4-bit base."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import read_metrics, rlhf, train_in_process

REAL = "model=smollm2-135m"
# Short rows and few steps: a 4-bit step of this model is slow on a CPU.
SMALL = (
    REAL,
    "data.max_samples=8",
    "data.eval_size=0",
    "data.max_prompt_length=64",
    "data.max_length=128",
)
ONLINE = (
    "reward.fn=rlhf_cli.rewards:char_fraction",
    "stage.rollout_batch_size=2",
    "stage.group_size=2",
    "stage.max_new_tokens=8",
)


@pytest.fixture(scope="module")
def tokenizer():
    from conftest import compose

    from rlhf_cli.model.load import load_tokenizer

    return load_tokenizer(compose(REAL).model)


def test_the_preset_names_the_hub_id_and_loads_the_offline_copy(tokenizer):
    from conftest import compose

    from rlhf_cli.model.load import model_path

    cfg = compose(REAL)
    assert cfg.model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert Path(model_path(cfg.model)).is_dir()  # HF_HUB_OFFLINE=1: the converted copy
    assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) == 49152


def test_prompts_go_through_the_chat_template(tokenizer):
    from collections import Counter

    from conftest import compose

    from rlhf_cli.data.examples import Renderer, build_examples

    cfg = compose(REAL, "stage=grpo", "reward.fn=rlhf_cli.rewards:char_fraction").data
    rows = [{"prompt": "What is 2 + 2?"}]
    examples, _ = build_examples(rows, "rows", cfg, Renderer(tokenizer), "prompt", Counter())
    text = tokenizer.decode(examples[0]["prompt_ids"])
    assert text.endswith("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # the template's default system prompt


@pytest.mark.parametrize("quant", ["none", "nf4"])
@pytest.mark.parametrize(
    "stage", ["sft", "rm", "dpo", "kto", "ppo", "grpo", "rloo", "reinforce", "rs"]
)
def test_every_stage_trains_on_the_real_model(tmp_path, stage, quant):
    steps = 2 if quant == "none" else 1
    online = ("ppo", "grpo", "rloo", "reinforce")
    extra = ONLINE if stage in online else ("train.micro_batch_size=2",)
    if stage == "rs":  # a round of 2 prompts x 2 samples, the best of each kept: one step
        extra = (*ONLINE[:2], ONLINE[3], "stage.n=2", "stage.prompts_per_round=2")  # no group_size
        extra += (f"stage.rounds={steps}", "train.micro_batch_size=2")
    args = (f"stage={stage}", *SMALL, f"quant={quant}", f"train.max_steps={steps}", *extra)
    train_in_process(tmp_path / "r", *args, "optim.lr=1e-3")
    rows = read_metrics(tmp_path / "r")
    assert len(rows) == steps and all(math.isfinite(r["loss"]) for r in rows)
    first = rows[0]
    if stage == "dpo":  # policy == reference at step 0, default dropout included
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    if stage == "kto":  # r = 0 and z0 = 0 at step 0: every example costs 1/2
        assert first["loss"] == pytest.approx(0.5, abs=1e-5)
    if stage == "rm":  # a zero-initialised head scores everything 0
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    if stage in online:
        assert first["kl"] == pytest.approx(0.0, abs=1e-5)
        assert first["policy/ratio_first"] == pytest.approx(1.0, abs=1e-4)
    if stage == "rs":  # the kept answers of the round file are what the step trained on
        from rlhf_cli.stages.rs import read_rows

        rows = read_rows(tmp_path / "r" / "rounds" / "round-1.jsonl")
        assert len(rows) == 2 and all(sum(x["kept"] for x in r["samples"]) == 1 for r in rows)
        assert first["round"] == 1 and first["round/kept_score"] >= first["round/score"]
    assert (tmp_path / "r" / "final" / "adapter_model.safetensors").is_file()


def test_the_online_options_compose_on_the_real_model(tmp_path, monkeypatch):
    """Dynamic sampling, two weighted rewards, Dr. GRPO's aggregation, clip-higher, sequence
    ratios and overlong masking in one 4-bit run: each shows in the metrics, and in the
    TensorBoard and (offline) W&B logs, with the real model's samples."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from test_tracking import tensorboard_events, wandb_run

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    train_in_process(
        tmp_path / "r",
        "stage=grpo",
        *SMALL,
        "quant=nf4",
        "train.max_steps=2",
        "reward.fns=[rlhf_cli.rewards:char_fraction,rlhf_cli.rewards:concise]",
        "reward.weights=[2.0,0.5]",
        "+reward.kwargs.words=3",
        *ONLINE[1:],
        "stage.dynamic_sampling=true",
        "stage.dynamic_sampling_max_tries=2",
        "stage.loss_agg=seq_sum_norm",
        "stage.scale_rewards=false",
        "stage.clip_eps_high=0.28",
        "stage.importance_level=sequence",
        "stage.mask_truncated=true",
        "optim.lr=1e-3",
        "log.tensorboard=true",
        "log.wandb=true",
        "log.wandb_mode=offline",
    )
    rows = read_metrics(tmp_path / "r")
    assert len(rows) == 2
    for r in rows:
        assert r["dynamic/tries"] in (1.0, 2.0) and 0 <= r["dynamic/filled"] <= 1
        expected = 2.0 * r["rewards/char_fraction"] + 0.5 * r["rewards/concise"]
        assert r["score"] == pytest.approx(expected, rel=1e-5)
        assert math.isfinite(r["loss"]) and r["nonfinite_rewards"] == 0
    acc = tensorboard_events(tmp_path / "r")
    for key in ("score", "rewards/concise", "dynamic/filled"):
        points = [(e.step, e.value) for e in acc.Scalars(f"train/{key}")]
        assert points == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows]
    table = acc.Tensors("samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert table.splitlines()[0] == "| prompt | response | score |" and len(table.splitlines()) == 6
    # The model card names the hub id of the real base (not the offline copy's path).
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "r" / "final" / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.library_name == "peft" and "grpo" in card.data.tags
    (run_file,) = (tmp_path / "r" / "wandb").glob("offline-run-*/run-*.wandb")
    run, history = wandb_run(run_file)
    assert run["config"]["model"]["name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    logged = [h for h in history if "train/score" in h]
    assert [(h["step"], h["train/score"]) for h in logged] == [
        (r["step"], pytest.approx(r["score"])) for r in rows
    ]


def test_kto_separates_desirable_from_undesirable_on_the_real_model(tmp_path):
    """8 shipped pairs, split into 8 desirable and 8 undesirable answers: trained on them, the
    implicit rewards of the desirable answers rise above those of the undesirable ones (at
    step 0 both are 0 and every example costs 1/2)."""
    train_in_process(
        tmp_path / "r",
        "stage=kto",
        *SMALL,
        "quant=none",
        "train.max_steps=6",
        "train.micro_batch_size=8",
        "optim.lr=1e-3",
    )
    rows = read_metrics(tmp_path / "r")
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-5)
    assert rows[0]["rewards/desirable"] == pytest.approx(0.0, abs=1e-5)
    last = rows[-1]
    assert last["rewards/desirable"] - last["rewards/undesirable"] > 0.5, rows
    assert last["loss"] < 0.4


@pytest.mark.parametrize("loss_type", ["orpo", "simpo"])
def test_reference_free_dpo_losses_train_on_the_real_model(tmp_path, loss_type):
    args = ("stage=dpo", f"stage.loss_type={loss_type}", *SMALL, "quant=none")
    train_in_process(tmp_path / "r", *args, "train.max_steps=2", "train.micro_batch_size=2")
    rows = read_metrics(tmp_path / "r")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["rewards/chosen"] < 0  # scale x mean log-prob per token


def online_rm_score(model, head, reward_tok, policy_tok, prompt, response) -> float:
    """The score the online stages give one rollout (a separately loaded reward model)."""
    from rlhf_cli.trainer.online import OnlineStage

    stage = SimpleNamespace(
        tokenizer=policy_tok,
        reward_tokenizer=reward_tok,
        reward_model=model,
        reward_head=head,
        reward_adapter=None,
        cfg=SimpleNamespace(reward=SimpleNamespace(batch_size=4)),
        device=torch.device("cpu"),
        amp_dtype=None,
    )
    rollout = SimpleNamespace(prompts=[prompt], responses=[response])
    return OnlineStage._model_scores(stage, rollout).item()


def eval_rm_score(model, head, reward_tok, policy_tok, prompt, response) -> float:
    """The score `rlhf eval`'s reward-model scorer gives one sample."""
    from rlhf_cli.tools.evaluate import RewardModelScorer

    scorer = RewardModelScorer.__new__(RewardModelScorer)  # the loaded model, not a path
    scorer.model, scorer.head, scorer.tokenizer, scorer.amp = model, head, reward_tok, None
    scorer.policy = SimpleNamespace(tokenizer=policy_tok, device=torch.device("cpu"))
    scorer.batch_size = 4
    return scorer([prompt], [response])[0]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A LoRA SFT run of a few steps at a high rate: an adapter that changes the answers."""
    run = tmp_path_factory.mktemp("real") / "sft"
    train_in_process(
        run,
        "stage=sft",
        *SMALL,
        "quant=none",
        "train.max_steps=4",
        "train.micro_batch_size=2",
        "optim.lr=1e-2",
    )
    return run


def test_greedy_answers_stop_at_im_end_and_equal_the_merged_models(sft_run, tmp_path):
    from rlhf_cli.rollout.engine import generation_config
    from rlhf_cli.tools.merge import merge
    from rlhf_cli.tools.policy import generate, load_policy, prompt_examples
    from rlhf_cli.tools.sample import sample

    question = "What is the capital of France?"
    policy = load_policy(sft_run, "cpu")
    ids = prompt_examples(policy, text=question)[0]["prompt_ids"]
    response = generate(policy, [ids], generation_config(policy.tokenizer, 48), 1)[0]
    assert response[-1] == policy.tokenizer.eos_token_id  # stopped at <|im_end|>
    assert policy.tokenizer.eos_token_id not in response[:-1]

    merge(str(sft_run), str(tmp_path / "merged"))
    run_rows = sample(str(sft_run), prompt=question, max_new_tokens=48)
    merged_rows = sample(str(tmp_path / "merged"), prompt=question, max_new_tokens=48)
    assert run_rows == merged_rows and run_rows[0]["ended"]
    with policy.model.disable_adapter():
        base_response = generate(policy, [ids], generation_config(policy.tokenizer, 48), 1)[0]
    assert base_response != response  # the adapter changed the answer: the equality means much


def test_a_response_gets_one_score_through_training_score_online_and_eval(tmp_path):
    """ChatML ends each turn with <|im_end|> then a newline. The reward model reads the
    <|im_end|> position in training (the collate), in `rlhf score`, in online scoring (ppo/
    grpo/rloo with reward.model) and in `rlhf eval`: one prompt + response, four equal scores."""
    from rlhf_cli.data.examples import load_datasets
    from rlhf_cli.model.heads import load_reward_model, sequence_scores
    from rlhf_cli.stages.rm import RMStage
    from rlhf_cli.tools.score import score_file

    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I would rather not."},
        {"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "No."},
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "rm"
    common = (REAL, "quant=none", f"data.path={pairs}", "data.eval_size=0")
    train_in_process(
        run, "stage=rm", *common, "train.max_steps=2", "train.micro_batch_size=2", "optim.lr=1e-2"
    )
    device = torch.device("cpu")
    model, head, tok, cfg = load_reward_model(run, device)
    example = load_datasets(cfg.data, tok, "preference", 0)[0][0]
    prompt, chosen = example["prompt_ids"], example["responses_ids"][0]
    assert tok.decode(chosen).endswith("<|im_end|>\n")  # what the template writes
    generated = chosen[: chosen.index(tok.eos_token_id) + 1]  # where sampling stops

    # 1. training: the stage's own collate and forward
    stage = SimpleNamespace(cfg=cfg, tokenizer=tok, pack=None, slices=False)  # padded
    batch = RMStage.collate(stage, [example])
    with torch.no_grad():
        trained = sequence_scores(model, head, batch)[batch["index"][0, 0]].item()
    # 2. rlhf score on the data file
    out = tmp_path / "scores.jsonl"
    score_file(str(run), str(pairs), out=str(out), device="cpu")
    scored = json.loads(out.read_text().splitlines()[0])["scores"][0]
    # 3. online scoring of a rollout with that response (a separately loaded reward model)
    online_score = online_rm_score(model, head, tok, tok, prompt, generated)
    # 4. rlhf eval's reward-model scorer, for a policy on the same base
    evaluated = eval_rm_score(model, head, tok, tok, prompt, generated)

    assert trained != pytest.approx(0.0, abs=1e-3)  # the head learned something
    for value in (scored, online_score, evaluated):
        assert value == pytest.approx(trained, abs=1e-4)


def test_dpo_runs_from_the_cli_offline(tmp_path):
    res = rlhf(
        "train",
        "stage=dpo",
        *SMALL,
        "quant=none",
        "train.max_steps=1",
        "train.micro_batch_size=2",
        f"run_dir={tmp_path / 'r'}",
        cwd=tmp_path,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in res.stdout + res.stderr
    assert read_metrics(tmp_path / "r")[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_without_the_offline_copy_a_run_names_the_command_that_fetches_it(tmp_path):
    import os

    env = {**os.environ, "RLHF_CLI_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    env["HF_HOME"] = str(tmp_path / "hf")  # no hub cache either
    res = rlhf("train", "stage=dpo", REAL, cwd=tmp_path, env=env)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "rlhf fetch-model smollm2-135m" in lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.safetensors"))


def test_a_reward_model_with_another_vocabulary_reads_the_same_text_online_and_in_eval(
    tmp_path, tokenizer
):
    """A tiny reward model (its own BPE vocabulary) scoring SmolLM2's samples: online scoring
    and `rlhf eval` re-encode the same text, the policy's chat markup dropped."""
    from rlhf_cli.model.heads import load_reward_model, scoring_examples

    train_in_process(
        tmp_path / "rm", "stage=rm", "data.eval_size=0", "train.max_steps=2", "optim.lr=1e-2"
    )
    device = torch.device("cpu")
    model, head, rtok, _ = load_reward_model(tmp_path / "rm", device)
    assert rtok.get_vocab() != tokenizer.get_vocab()
    chat = [{"role": "user", "content": "Name a colour."}]
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    response = tokenizer("Blue, like the sea.")["input_ids"] + [tokenizer.eos_token_id]
    example = scoring_examples([prompt], [response], tokenizer, rtok)[0]
    text = rtok.decode(example["responses_ids"][0])
    assert "<|im_start|>" not in text and "Name a colour." in text and "Blue, like" in text

    online_score = online_rm_score(model, head, rtok, tokenizer, prompt, response)
    evaluated = eval_rm_score(model, head, rtok, tokenizer, prompt, response)
    assert evaluated == pytest.approx(online_score, abs=1e-6)
    assert online_score != pytest.approx(0.0, abs=1e-4)


def test_the_benchmark_rows_are_what_both_tools_feed_the_model(tokenizer):
    """scripts/bench.py (its settings, models and data: bench_common.py) on the real model: its
    parameter count (the FLOP estimate) is the published 134,515,008, and each conversational pair becomes, in our pipeline, exactly the
    tokens of the chat template rendered over prompt + response (what TRL tokenizes), EOS
    (<|im_end|>) included."""
    import importlib.util
    from collections import Counter

    from conftest import compose

    from rlhf_cli.data.examples import Renderer, build_examples

    spec = importlib.util.spec_from_file_location(
        "bench_common", Path(__file__).resolve().parent.parent / "scripts" / "bench_common.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.total_params("smollm2") == 134_515_008
    assert bench.linear_params("smollm2", with_lm_head=False) == 106_168_320

    files = bench.real_data_files(6)
    rows = [json.loads(line) for line in files["pairs"].read_text().splitlines()]
    assert len(rows) == 6 and rows[0]["prompt"][0]["role"] == "user"
    cfg = compose(REAL, "stage=dpo").data
    examples, _ = build_examples(rows, "rows", cfg, Renderer(tokenizer), "preference", Counter())
    for row, ex in zip(rows, examples):
        for key, ids in zip(("chosen", "rejected"), ex["responses_ids"]):
            text = tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=False)
            want = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert ex["prompt_ids"] + ids == want
            assert tokenizer.eos_token_id in ids[-2:]


def test_a_conversation_between_replies_is_what_chatml_writes(tokenizer):
    """After a reply's <|im_end|> the template writes a newline, the message's turn and the
    next assistant header: those are the tokens a multi-turn rollout puts between replies."""
    from rlhf_cli.data.examples import Renderer
    from rlhf_cli.multiturn import observation_ids

    renderer = Renderer(tokenizer)
    ids = observation_ids(renderer, {"role": "tool", "content": "42"}, tokenizer.eos_token)
    assert tokenizer.decode(ids) == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
    ids = observation_ids(
        renderer, {"role": "user", "content": "Calculator: 2 + 2 = 4."}, "<|im_end|>"
    )
    assert tokenizer.decode(ids).startswith("\n<|im_start|>user\nCalculator: 2 + 2 = 4.<|im_end|>")


def test_grpo_with_the_calculator_environment_on_the_real_model(tmp_path):
    """The shipped arithmetic task: SmolLM2 writes the calculation unprompted, the calculator
    answers, the second reply is scored against the answer column. One 4-bit step: the
    conversations have two replies where the first wrote a calculation."""
    train_in_process(
        tmp_path / "r",
        "stage=grpo",
        REAL,
        "data=arithmetic",
        "data.max_samples=16",
        "data.eval_size=0",
        "stage.env=rlhf_cli.multiturn:CalculatorEnv",
        "stage.max_turns=2",
        "reward.fn=rlhf_cli.rewards:math_answer",
        "stage.rollout_batch_size=2",
        "stage.group_size=2",
        "stage.max_new_tokens=24",
        "train.max_steps=1",
        "log.tensorboard=true",
    )
    (row,) = read_metrics(tmp_path / "r")
    assert 0 <= row["score"] <= 1 and math.isfinite(row["loss"])
    assert row["policy/ratio_first"] == pytest.approx(1.0, abs=1e-4)
    assert 1 < row["turns"] <= 2  # most first replies wrote a calculation


def test_packed_training_equals_padded_on_the_real_model(tmp_path):
    """SmolLM2 (GQA, 30 layers, tied embeddings, ChatML): two DPO steps with train.packing
    (the default varlen attention; mask and slices are compared on the tiny model) equal the
    padded run."""
    args = ("stage=dpo", *SMALL, "quant=none", "train.max_steps=2", "train.micro_batch_size=4")
    args += ("optim.lr=1e-3", "peft.dropout=0", "data.max_length=256")
    train_in_process(tmp_path / "padded", *args)
    runs = [read_metrics(tmp_path / "padded")]
    for mode in ("varlen",):
        extra = ("train.packing=true", f"train.packing_attention={mode}")
        train_in_process(tmp_path / mode, *args, *extra)
        runs.append(read_metrics(tmp_path / mode))
    for rows in runs[1:]:
        assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in runs[0]], abs=1e-5)
        assert [r["grad_norm"] for r in rows] == pytest.approx(
            [r["grad_norm"] for r in runs[0]], rel=1e-4
        )
        assert all(p["padding"] < q["padding"] for p, q in zip(rows, runs[0]))
