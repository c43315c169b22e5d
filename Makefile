# digit-gen: `make test` and `make train` work from a fresh clone; each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TRAINED := $(VENV)/.installed-train-dev

# The default model set and how long each trains (epochs over the 4,500 mnist-5k training digits).
MODELS ?= vae cvae gan wgan cgan
EPOCHS ?= 30
DEVICE ?= auto

.PHONY: test train bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(TRAINED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[train,dev]'
	touch $@

test: $(TRAINED)
	$(BIN)/python -m pytest

# Re-running continues each run from its checkpoint (--resume); a finished run is left as it is.
train: $(TRAINED)
	set -e; for model in $(MODELS); do \
	    $(BIN)/python -m training train $$model --epochs $(EPOCHS) --device $(DEVICE) --out runs/$$model --resume; \
	done

bench: $(TRAINED)
	$(BIN)/python tests/benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
