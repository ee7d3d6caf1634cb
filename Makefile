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

## The main job: every paper notebook at the given scale (default: bundled data, CPU; about 112 min on 2 cores).
reproduce: install
	$(PY) -m backdoorlab reproduce --scale $(SCALE)

## First the tests marked `calibrated` (bars on what smoke models learn, measured with torch on 2 threads; they build
## the shared smoke models), one process; then the other unit tests and every notebook under nbval at the `smoke`
## scale, as two one-thread xdist workers. Both phases share one fresh zoo (tests/conftest.py explains the threads).
TEST_ENV := BACKDOORLAB_SCALE=smoke BACKDOORLAB_RUNS=$(TEST_RUNS) BACKDOORLAB_PROGRESS=0 MPLBACKEND=Agg
test: install
	rm -rf $(TEST_RUNS)
	$(TEST_ENV) $(PY) -m pytest -p no:cacheprovider --durations=10 -m calibrated tests
	$(TEST_ENV) OMP_NUM_THREADS=1 $(PY) -m pytest --nbval-lax -p no:cacheprovider --durations=20 \
		-m "not calibrated" -n 2 --dist loadfile tests notebooks

lab: install
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf $(TEST_RUNS) .pytest_cache
