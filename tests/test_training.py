"""The loop, checkpoints and SFT stage, on the tiny model: learning, invariants, resume."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    FAST,
    REPO,
    adapter,
    assert_resume_equals,
    max_diff,
    read_metrics,
    rlhf,
    train_in_process,
)

from rlhf_cli.core.errors import CheckpointError, TrainingError
from rlhf_cli.trainer import checkpoint as ckpt_lib


def test_sft_learns_and_lora_weights_move(tmp_path):
    rows = train_in_process(
        tmp_path / "run",
        "train.max_steps=30",
        "optim.lr=3e-3",
        "data.eval_size=0.1",
        "train.eval_every=10",
        "train.save_every=0",
    )
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    evals = [r["loss"] for r in read_metrics(tmp_path / "run", "eval")]
    assert len(losses) == 30 and len(evals) == 3  # eval at 10, 20 and the end
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert evals[-1] < evals[0]
    weights = adapter(tmp_path / "run")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero
    assert rows["skipped steps"] == 0
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.yaml", "metrics.jsonl", "checkpoints", "final"} <= files


def test_default_loads_4bit_nf4_base_with_lora(tmp_path):
    from conftest import compose

    from rlhf_cli.config import Config
    from rlhf_cli.model.load import load_model, load_tokenizer, resolve_device

    cfg: Config = compose()
    assert (cfg.quant.mode, cfg.peft.method) == ("nf4", "lora")
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg, resolve_device("cpu"), tok)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in kinds  # bitsandbytes 4-bit layers carry the LoRA adapters
    quant = next(m for m in model.modules() if type(m).__name__ == "Linear4bit")
    assert quant.weight.quant_state.quant_type == "nf4"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("quant,tol", [("none", 1e-5), ("nf4", 2e-3)])
def test_accumulation_1x8_equals_8x1(tmp_path, quant, tol):
    common = (
        "train.max_steps=3",
        "data.max_samples=64",
        "data.eval_size=0",
        "peft.dropout=0",
        f"quant={quant}",
        "optim.lr=1e-3",
        "train.save_every=0",
    )
    train_in_process(tmp_path / "big", *common, "train.micro_batch_size=8", "train.grad_accum=1")
    train_in_process(tmp_path / "acc", *common, "train.micro_batch_size=1", "train.grad_accum=8")
    big, acc = read_metrics(tmp_path / "big"), read_metrics(tmp_path / "acc")
    for a, b in zip(big, acc):
        assert a["loss"] == pytest.approx(b["loss"], abs=tol)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=10 * tol)
    assert max_diff(adapter(tmp_path / "big"), adapter(tmp_path / "acc")) < tol


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    args = (
        "train.max_steps=8",
        "train.save_every=4",
        "train.keep_last=5",
        "optim.lr=2e-3",
        "data.max_samples=96",
        "data.eval_size=0",
    )
    _, resumed = assert_resume_equals(tmp_path, args, last_step=4)
    assert [r["step"] for r in resumed] == list(range(1, 9))  # metrics past step 4 rewritten once


def test_sigterm_saves_and_resume_matches_uninterrupted(tmp_path):
    args = [
        "train.max_steps=40",
        "train.save_every=100",
        "optim.lr=2e-3",
        "data.eval_size=0",
        "train.micro_batch_size=8",
    ]
    train_in_process(tmp_path / "full", *args)
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf_cli", "train", f"run_dir={run_dir}", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.1)
    time.sleep(0.5)  # a few steps in
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "Traceback" not in out and "resume=auto" in out
    assert "SIGTERM: stopping after this step, with a checkpoint" in out  # said at once
    saved = ckpt_lib.list_checkpoints(run_dir)
    assert len(saved) == 1 and not (run_dir / "final").exists()
    stopped_at = int(saved[0].name.split("-")[1])
    assert 0 < stopped_at < 40, out
    done = rlhf("train", f"run_dir={run_dir}", *args, "resume=auto")
    assert done.returncode == 0, done.stderr
    assert max_diff(adapter(tmp_path / "full"), adapter(run_dir)) < 1e-6
    losses = [r["loss"] for r in read_metrics(run_dir)]
    assert losses == pytest.approx([r["loss"] for r in read_metrics(tmp_path / "full")], abs=1e-6)


def test_final_adapter_loads_in_plain_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_cli.model.tiny import tiny_model_dir

    train_in_process(tmp_path / "run", *FAST, "optim.lr=3e-3")
    final = tmp_path / "run" / "final"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    model = PeftModel.from_pretrained(base, str(final))
    tok = AutoTokenizer.from_pretrained(final)
    state = model.state_dict()
    saved = adapter(tmp_path / "run")
    for key, value in saved.items():
        loaded = next(v for k, v in state.items() if k.replace(".default", "") == key)
        assert torch.equal(loaded, value)
    ids = tok("Name three fruits.", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    from rlhf_cli.stages.sft import SFTStage

    real_loss = SFTStage.loss
    calls = {"n": 0}

    def flaky(self, batch):
        calls["n"] += 1
        loss, metrics = real_loss(self, batch)
        return (loss * float("nan"), metrics) if calls["n"] in (2, 3) else (loss, metrics)

    monkeypatch.setattr(SFTStage, "loss", flaky)
    rows = train_in_process(tmp_path / "a", *FAST, "optim.lr=1e-3")
    assert rows["skipped steps"] == 2
    assert all(torch.isfinite(v).all() for v in adapter(tmp_path / "a").values())

    monkeypatch.setattr(
        SFTStage, "loss", lambda self, b: (real_loss(self, b)[0] * float("nan"), {})
    )
    with pytest.raises(TrainingError, match="non-finite for 3 steps in a row"):
        train_in_process(tmp_path / "b", *FAST, "train.max_nonfinite=3", "train.save_every=1")
    # Skipped steps apply no update: what was saved is the finite initial adapter (B = 0).
    for ckpt in ckpt_lib.list_checkpoints(tmp_path / "b"):
        saved = adapter(tmp_path / "b", f"checkpoints/{ckpt.name}")
        assert all(torch.isfinite(v).all() for v in saved.values())
        assert all(v.abs().sum() == 0 for k, v in saved.items() if "lora_B" in k)


def test_half_written_checkpoints_are_never_loaded(tmp_path):
    run_dir = tmp_path / "run"
    train_in_process(run_dir, *FAST, "train.save_every=2", "train.keep_last=3")
    ckpts = run_dir / "checkpoints"
    assert [p.name for p in ckpt_lib.list_checkpoints(run_dir)] == ["step-000002", "step-000004"]
    (ckpts / ".tmp-step-000006-abc").mkdir()  # a save that died before its rename
    (ckpts / "step-000008").mkdir()  # a directory without trainer state
    assert ckpt_lib.list_checkpoints(run_dir)[-1].name == "step-000004"
    (ckpts / "step-000004" / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be read"):
        ckpt_lib.load_state(ckpts / "step-000004")


def test_keep_last_prunes_old_checkpoints(tmp_path):
    train_in_process(
        tmp_path / "r",
        "train.max_steps=6",
        "train.micro_batch_size=4",
        "data.max_samples=64",
        "data.eval_size=0",
        "train.save_every=1",
        "train.keep_last=2",
    )
    assert [p.name for p in ckpt_lib.list_checkpoints(tmp_path / "r")] == [
        "step-000005",
        "step-000006",
    ]


@pytest.mark.parametrize(
    "extra",
    [
        ("optim=adamw8bit",),
        ("train.precision=bf16",),
        ("train.gradient_checkpointing=true",),
        ("quant=int8",),
        # bf16 runs keep a 4-bit/8-bit base's unquantized weights in bf16 (no fp32 residual)
        ("quant=int8", "train.precision=bf16"),
        ("train.precision=bf16", "train.gradient_checkpointing=true"),
        ("quant=none", "peft=full"),
        ("data=chat",),
        ("train.grad_accum=2", "optim.scheduler=linear", "optim.warmup_steps=2"),
    ],
)
def test_options_train(tmp_path, extra):
    rows = train_in_process(tmp_path / "r", *FAST, "optim.lr=1e-3", *extra)
    losses = [r["loss"] for r in read_metrics(tmp_path / "r")]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert rows["skipped steps"] == 0
    key = "model" if "peft=full" in extra else "adapter"
    assert Path(rows[key]).is_dir()


def test_gradient_checkpointing_gives_the_same_loss(tmp_path):
    common = (*FAST, "peft.dropout=0", "quant=none")
    train_in_process(tmp_path / "a", *common)
    train_in_process(tmp_path / "b", *common, "train.gradient_checkpointing=true")
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-5)


def test_resume_auto_without_run_dir_continues_latest_run(tmp_path):
    args = (
        "stage=sft",
        "train.max_steps=4",
        "train.micro_batch_size=4",
        "data.max_samples=64",
        "data.eval_size=0",
        "train.save_every=2",
    )
    first = subprocess.Popen(
        [sys.executable, "-m", "rlhf_cli", "train", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    (run,) = list((tmp_path / "runs" / "sft").iterdir())
    shutil.rmtree(run / "checkpoints" / "step-000004")
    shutil.rmtree(run / "final")
    time.sleep(1.1)  # a new timestamped run_dir
    again = rlhf("train", *args, "resume=auto", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert [p.name for p in (tmp_path / "runs" / "sft").iterdir()] == [run.name]
    assert (run / "final").is_dir() and f"resuming from {run}" in again.stderr


def test_multirun_sweep_writes_one_run_per_job(tmp_path):
    res = rlhf("train", "-m", "optim.lr=1e-3,2e-3", *FAST, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (sweep,) = list((tmp_path / "runs" / "sft").iterdir())
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    lrs = {(p / "config.yaml").read_text().split("lr: ")[1].split()[0] for p in jobs}
    assert lrs == {"0.001", "0.002"}
    assert all((p / "final" / "adapter_model.safetensors").is_file() for p in jobs)


def test_evaluation_does_not_change_training(tmp_path):
    """Eval under no_grad must leave later training steps exactly as without it (bitsandbytes'
    CPU inference packing of 4-bit weights once cut the gradient through the base layers)."""
    common = (*FAST, "train.max_steps=6", "data.eval_size=8", "optim.lr=2e-3", "peft.dropout=0")
    train_in_process(tmp_path / "a", *common, "train.eval_every=2")
    train_in_process(tmp_path / "b", *common, "train.eval_every=0")
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-6)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-5)


def test_lora_dropout_is_fast_inverted_dropout():
    """FastDropout (swapped in for peft's nn.Dropout on every LoRA input) keeps each element
    with probability 1 - p, scales kept ones by 1 / (1 - p), routes gradients through the same
    mask, is seeded by torch's generator, and is the identity in eval mode or at p = 0."""
    import torch
    from conftest import compose

    from rlhf_cli.model.kernels import FastDropout
    from rlhf_cli.model.load import load_model, load_tokenizer, resolve_device

    torch.manual_seed(0)
    x = torch.randn(1000, 1000, requires_grad=True)
    layer = FastDropout(0.1)
    y = layer(x)
    kept = y != 0
    scale = 65536 / (65536 - round(0.1 * 65536))
    assert abs(1 - kept.float().mean().item() - 0.1) < 2e-3  # 1e6 draws: std 3e-4
    torch.testing.assert_close(y[kept], x[kept] * scale)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * scale)
    # independent per element: the keep rates of neighbouring positions are uncorrelated
    k = kept.float()
    both = (k[:, 1:] * k[:, :-1]).mean().item()
    assert abs(both - 0.9 * 0.9) < 3e-3
    torch.manual_seed(1)
    a = layer(x.detach())
    torch.manual_seed(1)
    assert torch.equal(a, layer(x.detach()))
    assert torch.equal(layer.eval()(x), x) and torch.equal(FastDropout(0.0)(x), x)

    cfg = compose("quant=none", "peft.dropout=0.1")
    model = load_model(cfg, resolve_device("cpu"), load_tokenizer(cfg.model))
    dropouts = [m for n, m in model.named_modules() if ".lora_dropout." in n]
    assert dropouts and all(isinstance(m, FastDropout) and m.p == 0.1 for m in dropouts)


