# Plain targets: `make run` sets up and runs the quick-start job, `make test` sets up and tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup browser run test test-all bench clean gpu-wheels gpu-check

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

# A GPU machine that reaches no package index, with its own Python (torch + CUDA, timm, safetensors,
# tokenizers, einops, tensorboard, PyYAML, tqdm, Pillow): `make gpu-wheels` here builds the wheels it
# lacks (webdataset, braceexpand, this package; pure Python, no dependencies pulled) into
# $(GPU_WHEELS); carry that folder over with the source tree and run `make gpu-check` there: it
# installs them offline into a venv over that Python's packages (its torch) and runs the GPU check.
GPU_WHEELS ?= dist/gpu-wheels
GPU_PYTHON ?= python3
GPU_VENV   ?= .gpu-venv
GPU_CHECK_ARGS ?=

gpu-wheels: $(STAMP)
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PY) -m pip wheel -q --no-deps -w $(GPU_WHEELS) \
	  "webdataset==$$($(PY) -c 'import importlib.metadata as m; print(m.version("webdataset"))')" \
	  "braceexpand==$$($(PY) -c 'import importlib.metadata as m; print(m.version("braceexpand"))')"
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(GPU_WHEELS) .
	ls $(GPU_WHEELS)

gpu-check:
	test -d $(GPU_WHEELS) || { echo "no $(GPU_WHEELS): run 'make gpu-wheels' where a package index is reachable"; exit 2; }
	test -x $(GPU_VENV)/bin/python || $(GPU_PYTHON) -m venv --system-site-packages $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --no-index --no-deps --force-reinstall --find-links $(GPU_WHEELS) \
	  webdataset braceexpand multimae
	$(GPU_VENV)/bin/python -c "import torch, multimae; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
	$(GPU_VENV)/bin/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
