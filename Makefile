# rlhf-cli developer commands. `make install run` sets everything up and trains the default
# SFT job on the built-in tiny model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch (no multi-GB CUDA download). On a GPU machine: make install TORCH=torch
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install run demo sweep test lint clean

install: $(BIN)/rlhf

$(BIN)/rlhf: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

run: install
	$(BIN)/rlhf train stage=sft

# The DPO paper's controlled-sentiment experiment in miniature (README: "The demo"), offline on a
# CPU in about 7 minutes: writes runs/demo/ (results.md, frontier.png). SEEDS=1 for one seed.
SEEDS ?= 1 2 3
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/demo.py --seeds $(SEEDS)

# A Hydra multirun over the learning rate on the tiny model; each job gets runs/sft/multirun_<time>/<n>.
LRS ?= 5e-4,1e-3,2e-3
sweep: install
	$(BIN)/rlhf train -m stage=sft optim.lr=$(LRS) train.max_steps=30

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check rlhf_cli tests scripts

clean:
	rm -rf runs multirun outputs .pytest_cache build dist *.egg-info
