# The pipeline, one target per stage. `make help` lists them. Longer shell lives in scripts/ or kaggle_utils.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY := .venv/bin/python
STAMP := .venv/.installed
PAPERMILL := $(PY) -m papermill -k python3 --log-output --no-progress-bar

RUN ?= smollm
CONFIG ?= configs/smollm2-135m.yaml
BASE_MODEL ?=
PYTEST_ARGS ?=

# $(call notebook,NAME,RUN_DIR,ARGS): execute notebooks/NAME.ipynb headless; the executed copy lands in RUN_DIR.
define notebook
	@mkdir -p $(2)
	$(PAPERMILL) notebooks/$(1).ipynb $(2)/$(1).ipynb $(3)
endef

.PHONY: help setup test test-fast demo prepare train train-smollm train-mistral train-llama train-mistral22b \
        train-mixtral clean-notebooks

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv with the pinned CPU stack (idempotent)
$(STAMP): requirements.txt pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

test: setup ## run every test (fast + slow); CI runs this
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: setup ## run the fast tests only (no real model, no notebook runs)
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

prepare: setup ## turn the embedded SmolLM2 GGUF into a cached HF folder (once)
	$(PY) -c "from kaggle_utils import config, models; config.setup_logging(); print(models.prepare_default_model())"

demo: prepare ## the whole job on CPU with the embedded defaults: train
	$(call notebook,train,runs/demo,-f configs/smollm2-135m.yaml -r run_name demo)

train: setup ## train RUN with CONFIG (BASE_MODEL=/path overrides the preset's base model)
	$(call notebook,train,runs/$(RUN),-f $(CONFIG) -r run_name $(RUN) $(if $(BASE_MODEL),-r base_model_path $(BASE_MODEL)))

train-smollm: RUN = smollm
train-smollm: CONFIG = configs/smollm2-135m.yaml
train-smollm: train ## SmolLM2-135M on CPU, minutes

train-mistral: RUN = mistral-7b
train-mistral: CONFIG = configs/mistral-7b.yaml
train-mistral: train ## Mistral-7B-Instruct-v0.2, the original recipe (BASE_MODEL=...)

train-llama: RUN = llama2-13b
train-llama: CONFIG = configs/llama2-13b.yaml
train-llama: train ## Llama-2-13b-chat, QLoRA (BASE_MODEL=...)

train-mistral22b: RUN = mistral-22b
train-mistral22b: CONFIG = configs/mistral-22b.yaml
train-mistral22b: train ## Mistral-22B, QLoRA (BASE_MODEL=...)

train-mixtral: RUN = mixtral-8x7b
train-mixtral: CONFIG = configs/mixtral-8x7b.yaml
train-mixtral: train ## Mixtral-8x7B-Instruct-v0.1, QLoRA, router kept in 16 bit (BASE_MODEL=...)

clean-notebooks: setup ## strip outputs and execution counts from notebooks/ before committing
	$(PY) scripts/nbtool.py clean notebooks/*.ipynb
