"""Model cards: final/README.md of a run and the README of a merged model, read back with
huggingface_hub's own ModelCard loader."""

from __future__ import annotations

import pytest
from conftest import rlhf

from rlhf_cli.trainer.card import hub_dataset


@pytest.mark.slow
def test_a_run_and_its_merged_model_get_model_cards(tmp_path):
    from huggingface_hub import ModelCard
    from peft import PeftConfig

    run = tmp_path / "run"
    args = ("stage=dpo", "data.max_samples=40", "data.eval_size=8", "train.max_steps=2")
    proc = rlhf("train", *args, "train.micro_batch_size=4", f"run_dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = ModelCard.load(run / "final" / "README.md")
    assert card.data.base_model == "tiny" and card.data.library_name == "peft"
    assert {"rlhf-cli", "dpo", "lora"} <= set(card.data.tags)
    assert card.data.datasets is None  # a shipped dataset, not a hub one
    text = card.text
    assert "direct preference optimisation" in text
    assert "| train loss |" in text and "| eval rewards/accuracies |" in text
    assert "rlhf train stage=dpo data.max_samples=40" in text  # the command as given
    assert "loss_type: sigmoid" in text  # the resolved config
    assert PeftConfig.from_pretrained(run / "final").peft_type == "LORA"  # still an adapter

    proc = rlhf("merge", str(run), f"out={tmp_path / 'merged'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = ModelCard.load(tmp_path / "merged" / "README.md")
    assert merged.data.library_name == "transformers" and "lora" not in merged.data.tags
    assert "| eval rewards/accuracies |" in merged.text
    assert "AutoModelForCausalLM.from_pretrained" in merged.text


def test_only_hub_datasets_are_named_in_the_card(tmp_path):
    (tmp_path / "mine.jsonl").write_text("{}\n")
    assert hub_dataset("Anthropic/hh-rlhf") == "Anthropic/hh-rlhf"
    assert hub_dataset("builtin:preference") is None
    assert hub_dataset(str(tmp_path / "mine.jsonl")) is None
    assert hub_dataset("data/missing.jsonl") is None
