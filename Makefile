# dist-lm: `make train` runs the main job, `make test` the test suite; both set up what is
# missing first (launch/setup-env.sh is a no-op, about a second, when nothing changed).
SHELL := /bin/bash
VENV ?= .venv
VARIANT ?= cpu
DATA_DIR ?= ../shared/data/wikitext-2
RUN_DIR ?= runs/wikitext2-2ranks
CACHE_DIR ?= runs/.corpus-cache
NP ?= 2
EPOCHS ?= 3
CONTROLLER ?= mpi
PYTEST_ARGS ?=
export VENV VARIANT

.PHONY: setup setup-tests train test test-fast bench clean

setup:
	@bash launch/setup-env.sh

# The tests also need sshd and ip, for launch/sim-cluster's simulated nodes.
setup-tests:
	@FOR_TESTS=1 bash launch/setup-env.sh

# The main job, the reference notebook's: standard_lstm_lm_200 trained on WikiText-2's
# training split for 3 epochs, validated on its valid split and tested on its test split,
# as NP Horovod ranks sharing a global batch of 20 columns. mpirun starts the ranks (its
# output carries no per-rank prefixes; only rank 0 prints). Run again to continue a
# stopped run (--resume auto).
train: setup
	@echo "make train: $(NP) ranks, run directory $(RUN_DIR); watch it with:" \
	  "$(VENV)/bin/tensorboard --logdir $(RUN_DIR)"
	@NP=$(NP) CONTROLLER=$(CONTROLLER) bash launch/train-workstation.sh \
	  --data-dir $(DATA_DIR) --global-batch-size 20 --epochs $(EPOCHS) \
	  --cache-dir $(CACHE_DIR) --run-dir $(RUN_DIR) --resume auto $(ARGS)
	@echo "make train: TensorBoard logs in $(RUN_DIR)"

test: setup-tests
	@$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The fast tier, a quick check while editing: the suite without the tests marked dist
# (several ranks), slow (training end to end) or medium (seconds each).
test-fast: setup-tests
	@$(VENV)/bin/python -m pytest -m "not dist and not slow and not medium" $(PYTEST_ARGS)

bench: setup
	@$(VENV)/bin/dist-lm bench $(ARGS)

clean:
	rm -rf runs .pytest_cache
