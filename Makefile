# Two commands for a newcomer: `make demo` and `make test`. Both create the virtual environment first.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.braindino-installed
WEB    := $(VENV)/.braindino-web-installed

.PHONY: setup demo test benchmark clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/braindino demo --out demo-output

# The tests also drive `braindino serve` in a browser: they need the web extra, which `make demo` does without.
$(WEB): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,web]'
	touch $(WEB)

# One worker per core (at most 4): many tests wait on child processes or run on one thread, so two workers on
# two cores finish the suite in far less time; a test file stays on one worker (its module fixtures once).
test: setup $(WEB)
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

benchmark: setup
	$(PY) benchmarks/embed_speed.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