def test_lora_input_keeps_its_dtype_under_autocast_only():
    """Under bf16 autocast a LoRA layer's dropout and lora_A get the bf16 input as it is (peft
    would cast it to the adapter's fp32 first, and autocast straight back), with the same
    output as peft's cast; outside autocast an fp32 adapter on a bf16 base still gets fp32."""
    import torch
    from conftest import compose

    from rlhf_cli.model.load import load_model, load_tokenizer, resolve_device

    cfg = compose("quant=none", "train.precision=bf16", "peft.dropout=0.1")
    model = load_model(cfg, resolve_device("cpu"), load_tokenizer(cfg.model))
    layer = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.lora_A["default"].weight.dtype == torch.float32
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # a fresh B is zero: no LoRA output
    seen = []
    layer.lora_dropout["default"].register_forward_hook(lambda m, i, o: seen.append(i[0].dtype))
    x = torch.randn(2, 5, layer.in_features).bfloat16()
    ours = layer.cast_input_dtype_enabled

    def out(cast: bool):
        layer.cast_input_dtype_enabled = True if cast else ours  # True: peft's default
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x)

    with torch.no_grad():
        layer.eval()  # dropout off: both paths compute the same bf16 products
        lean, cast = out(False), out(True)
        assert seen == [torch.bfloat16, torch.float32]
        assert torch.equal(lean, cast)
        layer.train()
        out(False)
        assert seen[-1] == torch.bfloat16  # dropout runs on the bf16 input, half the bytes
        seen.clear()
        assert layer(x).dtype == torch.bfloat16 and seen == [torch.float32]  # no autocast


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", "bfloat16"), ("fp32", "float32")])
def test_qlora_unquantized_weights_follow_the_run_dtype(precision, dtype):
    """A 4-bit base keeps its embeddings, norms and LM head in the dtype of the run (bf16 in a
    bf16 run: a bf16 residual stream, no cast in and out of every 4-bit layer; fp32 in an fp32
    run), all frozen, and only the LoRA weights train."""
    import torch
    from conftest import compose

    from rlhf_cli.model.load import load_model, load_tokenizer, resolve_device

    cfg = compose("quant=nf4", f"train.precision={precision}")
    model = load_model(cfg, resolve_device("cpu"), load_tokenizer(cfg.model))
    want = getattr(torch, dtype)
    base = model.get_base_model()
    assert base.get_input_embeddings().weight.dtype == want
    assert base.model.norm.weight.dtype == want and base.lm_head.weight.dtype == want
    assert any(p.__class__.__name__ == "Params4bit" for p in base.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


def test_a_full_fine_tune_saves_a_model_directory_transformers_loads(tmp_path):
    """final/ of peft=full holds config.json beside the weights: from_pretrained(final) gives
    the trained model (its logits equal the run's last saved weights, applied to the base)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    rows = train_in_process(tmp_path / "r", *FAST, "quant=none", "peft=full", "optim.lr=1e-3")
    final = Path(rows["model"])
    assert (final / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(final)
    saved = load_file(str(final / "model.safetensors"))
    state = model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    base = AutoModelForCausalLM.from_pretrained(model_path_of_tiny())
    diff = max((state[k] - v).abs().max().item() for k, v in base.state_dict().items())
    assert diff > 1e-4  # trained weights, not the base's
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def model_path_of_tiny() -> str:
    from conftest import compose

    from rlhf_cli.model.load import model_path

    return model_path(compose().model)
