# Fresh-machine entry points (see README):
#   make demo   set up .venv and run the main job
#   make test   set up .venv, lint, and run the test suite (what CI runs)
#   make lock   refresh requirements/lock-cpu.txt (newest releases, full suite, then freeze)
#
# By default the venv is installed from the lock (requirements/lock-cpu.txt: exact versions,
# CPU torch), so every install is the one the suite last passed with. LOCK=0 installs instead
# the newest releases pyproject.toml allows, into .venv-latest, to find drift on purpose.
#
# With LOCK=0 the CPU build of torch is installed first (TORCH_SPEC), so that the `torch>=...`
# range in pyproject.toml never pulls a multi-GB CUDA build. Where the package index serves CUDA
# wheels by default, point TORCH_INDEX at a CPU wheel index (with the lock it is an extra index:
# the lock's `+cpu` torch comes from there). On a GPU machine set TORCH_SPEC=torch (or the CUDA
# build you want); with the lock it replaces the lock's torch and triton lines.

PYTHON ?= python3
LOCK ?= 1
LOCKFILE ?= requirements/lock-cpu.txt
ifeq ($(LOCK),0)
VENV ?= .venv-latest
else
VENV ?= .venv
endif
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= dev
PYTEST_ARGS ?=
# where `make lock` builds its fresh environment
LOCK_VENV ?= .venv-lock
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

# TORCH_SPEC given on the command line or in the environment (not the default above)
TORCH_OVERRIDE := $(filter command line environment override,$(origin TORCH_SPEC))
# exactly the lock: no torch override, no extras beyond dev (which the lock holds)
PURE_LOCK := $(if $(TORCH_OVERRIDE),,$(filter dev,$(EXTRAS)))
LOCK_USED := $(if $(TORCH_OVERRIDE),$(VENV)/lock-without-torch.txt,$(LOCKFILE))
EXTRA_INDEX := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
STAMP := $(VENV)/.installed
SETTINGS := LOCK=$(LOCK) LOCKFILE=$(LOCKFILE) TORCH_SPEC=$(TORCH_SPEC) TORCH_INDEX=$(TORCH_INDEX) EXTRAS=$(EXTRAS)

.PHONY: setup demo test lint lock bench-kernels clean FORCE

# Rewritten only when the settings differ from the last install's, so changing them reinstalls.
$(VENV)/.settings: FORCE
	@mkdir -p $(VENV)
	@echo '$(SETTINGS)' | cmp -s - $@ || echo '$(SETTINGS)' > $@

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	echo '*' > $(VENV)/.gitignore  # the venv ignores itself (git, ruff), whatever its name
	$(PIP) install --quiet --upgrade pip

ifeq ($(LOCK),0)
# Newest releases allowed by pyproject.toml: torch from TORCH_SPEC first, then everything else
# upgraded eagerly, with torch held at what TORCH_SPEC installed.
$(STAMP): pyproject.toml $(VENV)/.settings | $(BIN)/python
	$(PIP) install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > $(VENV)/torch-pin.txt
	$(PIP) install --quiet --upgrade --upgrade-strategy eager -c $(VENV)/torch-pin.txt -e ".[$(EXTRAS)]"
	$(PIP) check
	touch $@
else
# Exactly the lock (--no-deps: pip check then proves it complete), then the project itself.
$(STAMP): pyproject.toml $(LOCKFILE) $(VENV)/.settings | $(BIN)/python
ifneq ($(TORCH_OVERRIDE),)
	grep -viE '^(torch|triton)==' $(LOCKFILE) > $(LOCK_USED)
endif
	$(PIP) install --quiet --no-deps $(EXTRA_INDEX) -r $(LOCK_USED)
