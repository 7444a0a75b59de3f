# dist-lm: `make train` runs the main job, `make test` the test suite; both set up what is
# missing first (launch/setup-env.sh is a no-op, about a second, when nothing changed).
SHELL := /bin/bash
VENV ?= .venv
VARIANT ?= cpu
# WikiText-2's directory; empty: `dist-lm data` finds it ($DIST_LM_DATA_MIRROR/wikitext-2,
# else ~/.mxnet/datasets/wikitext-2, fetched there when missing). The tests read it as
# $DIST_LM_DATA_DIR (tests/conftest.py), and never fetch.
DATA_DIR ?=
RUN_DIR ?= runs/wikitext2-2ranks
CACHE_DIR ?= runs/.corpus-cache
NP ?= 2
EPOCHS ?= 3
# CONTROLLER (mpi or gloo) is passed on only when given: its default is
# launch/train-workstation.sh's, mpi (docs/reliability.md).
CONTROLLER ?=
PYTEST_ARGS ?=
SMOKE_DIR ?= runs/smoke
SAMPLE := dist_lm/data/sample
export VENV VARIANT

.PHONY: setup setup-tests data smoke train test test-fast bench image clean

setup:
	@bash launch/setup-env.sh

# The tests also need sshd and ip, for launch/sim-cluster's simulated nodes.
setup-tests:
	@FOR_TESTS=1 bash launch/setup-env.sh

# WikiText-2's three splits, fetched and sha1-verified into ~/.mxnet/datasets/wikitext-2
# (or DATA_DIR) unless a copy is already there or in $DIST_LM_DATA_MIRROR.
data: setup
	@$(VENV)/bin/dist-lm data $(if $(DATA_DIR),--data-dir "$(DATA_DIR)")

# The first run, about a minute on a laptop CPU: a small LSTM on the sample corpus the
# package ships (made-up sentences, dist_lm/data/sample), one process, two epochs, in
# SMOKE_DIR (started afresh each time). No download.
smoke: setup
	@rm -rf "$(SMOKE_DIR)"
	@$(VENV)/bin/dist-lm train --train-file $(SAMPLE)/train.txt \
	  --valid-file $(SAMPLE)/valid.txt --test-file $(SAMPLE)/test.txt --model custom \
	  --embed-size 64 --hidden-size 64 --num-layers 1 --global-batch-size 20 --epochs 2 \
	  --log-interval 10 --context cpu --cache-dir $(CACHE_DIR) --run-dir $(SMOKE_DIR) $(ARGS)

# The main job, the reference notebook's: standard_lstm_lm_200 trained on WikiText-2's
# training split for 3 epochs, validated on its valid split and tested on its test split,
# as NP Horovod ranks sharing a global batch of 20 columns. mpirun starts the ranks (its
# output carries no per-rank prefixes; only rank 0 prints). Run again to continue a
# stopped run (--resume auto). The data is found (or fetched) before any rank starts.
train: setup
	@data_dir="$(DATA_DIR)"; [ -n "$$data_dir" ] || data_dir=$$($(VENV)/bin/dist-lm data) \
	  || exit 2; \
	NP=$(NP) $(if $(CONTROLLER),CONTROLLER=$(CONTROLLER)) bash launch/train-workstation.sh \
	  --data-dir "$$data_dir" --global-batch-size 20 --epochs $(EPOCHS) \
	  --cache-dir $(CACHE_DIR) --run-dir $(RUN_DIR) --resume auto $(ARGS)

test: setup-tests
	@DIST_LM_DATA_DIR="$(DATA_DIR)" $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The fast tier, a quick check while editing: the suite without the tests marked dist
# (several ranks), slow (training end to end) or medium (seconds each).
test-fast: setup-tests
	@DIST_LM_DATA_DIR="$(DATA_DIR)" $(VENV)/bin/python -m pytest \
	  -m "not dist and not slow and not medium" $(PYTEST_ARGS)

bench: setup
	@$(VENV)/bin/dist-lm bench $(ARGS)

# The CPU image, dist-lm:cpu, built with podman (docs/cluster.md); podman comes with
# `make setup-tests`.
image:
	@bash launch/build-image $(ARGS)

clean:
	rm -rf runs .pytest_cache
