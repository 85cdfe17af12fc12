# Two commands matter: `make demo` and `make test`. Each creates .venv when it is
# missing, installs torch/torchvision at the versions whose wheels this platform
# serves, then lorakit with its extras, then runs.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.14.1 torchvision==0.29.1
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1

.PHONY: demo demo-core test lint install bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[yolo,hf,dev,qlora,serve]" $(TORCH)
	touch $(STAMP)

install: $(STAMP)

# The main job: YOLO LoRA vs full and head-only fine-tuning on synthetic data (~6-8 min, offline).
demo: $(STAMP)
	$(BIN)/python -m lorakit.yolo.demo

# The 30-second core demo on a small CNN.
demo-core: $(STAMP)
	$(BIN)/python -m lorakit.demo

# Two pytest workers (pytest-xdist), one per core: most tests run one thread (OMP_NUM_THREADS=1).
# --dist loadfile keeps each file on one worker, so its module fixtures are built once.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile
	$(BIN)/ruff check src tests
	$(BIN)/mypy

# Benchmarks against PEFT, full fine-tuning and the frozen floor (long: ~30 min; run on a quiet machine).
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[yolo,hf,dev,qlora,serve,bench]" $(TORCH)
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/train_interleaved.py
	$(BIN)/python bench/forward.py
	$(BIN)/python bench/adapters.py
	$(BIN)/python bench/hf_minilm.py

# Needs a CUDA device (~5 min on one H200): tests/gpu, then LLaMA-style LoRA step vs PEFT (bf16, and on an NF4 base) and yolo26n
# LoRA vs full fine-tuning with AMP; writes bench/results/gpu_check.json. Without CUDA it says so and stops.
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
