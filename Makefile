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
# Every other package at the version the reference machine resolved (requirements/constraints.txt), so that a fresh
# install reproduces docs/results.md there; other Pythons and platforms resolve freely (CONSTRAINTS= to opt out).
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
ifeq ($(ARCH)-$(PYVER),x86_64-3.11)
CONSTRAINTS ?= -c requirements/constraints.txt
endif

.PHONY: install demo test bench lock clean

$(BIN)/.installed: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[dev]" $(TORCH_PIN) $(CONSTRAINTS)
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

# Re-record requirements/constraints.txt from the installed .venv (after a deliberate upgrade; re-check results).
lock: install
	{ sed -n '1,4p' requirements/constraints.txt; $(BIN)/pip freeze --exclude-editable | \
	  grep -v -i -E '^(torch==|torchvision==|nvidia-|triton==|cuda-|semssl|ruff==)'; } > requirements/constraints.new
	mv requirements/constraints.new requirements/constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