ifneq ($(PURE_LOCK),)
	@# remove what an earlier lock or install left that this lock does not list
	$(PIP) freeze --exclude-editable | sed -E '/^#/d; s/[ =@;].*//; s/[-_.]+/-/g' | tr A-Z a-z | sort > $(VENV)/.have
	sed -E '/^[[:space:]]*(#|-|$$)/d; s/[ =@;].*//; s/[-_.]+/-/g' $(LOCK_USED) | tr A-Z a-z | sort > $(VENV)/.want
	extra="$$(comm -23 $(VENV)/.have $(VENV)/.want)"; \
	if [ -n "$$extra" ]; then echo "not in $(LOCKFILE), uninstalling:" $$extra; $(PIP) uninstall --quiet -y $$extra; fi
endif
ifneq ($(TORCH_OVERRIDE),)
	$(PIP) install --quiet $(EXTRA_INDEX) -c $(LOCK_USED) "$(TORCH_SPEC)"
endif
	$(PIP) install --quiet --no-deps -e .
ifeq ($(PURE_LOCK),)
	$(PIP) install --quiet $(EXTRA_INDEX) -c $(LOCK_USED) -e ".[$(EXTRAS)]"
endif
	$(PIP) check
	touch $@
endif

setup: $(STAMP)

# The main job: align the shipped toy model with the colour-fidelity reward (the `toy`
# preset) into a fresh runs/<time>/ directory; TRAIN_ARGS adds flags (e.g. --out DIR).
TRAIN_ARGS ?=

demo: setup
	$(BIN)/fastdense train $(TRAIN_ARGS)

lint: setup
	$(BIN)/ruff check .

# The venv's own pytest script: never pytest through `python -m`, which puts the checkout root on sys.path.
# pytest exit code 5 means "no tests collected" (e.g. a -k filter matching nothing): say so, do not fail.
test: setup lint
	$(BIN)/pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

# Refresh the lock: a fresh LOCK=0 venv (newest releases), lint and the full suite in it, and
# only if they pass, its `pip freeze` becomes $(LOCKFILE). TORCH_SPEC/TORCH_INDEX as for LOCK=0.
lock:
	rm -rf $(LOCK_VENV)
	$(MAKE) --no-print-directory test LOCK=0 VENV=$(LOCK_VENV) EXTRAS=dev PYTEST_ARGS=
	$(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -vE '^(#|pip==)' > $(LOCK_VENV)/freeze.txt
	@grep -q '^torch==.*+cpu$$' $(LOCK_VENV)/freeze.txt || \
	  { echo "make lock: torch is not a +cpu build; set TORCH_INDEX to a CPU wheel index"; exit 1; }
	mkdir -p $(dir $(LOCKFILE))
	{ \
	echo "# Exact versions the test suite last passed with; \`make setup\` / \`make test\` install them."; \
	echo "# Made by \`make lock\` on $$(date -u +%Y-%m-%d): \`pip freeze --all --exclude-editable\` (less pip"; \
	echo "# itself) of a fresh venv with the newest releases pyproject.toml allowed (TORCH_SPEC=$(TORCH_SPEC)),"; \
	echo "# after ruff and the full pytest suite passed in it. $$($(LOCK_VENV)/bin/python -c 'import platform as p; print("Python", p.python_version(), "on", p.system(), p.machine())')."; \
	echo "# Refresh: make lock   (torch==X+cpu is not on PyPI: where no local wheel has it, add"; \
	echo "# TORCH_INDEX=https://download.pytorch.org/whl/cpu)"; \
	cat $(LOCK_VENV)/freeze.txt; \
	} > $(LOCKFILE).tmp
	mv $(LOCKFILE).tmp $(LOCKFILE)
	@echo "wrote $(LOCKFILE): $$(grep -c '^[^#].*==' $(LOCKFILE)) pinned distributions"

bench-kernels: setup
	$(BIN)/fastdense bench kernels --device cpu --impl naive --impl torch --json runs/bench-kernels.json

clean:
	rm -rf $(VENV) .venv .venv-latest $(LOCK_VENV) build dist *.egg-info .pytest_cache .ruff_cache
