# Plain targets: `make run` sets up and runs the quick-start job, `make test` sets up and tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup browser run test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the local CUDA-build wheels run on the CPU; never an unpinned torch.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,demo,pseudolabel,datasets,export]'
	touch $(STAMP)

setup: $(STAMP)

# Debian's Chromium and its WebDriver for the demo's headless browser test; installed only when
# missing, and only as root (apt-get); otherwise the test says what to install.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
	  else echo "note: /usr/bin/chromium or /usr/bin/chromedriver missing (apt-get install chromium chromium-driver)"; fi; \
	fi

run: $(STAMP)
	$(VENV)/bin/multimae pretrain --config configs/pretrain/synthetic-tiny.yaml

test: $(STAMP) browser
	$(PY) -m pytest

test-all: $(STAMP) browser
	$(PY) -m pytest -m "slow or not slow"

bench: $(STAMP)
	$(PY) benchmarks/pretrain_throughput.py
	$(PY) benchmarks/data_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
