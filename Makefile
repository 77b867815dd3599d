# Plain targets: `make run` sets up and runs the quick-start job, `make test` sets up and tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the local CUDA-build wheels run on the CPU; never an unpinned torch.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/multimae pretrain --config configs/pretrain/synthetic-tiny.yaml

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m "slow or not slow"

bench: $(STAMP)
	$(PY) benchmarks/pretrain_throughput.py
	$(PY) benchmarks/data_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
