# The two commands: `make demo` and `make test`. Each sets everything up on a fresh machine first.
SHELL := /bin/bash
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := pcache,ckpt,test,lint,ray
PYTEST_ARGS ?=

.PHONY: setup test demo lint format bench sim docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml deploy/install-system-deps.sh
	./deploy/install-system-deps.sh
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned (ckpt extra): an unpinned torch would pull several GB of CUDA packages.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) deploy/demo.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# the scale simulations (docs/scale.md): the real selection, placement and listing code driven by
# simulators; a few minutes; tables on stdout, JSON in .artifacts/sim/
sim: setup
	$(PY) bench/sim/selection_sim.py
	$(PY) bench/sim/placement_sim.py
	$(PY) bench/sim/listing_sim.py

docs: setup
	$(PY) docs/config_reference.py

bench: setup
	$(PY) bench/checksum.py

clean:
	rm -rf $(VENV) .demo .artifacts build *.egg-info
