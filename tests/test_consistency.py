"""The same number through every path: generation without the model's generation_config, each
family's logit transform in every log-prob path, dropout off in DPO and online updates, eval
modes restored, empty prompts, RLOO's KL estimator, gradient checkpointing in online updates."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import compose, read_metrics, train_in_process
from test_stages import PAIRS, shipped_pairs, write_jsonl

from rlhf_cli.core.errors import UserError


def greedy_by_hand(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens from plain forwards: argmax of the model's own logits, nothing else."""
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x[0, len(ids) :].tolist()


def test_generation_ignores_the_models_generation_config(tmp_path):
    """A model whose generation_config.json sets repetition_penalty / no_repeat_ngram_size:
    `rlhf sample` (and every rollout, through rollout.engine.generate_ids) still decodes from the
    model's own distribution."""
    from transformers import AutoModelForCausalLM

    from rlhf_cli.model.tiny import tiny_model_dir
    from rlhf_cli.rollout.engine import generate_ids, generation_config
    from rlhf_cli.tools.policy import load_policy, prompt_examples
    from rlhf_cli.tools.sample import sample

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), model_dir)
    (model_dir / "generation_config.json").write_text(
        json.dumps(
            {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "top_k": 3, "eos_token_id": 2}
        )
    )
    policy = load_policy(model_dir, "cpu")
    assert policy.model.generation_config.repetition_penalty == 1.3  # the file was read
    prompt = prompt_examples(policy, text="Tell me about the film.")[0]["prompt_ids"]
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir()).eval()
    expected = greedy_by_hand(plain, prompt, 12)
    assert len(expected) != len(set(expected))  # it repeats: a penalty would change the answer
    ids = torch.tensor([prompt])
    config = generation_config(policy.tokenizer, 12)
    out = generate_ids(policy.model, ids, torch.ones_like(ids), config)[0, len(prompt) :]
    assert out.tolist() == expected
    assert policy.model.generation_config.repetition_penalty == 1.3  # restored afterwards
    rows = sample(str(model_dir), prompt="Tell me about the film.", max_new_tokens=12)
    eos = policy.tokenizer.eos_token_id
    text = policy.tokenizer.decode([t for t in expected if t != eos], skip_special_tokens=True)
    assert rows[0]["response"] == text.strip()


# ---------------------------------------------------------------------------------------------
# logit transforms


FAMILIES = {
    # model_type: settings that make its transform bite (None: no transform)
    "llama": {},
    "gemma2": {"final_logit_softcapping": 3.0, "head_dim": 16},
    "cohere": {"logit_scale": 0.3},
    "granite": {"logits_scaling": 4.0},
    "falcon_h1": {"lm_head_multiplier": 0.5, "mamba_d_ssm": 32, "mamba_n_heads": 2,
                  "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_d_state": 8},
    "gpt2": {},  # a family the table does not know: log-probs from its own forward
}  # fmt: skip


