# Two entry points for a fresh machine (README): `make demo` and `make test`.
# Each installs what it needs: a virtual environment with every extra, and the npm packages
# the interop tests drive. Stamps make repeated runs skip what is already installed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.crdtchat-installed
JS := tests/js
JS_STAMP := $(JS)/node_modules/.crdtchat-installed

.PHONY: demo test lint install js

demo: $(STAMP)
	$(BIN)/crdtchat demo

test: $(STAMP) $(JS_STAMP) lint
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

install: $(STAMP)

js: $(JS_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[local,tui,test]'
	touch $@

$(JS_STAMP): $(JS)/package.json $(JS)/package-lock.json
	cd $(JS) && npm ci --no-audit --no-fund --loglevel=error
	touch $@
