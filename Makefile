# Two commands on a fresh machine:
#   make demo   # venv + pinned deps + the default pipeline on CPU
#   make test   # venv + pinned deps + the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORES  ?= 2

.PHONY: setup demo test test-unit test-fast docs clean lint

setup: $(STAMP)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# The headline target, then the report on what it built (ppo/grpo come with `snakemake all`).
demo: setup
	$(BIN)/snakemake --cores $(CORES) results/dpo/model.pt
	$(BIN)/snakemake --cores $(CORES) results/eval/report.md --config 'eval={"stages": ["pretrain", "sft", "dpo"]}'

# The whole suite (what CI runs); the 20 slowest tests are listed at the end.
test: setup
	$(BIN)/python -m pytest -q --durations=20

# The library in one process: no Snakemake, SLURM, MLflow server, torchrun, subprocess,
# torch.compile or whole-stage training run (those carry the `integration` marker, see pyproject.toml).
# One torch thread: the tests' tensors are tiny, and on a busy machine a second OpenMP thread
# waiting for a core made them several times slower.
test-unit: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not integration"

test-fast: test-unit

# The config reference, generated from the schema (tests/test_docs.py checks it is current).
docs: setup
	$(BIN)/python -m lmforge.config_doc > docs/config.md.tmp && mv docs/config.md.tmp docs/config.md

lint: setup
	$(BIN)/snakemake --lint

clean:
	rm -rf results .snakemake