def tiny_family(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        n_embd=32,
        n_layer=2,
        n_head=2,
    )
    config = AutoConfig.for_model(model_type, **sizes, **FAMILIES[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # logits of a few units, so that soft-capping and scales matter
        model.get_output_embeddings().weight.normal_(std=1.0)
    return model


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_logps_equal_log_softmax_of_the_models_own_logits(model_type):
    """labelled_logps (offline stages, both layouts) and the online forward give
    log_softmax(model(...).logits) at the labelled tokens, whatever the family does to its
    logits after the LM head."""
    from rlhf_cli.data.batches import collate_preference
    from rlhf_cli.losses import IGNORE_INDEX, token_logps
    from rlhf_cli.model.forward import labelled_logps, own_logits
    from rlhf_cli.trainer.online import OnlineStage

    model = tiny_family(model_type)
    assert own_logits(model) == (model_type == "gpt2")
    g = torch.Generator().manual_seed(1)
    examples = [
        {
            "prompt_ids": torch.randint(3, 96, (p,), generator=g).tolist(),
            "responses_ids": [torch.randint(3, 96, (r,), generator=g).tolist() for r in (5, 3)],
            "margin": None,
        }
        for p in (4, 6)
    ]
    plain = collate_preference(examples, 0)
    with torch.no_grad():
        logits = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits
        expected, mask = token_logps(logits, plain["labels"], IGNORE_INDEX)
        expected = expected[mask]
        # The transform moves log-probs by far more than the tolerance (a missing one fails).
        raw = model.get_output_embeddings()(
            model(input_ids=plain["input_ids"], output_hidden_states=True).hidden_states[-1]
        )
        if FAMILIES[model_type]:
            assert (torch.log_softmax(raw, -1) - torch.log_softmax(logits, -1)).abs().max() > 0.1
        got, _ = labelled_logps(model, plain)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        if model_type not in ("falcon_h1", "gpt2"):  # no KV cache to share / another cache
            shared = collate_preference(examples, 0, shared_prompt=True)
            got, _ = labelled_logps(model, shared)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)

        # Online: left-padded prompts of one width, responses after them.
        prompt_len = 6
        rows = [[0] * (prompt_len - len(ex["prompt_ids"])) + ex["prompt_ids"] for ex in examples]
        ids = torch.tensor([r + ex["responses_ids"][1] for r, ex in zip(rows, examples)])
        attn = (torch.arange(ids.shape[1]) >= torch.tensor([[2], [0]])).long()
        stage = SimpleNamespace(
            cfg=SimpleNamespace(stage=SimpleNamespace(temperature=0.7)),
            value_head=None,
            pack=None,  # padded rows (train.packing off)
        )
        batch = {"input_ids": ids, "attention_mask": attn}
        from rlhf_cli.trainer import online

        full = model(
            input_ids=ids, attention_mask=attn, position_ids=online.position_ids(attn)
        ).logits
        log_probs = torch.log_softmax(full[:, prompt_len - 1 : -1].float() / 0.7, -1)
        want = log_probs.gather(-1, ids[:, prompt_len:, None]).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        # The LM head one row at a time and the whole batch at once give the same numbers.
        for tokens in (1, 10**6):
            saved, online.LOGIT_TOKENS = online.LOGIT_TOKENS, tokens
            try:
                logps, _, got_entropy = OnlineStage.forward(
                    stage, model, batch, prompt_len, with_entropy=True
                )
            finally:
                online.LOGIT_TOKENS = saved
            torch.testing.assert_close(logps, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_entropy, entropy, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "model_type, trained_head, precision",
    [
        ("llama", False, "fp32"),  # frozen plain head: the gradient computed in the forward
        ("llama", False, "bf16"),
        ("llama", True, "fp32"),  # a trained head: chunks recomputed in the backward
        ("gemma2", False, "fp32"),  # a logit transform (soft-capping): recomputed too
    ],
)
def test_chunked_head_logps_equal_whole_logits_with_gradients(
    model_type, trained_head, precision, monkeypatch
):
    """head_logps, 3 rows a chunk or all at once, gives the log-probs and the gradients (hidden
    states, and a trained head's weight) of log_softmax over the whole (n, vocab) logits; each
    row's gradient is scaled by its own incoming gradient; and nothing of size vocab is kept
    for the backward."""
    from rlhf_cli.model import forward
    from rlhf_cli.model.forward import head_logps, lm_logits

    model = tiny_family(model_type)
    head = model.get_output_embeddings()
    head.weight.requires_grad_(trained_head)
    vocab = head.weight.shape[0]
    g = torch.Generator().manual_seed(3)
    hidden0 = torch.randn(7, head.weight.shape[1], generator=g)
    targets = torch.randint(0, vocab, (7,), generator=g)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25, 2.0])  # d loss / d logp_i
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def run(fn):
        hidden = hidden0.clone().requires_grad_(True)
        head.weight.grad = None
        with autocast:
            logps = fn(hidden)
        (logps * weights).sum().backward()
        return logps.detach(), hidden.grad, head.weight.grad

    def whole(hidden):
        logits = lm_logits(model, hidden).float()
        return torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)

    want = run(whole)
    assert (want[1].abs().sum(-1) > 0).all()
    tol = dict(atol=2e-2, rtol=2e-2) if precision == "bf16" else dict(atol=1e-5, rtol=1e-5)
    for chunk in (3, 1024):
        monkeypatch.setattr(forward, "HEAD_CHUNK", chunk)
        saved_shapes: list[tuple] = []

        def chunked(hidden, shapes=saved_shapes):
            def pack(t):
                shapes.append(tuple(t.shape))
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                return head_logps(model, hidden, targets)

        got = run(chunked)
        torch.testing.assert_close(got[0], want[0], **tol)
        torch.testing.assert_close(got[1], want[1], **tol)
        if trained_head:
            torch.testing.assert_close(got[2], want[2], **tol)
        assert not any(shape and shape[-1] == vocab for shape in saved_shapes), saved_shapes
        with torch.no_grad(), autocast:  # no gradient wanted: the same numbers
            torch.testing.assert_close(head_logps(model, hidden0, targets), want[0], **tol)


