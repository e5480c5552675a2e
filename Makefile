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

.PHONY: help setup test test-fast demo demo-train demo-select demo-blend demo-report prepare train train-smollm train-mistral train-llama train-mistral22b \
        train-mixtral clean-notebooks
.PHONY: render render-local push-lib push-adapters wheels push-wheels push status submit

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

GPU ?=
WHEELS ?=
TORCH_INDEX ?=
TEST_STAMP := .venv/.test-installed
setup: $(STAMP) ## create .venv: the CPU stack (TORCH_INDEX=url: torch from there); GPU=1 the GPU stack with vLLM; WHEELS=dir offline
# A .venv that is not a GPU one yet, asked for GPU=1, is installed again.
ifeq ($(GPU),1)
ifneq ($(shell cat $(STAMP) 2>/dev/null),gpu)
.PHONY: $(STAMP)
endif
endif
$(STAMP): requirements.txt requirements-gpu.txt pyproject.toml scripts/setup.sh
	GPU=$(GPU) WHEELS=$(WHEELS) TORCH_INDEX=$(TORCH_INDEX) bash scripts/setup.sh

# The test extras (pytest; vLLM's types in a CPU .venv) on top of the stack `make demo` uses.
$(TEST_STAMP): $(STAMP) requirements-test.txt requirements-vllm-types.txt
	WHEELS=$(WHEELS) bash scripts/setup.sh test

test: $(TEST_STAMP) ## run every test (fast + slow); CI runs this
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: $(TEST_STAMP) ## run the fast tests only (no real model, no notebook runs)
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

# The data: ../shared/data when it exists, else data/ (built once by `make data`; KAGGLE_UTILS_DATA=/path overrides).
HAVE_DATA := $(or $(KAGGLE_UTILS_DATA),$(wildcard ../shared/data),$(wildcard data/gemma_rewrites.csv))

.PHONY: box-wheels
box-wheels: setup ## wheels of the GPU stack for an offline GPU box into build/box-wheels (BOX_PYTHON=3.12; GBs)
	bash scripts/box_wheels.sh $(BOX_PYTHON)
BOX_PYTHON ?= 3.12

.PHONY: data
data: setup ## build data/ from the public upstream files (pinned commits, sha256 checked; needs a network once)
	$(PY) scripts/build_data.py

prepare: setup ## turn the embedded SmolLM2 GGUF into a cached HF folder (once)
	$(PY) -c "from kaggle_utils import config, models; config.setup_logging(); print(models.prepare_default_model())"

# The demo's held-out prompt groups are split in two (the train stage writes both files): choice rows
# (runs/demo/validation.csv) choose the checkpoint step, the blend and the mean prompt; report rows
# (runs/demo/report.csv) choose nothing and give the numbers printed last (split "report" in scores.csv).
# On a GPU box: make demo DEMO_RUN=gpu DEMO_CONFIG=configs/smollm2-135m-gpu.yaml
DEMO_RUN ?= demo
DEMO_CONFIG ?= configs/smollm2-135m.yaml
DEMO_TRAIN_ARGS ?=
DEMO_INFER_ARGS ?=
D := runs/$(DEMO_RUN)
# Two predictions a choice row (greedy, then one sample): enough for the blend choice to weigh a second prediction
# and the mean prompt, at half the sampling of four on a 2-core CPU.
DEMO_MODELS := models: [{name: smollm, preset: smollm2-135m, adapter: $(D)/selected, n: 2, temperature: 0.7, \
	top_p: 0.95, greedy_first: true}]

demo: demo-train demo-select demo-blend demo-report ## the whole job on CPU with the embedded defaults; prints the scores
	@$(PY) scripts/show_scores.py $(D)/scores.csv

demo-train: prepare $(if $(HAVE_DATA),,data) ## demo stage 1: train DEMO_RUN with DEMO_CONFIG (writes its choice and report rows)
	$(call notebook,train,$(D),-f $(DEMO_CONFIG) -r run_name $(DEMO_RUN) $(DEMO_TRAIN_ARGS))

demo-select: setup ## demo stage 2: choose the checkpoint step on the choice rows
	$(call notebook,select_checkpoint,$(D),-r run_name $(DEMO_RUN))

demo-blend: setup ## demo stage 3: predictions on the choice rows, the mean prompt and the blend chosen on them
	$(call notebook,inference,$(D)/inference,-y "$(DEMO_MODELS)" -r test_file $(D)/validation.csv \
		-r run_dir $(D)/inference -r submission_path $(D)/inference/submission.csv -r score_split choice $(DEMO_INFER_ARGS))
	$(call notebook,mean_prompt,$(D),-r run_name $(DEMO_RUN))

demo-report: setup ## demo stage 4: the chosen blend and the base model on the report rows -> scores.csv
	$(call notebook,inference,$(D)/report,-y "$(DEMO_MODELS)" -r test_file $(D)/report.csv -r run_dir $(D)/report \
		-r submission_path $(D)/submission.csv -r blend_file $(D)/blend.json -p score_base_model True \
		-r score_split report -r scores_file $(D)/scores.csv $(DEMO_INFER_ARGS))

TRAIN_ARGS ?=
SELECT_ARGS ?=

