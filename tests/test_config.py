"""Config composition: every group option composes and validates, presets resolve, overrides
reach the typed objects with their types, every schema field is documented, `--cfg job`."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import yaml
from conftest import compose, rlhf
from omegaconf import OmegaConf

from rlhf_cli import config as C

GROUPS = ("stage", "model", "data", "peft", "quant", "optim")


def _options() -> list[tuple[str, str]]:
    """(group, option) for every YAML file in conf/<group>/, found on disk."""
    root = C.config_dir()
    found = [
        (group.name, option.stem)
        for group in sorted(root.iterdir())
        if group.is_dir()
        for option in sorted(group.glob("*.yaml"))
    ]
    return found


OPTIONS = _options()


def _yaml_values(group: str, option: str) -> dict:
    """The keys an option's YAML file sets itself (its defaults list left out)."""
    # OmegaConf's YAML loader, as Hydra reads these files (PyYAML alone reads 2e-4 as a string).
    raw = OmegaConf.to_container(OmegaConf.load(C.config_dir() / group / f"{option}.yaml"))
    raw.pop("defaults", None)
    return raw


def test_option_discovery_sees_every_group():
    groups = {group for group, _ in OPTIONS}
    assert groups == set(GROUPS)
    # Spot-check a few files so an empty glob cannot pass.
    for pair in [("model", "tiny"), ("peft", "full"), ("quant", "none"), ("data", "hh")]:
        assert pair in OPTIONS


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    if (group, option) == ("peft", "full"):
        overrides.append("quant=none")  # full fine-tuning of a 4-bit base is refused by design
    if group == "stage" and option in ("ppo", "grpo", "rloo", "reinforce", "rs"):
        overrides.append("reward.fn=rlhf_cli.rewards:char_fraction")  # sampling stages need one
    cfg = compose(*overrides)
    assert isinstance(cfg, C.Config)
    node = getattr(cfg, group)
    schema = C.STAGE_SCHEMAS[option] if group == "stage" else C.GROUP_SCHEMAS[group]
    assert type(node) is schema
    # Every value the YAML file writes arrives in the typed object (after its type conversion).
    values = _yaml_values(group, option)
    for key, value in values.items():
        actual = getattr(node, key)
        if dataclasses.is_dataclass(actual):
            actual = dataclasses.asdict(actual)
        assert actual == value, f"{group}={option}: {key}={actual!r}, YAML says {value!r}"
    if group == "stage":
        assert cfg.stage.name == option


def test_full_finetuning_of_quantized_base_is_refused():
    with pytest.raises(SystemExit) as exc:
        compose("peft=full")
    assert exc.value.code != 0


@pytest.mark.parametrize(
    ("option", "hub_id"),
    [
        ("llama2-7b", "meta-llama/Llama-2-7b-hf"),
        ("llama3-8b", "meta-llama/Meta-Llama-3-8B"),
        ("mistral-7b", "mistralai/Mistral-7B-v0.1"),
        ("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B"),
        ("tiny", "tiny"),
    ],
)
def test_model_presets_resolve_to_hub_ids(option, hub_id):
    assert compose(f"model={option}").model.name_or_path == hub_id


def test_defaults():
    cfg = compose()
    assert cfg.model.name_or_path == "tiny"
    assert isinstance(cfg.stage, C.SftConfig)
    assert cfg.stage.name == "sft"
    # data follows the stage (data: ${stage} in the defaults list)
    assert cfg.data.path == "builtin:sft"
    assert cfg.peft.method == "lora"
    assert cfg.quant.mode == "nf4"
    assert cfg.optim.name == "adamw"
    assert cfg.resume is None
    assert cfg.run_dir.startswith("runs/sft/")


