# Two commands do all the set-up from a fresh clone:
#   make demo   - install into .venv, then run the main job (pre-train on the built-in data, evaluate)
#   make test   - install into .venv (with test extras), then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU/CUDA wheels this project is tested with; other platforms may override TORCH_PIN.
ARCH := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH_PIN ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: install demo test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[dev]" $(TORCH_PIN)
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/semssl pretrain

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/step_time.py
	$(BIN)/python benchmarks/data_throughput.py
	$(BIN)/python benchmarks/main_job.py

clean:
	rm -rf $(VENV) runs .pytest_cache