def test_a_frozen_heads_weight_is_cast_once_per_call_under_autocast(monkeypatch):
    """Under bf16 autocast the frozen head's weight is cast to bf16 once per head_logps call,
    not once per chunk (autocast caches no cast of a weight without a gradient, so F.linear on
    the fp32 weight cast it again for each of the 3 chunks here: 4 casts, the gradient's
    included)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from rlhf_cli.model import forward
    from rlhf_cli.model.forward import head_logps

    model = tiny_family("llama")
    weight = model.get_output_embeddings().weight.requires_grad_(False)  # frozen, as with LoRA
    hidden = torch.randn(7, weight.shape[1], requires_grad=True)
    targets = torch.randint(0, weight.shape[0], (7,))
    casts = []

    class CountCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].shape == weight.shape:
                casts.append(kwargs.get("dtype"))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(forward, "HEAD_CHUNK", 3)
    with torch.autocast("cpu", dtype=torch.bfloat16), CountCasts():
        head_logps(model, hidden, targets)
    assert casts == [torch.bfloat16]


# ---------------------------------------------------------------------------------------------
# dropout and modes


@pytest.mark.slow
def test_dpo_step0_is_log2_from_an_sft_adapter_with_default_dropout(tmp_path):
    """peft.dropout keeps its default (0.05): DPO turns dropout off, so the policy (the SFT
    adapter, training) and its reference (a frozen copy) compute the same log-probs at step 0.
    stage.dropout=true keeps dropout, and then they differ."""
    cfg = compose("stage=dpo")
    assert cfg.peft.dropout > 0
    train_in_process(
        tmp_path / "sft", "stage=sft", "data.eval_size=0", "train.max_steps=10", "optim.lr=3e-3"
    )
    common = ("stage=dpo", *PAIRS, "train.max_steps=1", f"model.adapter={tmp_path / 'sft'}")
    train_in_process(tmp_path / "dpo", *common)
    assert read_metrics(tmp_path / "dpo")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    train_in_process(tmp_path / "kept", *common, "stage.dropout=true", "peft.dropout=0.3")
    assert abs(read_metrics(tmp_path / "kept")[0]["loss"] - math.log(2)) > 1e-3


def test_eval_mode_restores_each_modules_previous_mode():
    from rlhf_cli.model.load import eval_mode

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model.train()
    with eval_mode(model):
        with eval_mode(model):
            pass
        assert not model.training and not model[1].training  # the outer eval holds
    assert model.training and model[1].training
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training  # a model in eval mode stays there


def test_two_dpo_evals_with_dropout_give_the_same_numbers(tmp_path):
    """The eval runs its policy and its reference in eval mode for every batch (the nested
    reference context used to switch training mode back on after the first batch)."""
    from rlhf_cli.data.examples import load_datasets
    from rlhf_cli.model.load import load_model, load_tokenizer, resolve_device
    from rlhf_cli.stages.dpo import DPOStage
    from rlhf_cli.trainer.loop import evaluate

    cfg = compose("stage=dpo", "quant=none", "stage.dropout=true", "peft.dropout=0.5")
    tok = load_tokenizer(cfg.model)
    device = resolve_device("cpu")
    model = load_model(cfg, device, tok)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a non-zero adapter, so that dropout on its input matters
            torch.nn.init.normal_(p, std=0.05)
    stage = DPOStage(cfg, model, tok, device, None)
    examples = load_datasets(cfg.data, tok, "preference", 0)[0][:12]
    model.train()
    first = evaluate(stage, examples, batch_size=4, max_batches=None)
    second = evaluate(stage, examples, batch_size=4, max_batches=None)
    assert first == second
    assert model.training  # back in training mode after the eval


def test_online_updates_run_in_train_mode_and_checkpoint(tmp_path, monkeypatch):
    """Dropout is off in the online stages, and the updates run in train mode, so gradient
    checkpointing recomputes each decoder layer in the backward (one more layer call per
    micro-batch); without it the layer runs once."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    from rlhf_cli.data.examples import load_datasets
    from rlhf_cli.model.load import load_model, load_tokenizer, resolve_device, trainable_parameters
    from rlhf_cli.stages import stage_class
    from rlhf_cli.trainer.loop import Updater
    from rlhf_cli.trainer.state import Position, make_optimizer

    def layer_calls_with_grad(checkpointing: bool) -> int:
        cfg = compose(
            "stage=grpo",
            "reward.fn=rlhf_cli.rewards:char_fraction",
            "stage.rollout_batch_size=4",
            "stage.group_size=2",
            "stage.max_new_tokens=6",
            "train.micro_batch_size=4",
            f"train.gradient_checkpointing={str(checkpointing).lower()}",
        )
        tok = load_tokenizer(cfg.model)
        device = resolve_device("cpu")
        torch.manual_seed(0)
        model = load_model(cfg, device, tok)
        stage = stage_class("grpo")(cfg, model, tok, device, None)
        assert all(m.p == 0 for m in model.modules() if hasattr(m, "p"))  # dropout off
        params = trainable_parameters(model)
        optimizer = make_optimizer(params, cfg.optim)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        updater = Updater(params, optimizer, scheduler, cfg, Position())
        calls = []
        # Every decoder layer's MLP, counted through its class (module hooks do not fire in
        # the backward's recompute; the forward method runs all the same).
        forward = LlamaMLP.forward

        def counted(self, x):
            calls.append(torch.is_grad_enabled())
            return forward(self, x)

        monkeypatch.setattr(LlamaMLP, "forward", counted)
        examples = load_datasets(cfg.data, tok, "prompt", 0)[0][:4]
        stage.train_step(examples, updater)
        monkeypatch.setattr(LlamaMLP, "forward", forward)
        return sum(calls)

    # 8 sequences in 2 micro-batches of 4, 2 layers: 4 MLP calls with grad, 8 with the
    # recompute (rollout and scoring run without grad).
    assert layer_calls_with_grad(False) == 4
    assert layer_calls_with_grad(True) == 8


