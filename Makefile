# Fresh-machine entry points (see README):
#   make demo   set up .venv and run the main job
#   make test   set up .venv, lint, and run the test suite (what CI runs)
#
# On CPU machines the CPU build of torch is installed first, so that the
# `torch>=...` range in pyproject.toml never pulls a multi-GB CUDA build.
# Elsewhere point TORCH_INDEX at a CPU wheel index, or on a GPU machine set
# TORCH_SPEC=torch (or the CUDA build you want).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= dev
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench-kernels clean

$(BIN)/fastdense: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

setup: $(BIN)/fastdense

# The main job: align the shipped toy model with the colour-fidelity reward (the `toy`
# preset) into a fresh runs/<time>/ directory; TRAIN_ARGS adds flags (e.g. --out DIR).
TRAIN_ARGS ?=

demo: setup
	$(BIN)/fastdense train $(TRAIN_ARGS)

lint: setup
	$(BIN)/ruff check .

# pytest exit code 5 means "no tests collected" (e.g. a -k filter matching nothing): say so, do not fail.
test: setup lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

bench-kernels: setup
	$(BIN)/fastdense bench kernels --device cpu --impl naive --impl torch --json runs/bench-kernels.json

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
