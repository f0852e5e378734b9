# `make smoke`: set up .venv and run the main job.  `make test`: set up .venv and run every test tier.
# `make test-unit`: tests/unit only (no deepspeed ranks, no Slurm); `make test-integration`: the multi-process tiers,
# tests/integration and the real two-node Slurm cluster of tests/slurm.
VENV  ?= .venv
TORCH ?= torch==2.13.0
PY    := $(VENV)/bin/python

.PHONY: setup smoke test test-unit test-integration lint bench

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet --no-build-isolation -c constraints.txt deepspeed
	$(PY) -m pip install --quiet --no-build-isolation -c constraints.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

smoke: setup
	$(VENV)/bin/launcher launch recipes/smoke.yaml --nproc_per_node 2 --run.output_dir=runs/smoke-$$(date +%Y%m%d-%H%M%S)

test: setup
	$(PY) -m pytest tests

test-unit: setup
	$(PY) -m pytest tests/unit -n auto  # a worker per core (pytest-xdist): no test here starts ranks or a cluster

test-integration: setup
	$(PY) -m pytest tests/integration tests/slurm

lint: setup
	$(VENV)/bin/ruff check launcher tests

bench: setup
	$(PY) bench/consolidate.py
	$(PY) bench/train_speed.py