GPUS ?=

train: setup ## train RUN with CONFIG (BASE_MODEL=/path: base weights; GPUS=N: data-parallel; TRAIN_ARGS: more -p/-r)
	$(call notebook,train,runs/$(RUN),-f $(CONFIG) -r run_name $(RUN) $(if $(BASE_MODEL),-r base_model_path $(BASE_MODEL)) \
		$(if $(GPUS),-p num_processes $(GPUS)) $(TRAIN_ARGS))

TEST ?= runs/demo/report.csv
INFER_DIR ?= runs/demo/infer
SUBMISSION ?= $(INFER_DIR)/submission.csv
INFER_ARGS ?=
# The blend `make demo` chose (runs/demo/blend.json) applies unless INFER_ARGS brings another plan (-f file, -y yaml,
# or -p/-r models) or BLEND is given: BLEND=path/to/blend.json for another, BLEND= for none.
OWN_PLAN = $(strip $(findstring -f ,$(INFER_ARGS))$(findstring -y ,$(INFER_ARGS))$(findstring -p models ,$(INFER_ARGS))$(findstring -r models ,$(INFER_ARGS)))
BLEND ?= $(if $(OWN_PLAN),,$(wildcard runs/demo/blend.json))

.PHONY: infer
infer: setup ## write SUBMISSION for TEST with the adapter and blend `make demo` chose (INFER_ARGS: more papermill -p/-r/-f)
	@echo "blend: $(if $(BLEND),$(BLEND),none (the plan as given))"
	$(call notebook,inference,$(INFER_DIR),-r test_file $(TEST) -r submission_path $(SUBMISSION) -r run_dir $(INFER_DIR) \
		$(if $(BLEND),-r blend_file $(BLEND)) $(INFER_ARGS))

.PHONY: select
select: setup ## score RUN's checkpoints (step 0 = base model) by the metric; export the best to runs/RUN/selected/
	$(call notebook,select_checkpoint,runs/$(RUN),-r run_name $(RUN) $(SELECT_ARGS))

SEEDS ?= 3
.PHONY: seeds
seeds: setup ## SEEDS training seeds of CONFIG as runs/RUN-sN, each selected; joined in runs/RUN-seeds/plan.yaml, averaged in runs/RUN-soup
	bash scripts/seed_runs.sh $(RUN) $(CONFIG) $(SEEDS) $(TRAIN_ARGS)

SOUP_RUNS ?=
.PHONY: soup
soup: setup ## average the selected adapters of SOUP_RUNS="runs/a runs/b ..." into runs/RUN/selected (+ plan.yaml)
	$(PY) scripts/soup.py runs/$(RUN) $(SOUP_RUNS)

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

MEAN_PROMPT_ARGS ?=
.PHONY: mean-prompt
mean-prompt: setup ## search the mean prompt and choose the blend on RUN's choice rows (MEAN_PROMPT_ARGS: more -p/-r)
	$(call notebook,mean_prompt,runs/$(RUN),-r run_name $(RUN) $(MEAN_PROMPT_ARGS))

clean-notebooks: setup ## strip outputs and execution counts from notebooks/ before committing
	$(PY) scripts/nbtool.py clean notebooks/*.ipynb

# ---- from plan to leaderboard: PLAN's variants -> build/kernels/<slug>/ -> Kaggle (scripts/submissions.py does the work)
PLAN ?= configs/submissions.yaml
LOCAL_INPUTS ?= configs/local-inputs.yaml
VARIANT ?=
VERSION ?=
KAGGLE_PYTHON ?= 3.12
KERNELS = $(PY) scripts/submissions.py --plan $(PLAN) $(if $(VARIANT),--variant $(VARIANT))

render: setup ## render every variant of PLAN into build/kernels/<slug>/ (VARIANT=<slug> for one; no credentials)
	$(KERNELS) render

render-local: setup ## dry-run one rendered kernel here, /kaggle paths mapped by LOCAL_INPUTS: VARIANT=<slug>
	$(KERNELS) render-local --settings $(LOCAL_INPUTS)

push-lib: setup ## build kaggle_utils (wheel + COMMIT) into build/datasets/library/ and upload it as a Kaggle dataset
	$(KERNELS) push-lib

push-adapters: setup ## upload runs/<adapter>/selected/ of every adapter PLAN names as one Kaggle dataset
	$(KERNELS) push-adapters

wheels: setup ## download vLLM + deps as wheels for Kaggle's Python (KAGGLE_PYTHON) into build/wheels/ (GBs)
	$(KERNELS) wheels --python $(KAGGLE_PYTHON)

push-wheels: setup ## upload build/wheels/ as a Kaggle dataset (after make wheels)
	$(KERNELS) push-wheels

push: setup ## render with your Kaggle user and push every kernel (VARIANT=<slug> for one); needs credentials
	$(KERNELS) push

status: setup ## the Kaggle run status of every pushed kernel (VARIANT=<slug> for one)
	$(KERNELS) status

submit: setup ## submit a pushed kernel to the competition: VARIANT=<slug> [VERSION=n, default the last push]
	$(KERNELS) submit $(if $(VERSION),--version $(VERSION))
