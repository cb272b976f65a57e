# The two commands of README.md: `make pipeline` (the study, via DVC) and `make test` (ruff, pytest, nbval).
# Each creates .venv if missing, installs torch first (pinned in pyproject.toml; from TORCH_INDEX when set,
# e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build) and then kvlib with its exact
# pins; the install is redone only when pyproject.toml changes.
VENV ?= .venv
TORCH_INDEX ?=
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: pipeline test install

pipeline: $(VENV)/.installed
	$(BIN)/dvc repro

test: $(VENV)/.installed
	$(BIN)/ruff check kvlib tests notebooks
	$(BIN)/ruff format --check kvlib tests notebooks
	$(BIN)/pytest

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install "$$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@
