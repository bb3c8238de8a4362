# `make demo` and `make test` create .venv when it is missing and install the project into it,
# at the exact versions of requirements-test.lock (see README, "Reproducible installs").
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo
DEMO_IMAGES ?= 1000
DEMO_SIZE ?= 1024

export PREFECT_SERVER_ANALYTICS_ENABLED := false
# The install does not byte-compile (below): Python writes each module's bytecode on first import.
# With PYTHONDONTWRITEBYTECODE set it would compile torch's again in every process (about 10 s each
# on 2 cores; the test suite starts over a hundred), so make leaves it unset.
unexport PYTHONDONTWRITEBYTECODE
export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: demo test lint browser bench clean lock FORCE

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The project installs in setuptools' strict editable mode: a tree of links to flows/, miner/ and
# storage/ under build/, laid out as the package cxr_miner, that mypy, pyright and editors read
# (the default mode's import hook is run by Python alone). A new or removed module changes the
# list in $(MODULES) and so reinstalls; an edit to a module needs nothing.
MODULES := $(VENV)/.modules
MODULE_LIST := $(sort $(shell find flows miner storage -name '*.py' -o -name py.typed 2>/dev/null))

$(MODULES): FORCE | $(BIN)/python
	@echo '$(MODULE_LIST)' | cmp -s - $@ || echo '$(MODULE_LIST)' > $@

# --no-compile: pip byte-compiles all ~15,700 modules it installs (about 50 s of one core, torch's CUDA
# build most of it); Python compiles the few hundred a run imports on first use instead.
$(STAMP): pyproject.toml requirements.lock requirements-test.lock $(MODULES) | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -r requirements-test.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
	  --config-settings editable_mode=strict -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cxr-miner demo-data $(DEMO_DIR)/nih --images $(DEMO_IMAGES) --size $(DEMO_SIZE) --seed 0 --corrupt 3 --box-fraction 0.15
	$(BIN)/cxr-miner run $(DEMO_DIR)/nih --workdir $(DEMO_DIR)/work --out $(DEMO_DIR)/releases --preset cpu-demo
	@echo
	@echo "demo data:     $(DEMO_DIR)/nih"
	@echo "index:         $(DEMO_DIR)/work/index.parquet (report: $(DEMO_DIR)/work/ingest_report.json)"
	@echo "shards:        $(DEMO_DIR)/work/shards/ (manifest.json; quarantine: $(DEMO_DIR)/work/quarantine.parquet)"
	@echo "models:        $(DEMO_DIR)/work/models/cpu-demo/ (metrics.json, evaluation.md, tuning.json)"
	@echo "release:       $(DEMO_DIR)/releases/latest/ (boxes.parquet, coco/, coco-all/, manifest.json)"
	@echo "report:        $(DEMO_DIR)/releases/latest/report/index.html"

# The report test opens the release report in Debian's headless Chromium (as root, or with sudo).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }

# Lint and type-check the three packages as installed (pyproject.toml: [tool.ruff], [tool.mypy]).
lint: $(STAMP)
	$(BIN)/ruff check flows miner storage
	$(BIN)/ruff format --check flows miner storage tests bench
	$(BIN)/mypy

test: lint browser
	CXR_MINER_REQUIRE_BROWSER=1 $(BIN)/python -m pytest

# locust drives bench/review_load.py (pyproject's `bench` extra; not in the test lock: no test needs it).
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check 'locust>=2.20'
	$(BIN)/python bench/preprocess_efficiency.py
	$(BIN)/python bench/ingest_full_metadata.py
	$(BIN)/python bench/prior_ceiling.py
	$(BIN)/python bench/shard_read.py
	$(BIN)/python bench/train_efficiency.py
	$(BIN)/python bench/harvest_efficiency.py
	$(BIN)/python bench/harvest_cpu.py
	$(BIN)/python bench/harvest_cpu.py --preset paper
	$(BIN)/python bench/full_scale.py --images 10000 --browser
	$(BIN)/python bench/mil_fractions.py
	$(BIN)/python bench/detector_check.py
	$(BIN)/python bench/review_load.py
	$(BIN)/python bench/chaos.py

# Re-pin every dependency (after a change to pyproject.toml); needs uv (pip install uv).
lock:
	uv pip compile pyproject.toml --universal --python-version 3.11 -o requirements.lock
	uv pip compile pyproject.toml --extra test --universal --python-version 3.11 -c requirements.lock -o requirements-test.lock

clean:
	chmod -R u+w $(DEMO_DIR) 2>/dev/null; rm -rf $(DEMO_DIR) .prefect  # releases are read-only
