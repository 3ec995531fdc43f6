# `make setup` then `moectl train`; `make test` runs the test suite (what CI runs).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU := torch==2.13.0

.PHONY: setup test lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Without a GPU, take the CPU build of torch first: an unpinned torch would pull multi-GB CUDA wheels.
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		$(PIP) install -q $(TORCH_CPU); fi
	$(PIP) install -q -e '.[dev,plot,tensorboard,wandb,data]'
	touch $@
	@echo "moectl installed in $(VENV): run '. $(VENV)/bin/activate' then 'moectl train'"

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache
