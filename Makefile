# Set-up in two commands: `make train` runs the main job, `make test` the tests. Each creates .venv on first use:
# the CPU build of torch where there is no CUDA (no nvidia-smi), then the package with its dev extras (which
# builds the extension tsa_fast._C). ARGS passes arguments on: `make train ARGS="--config configs/classify.yaml"`,
# `make test ARGS="tests/test_distill.py -x"`. VENV=DIR uses another environment.

PYTHON ?= python3
VENV ?= .venv
ARGS ?=
INSTALLED := $(VENV)/.installed

.PHONY: train test venv

train: $(INSTALLED)
	$(VENV)/bin/python train.py $(ARGS)

test: $(INSTALLED)
	TRITON_INTERPRET=1 TSA_FAST_REQUIRE_BACKENDS=triton,cpp,torch $(VENV)/bin/python -m pytest -q $(ARGS)

venv: $(INSTALLED)

# Reinstalled when pyproject.toml changes.
$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	command -v nvidia-smi >/dev/null || $(VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VENV)/bin/python -m pip install --quiet -e ".[dev]"
	touch $@
