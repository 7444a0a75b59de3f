# dist-lm: `make train` runs the main job, `make test` the test suite; both set up what is
# missing first (launch/setup-env.sh is a no-op, about a second, when nothing changed).
SHELL := /bin/bash
VENV ?= .venv
VARIANT ?= cpu
DATA_DIR ?= ../shared/data/wikitext-2
RUN_DIR ?= runs/wikitext2-2ranks
NP ?= 2
EPOCHS ?= 2
PYTEST_ARGS ?=
export VENV VARIANT

.PHONY: setup train test bench clean

setup:
	@bash launch/setup-env.sh

# The main job. Offline, only the valid and test splits of WikiText-2 exist, so the model
# trains on the valid split and is validated and tested on the test split.
train: setup
	@NP=$(NP) bash launch/train-workstation.sh \
	  --train-file $(DATA_DIR)/wiki.valid.tokens \
	  --valid-file $(DATA_DIR)/wiki.test.tokens \
	  --test-file $(DATA_DIR)/wiki.test.tokens \
	  --epochs $(EPOCHS) --log-interval 50 --run-dir $(RUN_DIR) --resume auto $(ARGS)

test: setup
	@$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: setup
	@$(VENV)/bin/dist-lm bench $(ARGS)

clean:
	rm -rf runs .pytest_cache
