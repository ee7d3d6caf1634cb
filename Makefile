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

## The main job: every paper notebook at the given scale (default: bundled data, CPU; about 87 min on 2 cores).
reproduce: install
	$(PY) -m backdoorlab reproduce --scale $(SCALE)

## Unit tests with torch on 2 threads (tests/conftest.py: their learning margins were measured so), then every notebook
## under nbval at the `smoke` scale as two one-thread workers; both phases share one fresh zoo.
TEST_ENV := BACKDOORLAB_SCALE=smoke BACKDOORLAB_RUNS=$(TEST_RUNS) BACKDOORLAB_PROGRESS=0 MPLBACKEND=Agg
test: install
	rm -rf $(TEST_RUNS)
	$(TEST_ENV) $(PY) -m pytest --nbval-lax -p no:cacheprovider --durations=20 tests
	$(TEST_ENV) OMP_NUM_THREADS=1 $(PY) -m pytest --nbval-lax -p no:cacheprovider --durations=10 \
		-n 2 --dist loadfile notebooks

lab: install
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf $(TEST_RUNS) .pytest_cache
