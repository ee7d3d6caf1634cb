# backdoorlab: `make reproduce` runs the main job, `make test` the test suite.
# Both create .venv (python3 -m venv) and install the package into it on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
SCALE  ?= default
TEST_RUNS := $(CURDIR)/.test-runs

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install reproduce test lab clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,lab]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (backdoorlab)" >/dev/null
	touch $(STAMP)

install: $(STAMP)

## The main job: every paper notebook at the given scale (default: bundled data, CPU; 78 min on 2 cores).
reproduce: install
	$(PY) -m backdoorlab reproduce --scale $(SCALE)

## Unit tests and every notebook under nbval at the `smoke` scale, run as two concurrent streams of one thread
## each that share one fresh zoo (its per-entry locks train each model once). On 2 cores two 1-thread processes
## train smoke-size models 1.5-1.8x faster than one 2-thread process (benchmarks/concurrent_models.py), and one
## thread makes the learning tests' numbers the same on every machine, whatever its core count.
TEST_ENV := BACKDOORLAB_SCALE=smoke BACKDOORLAB_RUNS=$(TEST_RUNS) BACKDOORLAB_PROGRESS=0 MPLBACKEND=Agg OMP_NUM_THREADS=1
PYTEST   := $(TEST_ENV) $(PY) -m pytest --nbval-lax -p no:cacheprovider --durations=15

test: install
	rm -rf $(TEST_RUNS) && mkdir -p $(TEST_RUNS)
	@$(PYTEST) notebooks > $(TEST_RUNS)/notebooks.log 2>&1 & notebooks=$$!; \
	$(PYTEST) tests; unit=$$?; \
	wait $$notebooks; nbval=$$?; \
	echo "=== notebooks under nbval (ran beside the unit tests; log: $(TEST_RUNS)/notebooks.log) ==="; \
	cat $(TEST_RUNS)/notebooks.log; \
	exit $$(( unit != 0 || nbval != 0 ))

lab: install
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf $(TEST_RUNS) .pytest_cache