# ---------------------------------------------------------------------------------------------
# data edge cases and small options


def test_empty_prompt_rows_take_the_plain_layout():
    """A row without a prompt has no position that predicts its first response token from a
    prompt: a shared-prompt batch with such a row is collated in the plain layout, and gives the
    plain forward's log-probs."""
    from rlhf_cli.data.batches import collate_preference
    from rlhf_cli.model.forward import labelled_logps

    model = tiny_family("llama")
    examples = [
        {"prompt_ids": [], "responses_ids": [[5, 6, 7], [8, 9]], "margin": None},
        {"prompt_ids": [10, 11], "responses_ids": [[12, 13], [14]], "margin": None},
    ]
    shared = collate_preference(examples, 0, shared_prompt=True)
    assert "prompt_ids" not in shared
    with torch.no_grad():
        got = labelled_logps(model, shared)[0]
        want = labelled_logps(model, collate_preference(examples, 0))[0]
    torch.testing.assert_close(got, want)
    assert "prompt_ids" in collate_preference(examples[1:], 0, shared_prompt=True)


def test_label_smoothing_on_ranked_data_is_refused(tmp_path):
    rows = [
        {"prompt": r["prompt"], "responses": [r["chosen"], "Not sure.", r["rejected"]]}
        for r in shipped_pairs(16)
    ]
    data = write_jsonl(tmp_path / "ranked.jsonl", rows)
    with pytest.raises(UserError, match="set stage.label_smoothing=0"):
        train_in_process(
            tmp_path / "r",
            "stage=dpo",
            f"data.path={data}",
            "data.eval_size=0",
            "train.max_steps=1",
            "stage.label_smoothing=0.1",
        )


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_rloo_penalises_with_its_kl_estimator(estimator):
    """Two responses of one prompt, scores 1 and 0, kl_coef 1. Log-ratios (logp - ref) per
    token: response 0: [0.5, -0.5], response 1: [1.0, pad]. Sequence KL per estimator:
    k1: 0.0 and 1.0; k2 (d^2/2 with d = logp - ref): 0.25 and 0.5; k3 (e^r - 1 - r with
    r = ref - logp): (e^-0.5 - 0.5) + (e^0.5 - 1.5) = 0.2552519 and e^-1 = 0.3678794.
    RLOO advantage of response 0 = its penalised reward minus the other's."""
    from rlhf_cli.stages.rloo import RLOOStage

    logps = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    ref = torch.tensor([[-1.5, -1.5], [-1.5, -1.0]])
    mask = torch.tensor([[True, True], [True, False]])
    seq_kl = {"k1": (0.0, 1.0), "k2": (0.25, 0.5), "k3": (0.2552519, 0.3678794)}[estimator]
    stage = SimpleNamespace(
        cfg=SimpleNamespace(stage=SimpleNamespace(kl_estimator=estimator, group_size=2)),
        kl_coef=1.0,
    )
    old = {"logps": logps, "ref_logps": ref}
    RLOOStage.advantages(stage, SimpleNamespace(mask=mask), torch.tensor([1.0, 0.0]), old)
    r0, r1 = 1.0 - seq_kl[0], 0.0 - seq_kl[1]
    torch.testing.assert_close(old["advantages"], torch.tensor([r0 - r1, r1 - r0]))
