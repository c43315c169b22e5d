# digit-gen: `make serve`, `make test` and `make train` work from a fresh clone; each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.installed-base
TRAINED := $(VENV)/.installed-train-dev
HOST ?= 127.0.0.1
PORT ?= 8000

# The bundled models (recipes in training/bundle.py); `make train MODELS="cgan"` for a subset.
MODELS ?=
DEVICE ?= auto
# Where MNIST's four IDX files are (or are downloaded to); `make train DATA_DIR=/path/to/mnist` for a local copy.
DATA_DIR ?=

.PHONY: serve test image-test fuzz protocol train bench bench-serve bench-train keygen clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The service needs the base package only: no torch.
$(BASE): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(TRAINED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[train,dev]'
	touch $@

# Serve the bundled models in exported/ on http://$(HOST):$(PORT) (flags and DIGITGEN_* settings: service/README.md).
serve: $(BASE)
	$(BIN)/python -m service --host $(HOST) --port $(PORT)

test: $(TRAINED)
	$(BIN)/ruff check service training tests
	$(BIN)/mypy service training
	$(BIN)/python -m pytest

# Build the Dockerfile's images with podman and check the CPU image running (root, podman, debootstrap, the
# network to Debian and PyPI, haproxy for the two-replica run; `tests/image/image_test.sh --preflight` says what
# is missing). Minutes, not seconds.
image-test: $(TRAINED)
	tests/image/image_test.sh

# The deeper fuzzing run, outside `make test`: every operation, the bundled models, 400 examples each.
fuzz: $(TRAINED)
	DIGITGEN_FUZZ_EXAMPLES=400 DIGITGEN_FUZZ_MODELS_DIR=exported $(BIN)/python -m pytest tests/test_fuzz.py -rA

# Recompile service/protocol/inference.proto (the gRPC messages) into service/protocol/descriptor.py.
protocol: $(TRAINED)
	$(BIN)/python service/protocol/generate.py

# Train, evaluate and export into exported/. Re-running resumes each run from its checkpoint.
train: $(TRAINED)
	$(BIN)/python -m training bundle --device $(DEVICE) $(if $(MODELS),--only $(MODELS)) $(if $(DATA_DIR),--data-dir $(DATA_DIR))

# A new API key for DIGITGEN_API_KEYS_FILE: make keygen NAME=frontend
keygen: $(BASE)
	$(BIN)/python -m service keygen $(or $(NAME),$(error NAME=... is required, e.g. make keygen NAME=frontend))

# Measurements, not tests: the HTTP load benchmark (installs wrk from Debian when missing), then training speed.
bench: bench-serve bench-train

bench-serve: $(TRAINED)
	$(BIN)/python tests/benchmarks/serve_throughput.py

bench-train: $(TRAINED)
	$(BIN)/python tests/benchmarks/train_throughput.py
	$(BIN)/python tests/benchmarks/train_settings.py
	$(BIN)/python tests/benchmarks/train_processes.py

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
