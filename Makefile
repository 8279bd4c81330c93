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

test: setup $(WEB)
	$(PY) -m pytest -q

benchmark: setup
	$(PY) benchmarks/embed_speed.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