def test_overrides_reach_typed_objects():
    cfg = compose(
        "optim.lr=5e-6",
        "peft.target_modules=[q_proj,v_proj]",
        "data.columns.prompt=question",
        "train.max_steps=7",
        "peft.alpha=8",
        "quant=none",
        "model=mistral-7b",
    )
    assert type(cfg.optim.lr) is float and cfg.optim.lr == 5e-6
    assert type(cfg.peft.target_modules) is list
    assert cfg.peft.target_modules == ["q_proj", "v_proj"]
    assert isinstance(cfg.data.columns, C.ColumnsConfig)
    assert cfg.data.columns.prompt == "question"
    assert cfg.data.columns.completion == "completion"  # the others keep their defaults
    assert type(cfg.train.max_steps) is int and cfg.train.max_steps == 7
    assert type(cfg.peft.alpha) is float and cfg.peft.alpha == 8.0
    assert cfg.quant.mode == "none"
    assert cfg.model.name_or_path == "mistralai/Mistral-7B-v0.1"


def test_overrides_compose_with_group_choice():
    """A field override applies on top of the chosen group option, not the default one."""
    cfg = compose("data=chat", "data.max_length=100", "data.max_prompt_length=50")
    assert cfg.data.path == "builtin:chat"
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (100, 50)


def _schema_classes() -> list[type]:
    return [
        cls
        for _, cls in inspect.getmembers(C, inspect.isclass)
        if dataclasses.is_dataclass(cls) and cls.__module__ == C.__name__
    ]


@pytest.mark.slow
def test_every_schema_field_has_a_docstring():
    classes = _schema_classes()
    names = {cls.__name__ for cls in classes}
    assert {"Config", "SftConfig", "ModelConfig", "DataConfig", "ColumnsConfig"} <= names
    assert {"PeftConfig", "QuantConfig", "OptimConfig", "TrainConfig", "StageConfig"} <= names
    undocumented = [
        f"{cls.__name__}.{f.name}"
        for cls in classes
        for f in dataclasses.fields(cls)
        if not C.field_docs(cls).get(f.name, "").strip()
    ]
    assert undocumented == []


def test_field_docs_reads_the_docstring_under_each_field():
    docs = C.field_docs(C.OptimConfig)
    assert docs["lr"] == "Peak learning rate."
    # multi-line docstrings are joined into one line
    assert "\n" not in C.field_docs(C.ModelConfig)["dtype"]
    assert C.field_docs(C.ModelConfig)["dtype"].endswith("float16.")
    # a subclass inherits its base's docs and overrides its own
    assert C.field_docs(C.SftConfig)["name"].startswith("Supervised fine-tuning")
    assert "completion_only" in C.field_docs(C.SftConfig)


@pytest.mark.slow
def test_cfg_job_prints_config_and_creates_nothing(tmp_path):
    proc = rlhf("train", "--cfg", "job", "optim.lr=5e-6", "model=llama2-7b", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert set(printed) >= {*GROUPS, "train", "device", "run_dir", "resume"}
    assert printed["stage"]["name"] == "sft"
    assert printed["optim"]["lr"] == 5e-6
    assert printed["model"]["name_or_path"] == "meta-llama/Llama-2-7b-hf"
    assert printed["data"]["path"] == "builtin:sft"
    # The printed config is the composed one: it round-trips to the same typed values.
    assert OmegaConf.create(proc.stdout).peft.target_modules == ["all-linear"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()
    assert list(tmp_path.iterdir()) == []


def test_four_bit_compute_dtype_follows_what_the_cpu_multiplies_natively():
    """quant.compute_dtype=auto is bf16 where the CPU has bf16 units, fp32 elsewhere (emulated
    bf16 is several times slower); an explicit value is kept."""
    import torch
    from conftest import compose

    from rlhf_cli.model.load import native_bf16, quantization_config

    cpu = torch.device("cpu")
    auto = quantization_config(compose(), cpu).bnb_4bit_compute_dtype
    assert auto == (torch.bfloat16 if native_bf16(cpu) else torch.float32)
    explicit = compose("quant.compute_dtype=bfloat16")
    assert quantization_config(explicit, cpu).bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(compose("quant=none"), cpu) is None
