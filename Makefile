# The two commands of README.md. Both create .venv/ at the repo root on first use.
PY := .venv/bin/python
DEMO_DIR ?= workdir/var_tiny

.PHONY: setup demo test lint

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,torch]'
	touch $@

setup: .venv/.installed

demo: setup
	$(PY) -m jaxgen.sample --config=configs/var_tiny.py --workdir=$(DEMO_DIR)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
